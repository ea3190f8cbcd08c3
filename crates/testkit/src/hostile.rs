//! A corpus of malicious layers, written byte by byte (tar writers refuse to produce most of
//! them), and an OCI image layout holding one image per layer, for `lazylayer pull oci:DIR:NAME`.
//! Each layer says what lazylayer must do with it: refuse it with an error naming the problem,
//! or contain it inside the layer directory.

use std::io::Write;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// What lazylayer must do with a hostile layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `pull` fails, and its error contains these words.
    Refused(&'static str),
    /// `pull` succeeds, and everything the layer creates is inside its directory.
    Contained,
    /// Either, as long as an error is clear (no panic) and nothing escapes.
    RefusedOrContained,
}

/// One hostile layer: an uncompressed tar stream.
pub struct HostileLayer {
    /// Its name (the image's tag in the layout).
    pub name: &'static str,
    /// What it tries.
    pub attack: &'static str,
    /// The tar bytes.
    pub tar: Vec<u8>,
    /// What lazylayer must do.
    pub expect: Expect,
}

/// Paths on the host that an escaping layer would create; a test checks they never exist.
pub const HOST_CANARIES: &[&str] = &[
    "/tmp/lazylayer-hostile-escape",
    "/tmp/lazylayer-hostile-escape-2",
    "/etc/lazylayer-hostile-escape",
    "/root/lazylayer-hostile-escape",
];

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// One ustar header block (no data). `size` is what the header claims.
fn header(name: &[u8], kind: u8, link: &[u8], size: u64, mode: u32) -> [u8; 512] {
    let mut block = [0u8; 512];
    let name = &name[..name.len().min(100)];
    block[..name.len()].copy_from_slice(name);
    octal(&mut block[100..108], u64::from(mode));
    octal(&mut block[108..116], 0);
    octal(&mut block[116..124], 0);
    octal(&mut block[124..136], size);
    octal(&mut block[136..148], 1_700_000_000);
    block[156] = kind;
    let link = &link[..link.len().min(100)];
    block[157..157 + link.len()].copy_from_slice(link);
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block[148..156].copy_from_slice(b"        ");
    let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
    octal(&mut block[148..155], u64::from(sum));
    block[155] = b' ';
    block
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(data.len().div_ceil(512) * 512, 0);
    out
}

/// A tar stream being written entry by entry.
#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn file(mut self, name: &[u8], data: &[u8]) -> Self {
        self.0
            .extend_from_slice(&header(name, b'0', b"", data.len() as u64, 0o644));
        self.0.extend(padded(data));
        self
    }

    fn dir(mut self, name: &[u8]) -> Self {
        self.0.extend_from_slice(&header(name, b'5', b"", 0, 0o755));
        self
    }

    fn symlink(mut self, name: &[u8], target: &[u8]) -> Self {
        self.0
            .extend_from_slice(&header(name, b'2', target, 0, 0o777));
        self
    }

    fn hardlink(mut self, name: &[u8], target: &[u8]) -> Self {
        self.0
            .extend_from_slice(&header(name, b'1', target, 0, 0o644));
        self
    }

    /// A PAX extended header giving the next entry's path (for names longer than 100 bytes).
    fn pax_path(mut self, path: &[u8]) -> Self {
        let mut record_len = path.len() + 8;
        let record = loop {
            let record = [
                format!("{record_len} path=").as_bytes(),
                path,
                b"\n".as_slice(),
            ]
            .concat();
            if record.len() == record_len {
                break record;
            }
            record_len = record.len();
        };
        self.0.extend_from_slice(&header(
            b"././@PaxHeader",
            b'x',
            b"",
            record.len() as u64,
            0o644,
        ));
        self.0.extend(padded(&record));
        self
    }

    /// A header claiming `claimed` bytes followed by only `data`, and the end of the stream.
    fn lying(mut self, name: &[u8], claimed: u64, data: &[u8]) -> Vec<u8> {
        self.0
            .extend_from_slice(&header(name, b'0', b"", claimed, 0o644));
        self.0.extend_from_slice(data);
        self.0
    }

    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// Zeros written as a tar file entry of `size` bytes, streamed (the decompression bomb).
fn zeros_entry(name: &[u8], size: u64) -> Vec<u8> {
    zeros_of_kind(b'0', name, size)
}

/// A tar entry of type `kind` whose `size` bytes of data are zeros.
fn zeros_of_kind(kind: u8, name: &[u8], size: u64) -> Vec<u8> {
    let mut out = header(name, kind, b"", size, 0o644).to_vec();
    out.resize(out.len() + size.div_ceil(512) as usize * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// The corpus. `bomb_bytes` sizes the decompression bomb's single file.
pub fn corpus(bomb_bytes: u64) -> Vec<HostileLayer> {
    let long_component = vec![b'n'; 300];
    let deep: Vec<u8> = (0..24)
        .map(|i| format!("{i:0>200}"))
        .collect::<Vec<_>>()
        .join("/")
        .into_bytes();
    vec![
        HostileLayer {
            name: "dotdot",
            attack: "a `..` path climbing out of the layer",
            tar: Tar::default()
                .file(b"../../../../tmp/lazylayer-hostile-escape", b"x")
                .end(),
            expect: Expect::Refused(".."),
        },
        HostileLayer {
            name: "absolute",
            attack: "an absolute path",
            tar: Tar::default()
                .file(b"/etc/lazylayer-hostile-escape", b"x")
                .end(),
            expect: Expect::Contained,
        },
        HostileLayer {
            name: "symlink-write",
            attack: "a symlink to / followed by a write through it",
            tar: Tar::default()
                .symlink(b"evil", b"/")
                .file(b"evil/root/lazylayer-hostile-escape", b"x")
                .end(),
            expect: Expect::Refused("not a directory"),
        },
        HostileLayer {
            name: "symlink-dotdot-write",
            attack: "a symlink climbing out with `..`, then a write through it",
            tar: Tar::default()
                .symlink(b"up", b"../../../../../../../../tmp")
                .file(b"up/lazylayer-hostile-escape-2", b"x")
                .end(),
            expect: Expect::Refused("not a directory"),
        },
        HostileLayer {
            name: "symlink-dir-write",
            attack: "a directory replaced by a symlink, then a write into it",
            tar: Tar::default()
                .dir(b"d")
                .symlink(b"d", b"/tmp")
                .file(b"d/lazylayer-hostile-escape", b"x")
                .end(),
            expect: Expect::Refused("not a directory"),
        },
        HostileLayer {
            name: "hardlink-dotdot",
            attack: "a hardlink to a path outside the layer",
            tar: Tar::default()
                .hardlink(b"shadow", b"../../../../etc/shadow")
                .end(),
            expect: Expect::Refused("hardlink"),
        },
        HostileLayer {
            name: "hardlink-absolute",
            attack: "a hardlink to an absolute host path",
            tar: Tar::default().hardlink(b"passwd", b"/etc/passwd").end(),
            expect: Expect::Refused("hardlink"),
        },
        HostileLayer {
            name: "duplicates",
            attack: "the same path three times, as file, directory and file",
            tar: Tar::default()
                .file(b"twice", b"first")
                .dir(b"twice")
                .file(b"twice", b"last wins")
                .end(),
            expect: Expect::Contained,
        },
        HostileLayer {
            name: "under-a-file",
            attack: "an entry under a regular file",
            tar: Tar::default().file(b"f", b"x").file(b"f/g", b"y").end(),
            expect: Expect::Refused("not a directory"),
        },
        HostileLayer {
            name: "lying-size",
            attack: "a header claiming 1 MiB followed by 10 bytes and the end",
            tar: Tar::default().lying(b"short", 1 << 20, b"0123456789"),
            expect: Expect::RefusedOrContained,
        },
        HostileLayer {
            name: "bomb",
            attack: "a decompression bomb: one file of zeros, compressing ~1000:1",
            tar: zeros_entry(b"zeros", bomb_bytes),
            expect: Expect::Contained,
        },
        HostileLayer {
            name: "pax-bomb",
            attack: "a PAX extended header of compressed zeros, which tar readers hold whole",
            tar: zeros_of_kind(b'x', b"././@PaxHeader", bomb_bytes),
            expect: Expect::Refused("accepts up to"),
        },
        HostileLayer {
            name: "long-name-bomb",
            attack: "a GNU long name of compressed zeros, which tar readers hold whole",
            tar: zeros_of_kind(b'L', b"././@LongLink", bomb_bytes),
            expect: Expect::Refused("accepts up to"),
        },
        HostileLayer {
            name: "long-name",
            attack: "a path component longer than NAME_MAX",
            tar: Tar::default()
                .pax_path(&long_component)
                .file(b"placeholder", b"x")
                .end(),
            expect: Expect::RefusedOrContained,
        },
        HostileLayer {
            name: "long-path",
            attack: "a path longer than PATH_MAX (24 components of 200 bytes)",
            tar: Tar::default()
                .pax_path(&deep)
                .file(b"placeholder", b"x")
                .end(),
            expect: Expect::RefusedOrContained,
        },
    ]
}

/// GNU gzip's output for `data` (fast, no name or time: reproducible).
fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut child = std::process::Command::new("gzip")
        .args(["-1", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output()?;
    writer.join().expect("gzip writer")?;
    if !output.status.success() {
        return Err(std::io::Error::other("gzip failed"));
    }
    Ok(output.stdout)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn put_blob(dir: &Path, bytes: &[u8]) -> std::io::Result<String> {
    let hex = sha256_hex(bytes);
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes)?;
    Ok(format!("sha256:{hex}"))
}

/// Writes an OCI image layout at `dir` with one single-layer image per corpus entry, tagged
/// with its name; layers are gzip-compressed.
pub fn write_layout(dir: &Path, corpus: &[HostileLayer]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut manifests = Vec::new();
    for layer in corpus {
        let compressed = gzip(&layer.tar)?;
        let layer_digest = put_blob(dir, &compressed)?;
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer.tar))]},
        })
        .to_string();
        let config_digest = put_blob(dir, config.as_bytes())?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": compressed.len(),
            }],
        })
        .to_string();
        let manifest_digest = put_blob(dir, manifest.as_bytes())?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": layer.name},
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests}).to_string();
    std::fs::write(dir.join("index.json"), index)
}

/// A layer of `count` empty files, a thousand per directory (directories implied by the paths).
pub fn many_empty_files(count: usize) -> HostileLayer {
    let mut tar = Vec::with_capacity(count * 512 + 1024);
    for i in 0..count {
        let name = format!("d{:04}/f{:04}", i / 1000, i % 1000);
        tar.extend_from_slice(&header(name.as_bytes(), b'0', b"", 0, 0o644));
    }
    tar.extend_from_slice(&[0u8; 1024]);
    HostileLayer {
        name: "many-empty-files",
        attack: "a huge number of empty files in one layer",
        tar,
        expect: Expect::Contained,
    }
}

/// A layer of one file of `size` incompressible bytes: indexing it must hold bounded memory
/// whatever its size (its spans' windows and digests are kept on disk, not in memory).
pub fn large_random_file(size: usize) -> HostileLayer {
    let mut data = vec![0u8; size];
    fastrand::Rng::with_seed(7).fill(&mut data);
    let mut tar = header(b"random.bin", b'0', b"", size as u64, 0o644).to_vec();
    tar.extend_from_slice(&data);
    drop(data);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    HostileLayer {
        name: "large-random",
        attack: "a large layer of incompressible data",
        tar,
        expect: Expect::Contained,
    }
}

/// Not an attack: an ordinary layer of `count` small files (0-2 KiB of words drawn at random
/// from a small vocabulary, which compresses about as well as source code; a thousand per
/// directory), for the memory bound of populating large layers (`lazylayer-bench populate`).
pub fn many_small_files(count: usize) -> HostileLayer {
    const WORDS: [&str; 16] = [
        "fn", "let", "struct", "impl", "return", "match", "layer", "index", "span", "file", "read",
        "write", "self", "Result", "Vec<u8>", "usize",
    ];
    let mut rng = fastrand::Rng::with_seed(11);
    let mut tar = Vec::with_capacity(count * 1536 + 1024);
    for i in 0..count {
        let name = format!("d{:04}/f{:04}", i / 1000, i % 1000);
        let size = rng.usize(..2048);
        let mut body = Vec::with_capacity(size + 16);
        while body.len() < size {
            body.extend_from_slice(WORDS[rng.usize(..WORDS.len())].as_bytes());
            body.push(if rng.u8(..8) == 0 { b'\n' } else { b' ' });
        }
        body.truncate(size);
        tar.extend_from_slice(&header(name.as_bytes(), b'0', b"", size as u64, 0o644));
        tar.extend_from_slice(&body);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    HostileLayer {
        name: "many-small-files",
        attack: "none: a large ordinary layer",
        tar,
        expect: Expect::Contained,
    }
}
