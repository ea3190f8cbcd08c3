//! The demo's sample image, built once from files already on this machine (cached under the
//! root): an interpreter (the host's Debian python3, else perl), the shared libraries it links,
//! a shell, and the interpreter's library tree, packed as one gzip layer in an OCI layout,
//! with its lazy index attached as a referrer so that the embedded registry serves it too.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use lazylayer_index::distribution::{
    ARTIFACT_TYPE, EMPTY_CONFIG, IndexUpload, artifact_manifest, binding_index, referrers_list,
    referrers_tag,
};
use lazylayer_index::{BuildOptions, IndexHead, build_from_reader};
use lazylayer_source::registry::Body;
use lazylayer_source::{BlobDescriptor, Digest};

/// A sample image ready to serve.
pub struct SampleImage {
    /// The OCI layout.
    pub layout: PathBuf,
    /// What the workload runs.
    pub command: Vec<String>,
    /// What the workload is, for people.
    pub description: String,
}

const RECIPE: &str = "demo-image-v3";

struct Interpreter {
    name: &'static str,
    binary: PathBuf,
    trees: Vec<PathBuf>,
    command: Vec<String>,
    description: String,
}

fn find_interpreter() -> anyhow::Result<Interpreter> {
    for minor in (8..=14).rev() {
        let binary = PathBuf::from(format!("/usr/bin/python3.{minor}"));
        let library = PathBuf::from(format!("/usr/lib/python3.{minor}"));
        if binary.is_file()
            && library.join("json").is_dir()
            && library.join("http/server.py").is_file()
        {
            let code = "import json, http.server; print(json.dumps({'hello': 'from a lazily loaded image'}))";
            // Like real images, it carries much the workload never reads: third-party
            // packages and C headers, as a development image would.
            let mut trees = vec![library];
            trees.extend(
                ["/usr/lib/python3/dist-packages", "/usr/include"]
                    .iter()
                    .map(PathBuf::from)
                    .filter(|p| p.is_dir()),
            );
            return Ok(Interpreter {
                name: "python",
                binary,
                trees,
                command: vec!["/usr/bin/python3".into(), "-c".into(), code.into()],
                description: format!("python3.{minor} -c 'import json, http.server; print(...)'"),
            });
        }
    }
    let perl = PathBuf::from("/usr/bin/perl");
    if perl.is_file() {
        let trees: Vec<PathBuf> = [
            "/usr/lib/x86_64-linux-gnu/perl-base",
            "/usr/share/perl",
            "/usr/lib/x86_64-linux-gnu/perl",
        ]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .collect();
        return Ok(Interpreter {
            name: "perl",
            binary: perl,
            trees,
            command: vec![
                "/usr/bin/perl".into(),
                "-e".into(),
                "print qq(hello from a lazily loaded image\\n)".into(),
            ],
            description: "perl -e 'print ...'".into(),
        });
    }
    anyhow::bail!(
        "the demo needs python3 (Debian's) or perl on this machine to build its sample image"
    )
}

/// The shared libraries `binary` loads (from ldd), the loader included.
fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .filter(|p| p.is_file())
        .collect())
}

fn copy_into(root: &Path, source: &Path, target: &Path) -> anyhow::Result<()> {
    let destination = root.join(target.strip_prefix("/").unwrap_or(target));
    if let Some(parent) = destination.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg("-L")
        .arg(source)
        .arg(&destination)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "copying {} into the sample image",
        source.display()
    );
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<Digest> {
    let mut hasher = lazylayer_source::DigestHasher::new(lazylayer_source::DigestAlgorithm::Sha256);
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finish())
}

fn put_blob(layout: &Path, bytes: &[u8]) -> anyhow::Result<Digest> {
    let digest = Digest::sha256(bytes);
    std::fs::write(layout.join("blobs/sha256").join(digest.hex()), bytes)?;
    Ok(digest)
}

/// The sample image under `cache`, built now if it is not there.
pub fn ensure(cache: &Path) -> anyhow::Result<SampleImage> {
    let interpreter = find_interpreter()?;
    let dir = cache.join(format!("{RECIPE}-{}", interpreter.name));
    let layout = dir.join("oci");
    let sample = SampleImage {
        layout: layout.clone(),
        command: interpreter.command.clone(),
        description: interpreter.description.clone(),
    };
    if dir.join("complete").exists() {
        return Ok(sample);
    }
    eprintln!(
        "building the demo's sample image from this machine's {} (once) ...",
        interpreter.name
    );
    let _ = std::fs::remove_dir_all(&dir);
    let staging = dir.join("rootfs");
    std::fs::create_dir_all(&staging)?;
    // The interpreter, a shell, and everything they load.
    let shell = PathBuf::from("/bin/sh");
    let mut files = vec![
        (interpreter.binary.clone(), interpreter.binary.clone()),
        (shell.clone(), shell.clone()),
    ];
    if interpreter.name == "python" {
        files.push((
            interpreter.binary.clone(),
            PathBuf::from("/usr/bin/python3"),
        ));
    }
    for binary in [&interpreter.binary, &shell] {
        for library in libraries(binary)? {
            files.push((library.clone(), library));
        }
    }
    for (source, target) in files {
        copy_into(&staging, &source, &target)?;
    }
    for tree in &interpreter.trees {
        copy_into(&staging, tree, tree)?;
    }
    for dir in ["etc", "tmp", "root", "proc", "dev", "sys"] {
        std::fs::create_dir_all(staging.join(dir))?;
    }
    std::fs::write(
        staging.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )?;
    std::fs::write(staging.join("etc/group"), "root:x:0:\n")?;
    // One layer: tar, then gzip (the diff_id is the tar's digest).
    let tar = dir.join("layer.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "--sort=name", "-C"])
        .arg(&staging)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    anyhow::ensure!(status.success(), "packing the sample image");
    let diff_id = sha256_file(&tar)?;
    let status = Command::new("gzip")
        .arg("-6")
        .arg("-n")
        .arg("-f")
        .arg(&tar)
        .status()?;
    anyhow::ensure!(status.success(), "compressing the sample image");
    let gz = dir.join("layer.tar.gz");
    std::fs::remove_dir_all(&staging)?;
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let layer = BlobDescriptor {
        digest: sha256_file(&gz)?,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        size: std::fs::metadata(&gz)?.len(),
    };
    std::fs::rename(&gz, layout.join("blobs/sha256").join(layer.digest.hex()))?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": interpreter.command,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let config_desc = BlobDescriptor {
        digest: put_blob(&layout, &config_bytes)?,
        media_type: "application/vnd.oci.image.config.v1+json".into(),
        size: config_bytes.len() as u64,
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer],
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_desc = BlobDescriptor {
        digest: put_blob(&layout, &manifest_bytes)?,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: manifest_bytes.len() as u64,
    };
    // Its lazy index, attached the way `lazylayer index --push` attaches it to a registry.
    let blob = std::fs::File::open(layout.join("blobs/sha256").join(layer.digest.hex()))?;
    // Many small library files: denser checkpoints waste less of each fetch on neighbours.
    let options = BuildOptions {
        spacing: 512 << 10,
        ..BuildOptions::default()
    };
    let index = build_from_reader(blob, &layer, Some(&diff_id), options)?;
    let encoded = index.encode()?;
    let index_digest = put_blob(&layout, &encoded)?;
    put_blob(&layout, EMPTY_CONFIG)?;
    let upload = IndexUpload {
        layer: layer.clone(),
        digest: index_digest,
        size: encoded.len() as u64,
        head: IndexHead::of(&encoded),
        body: Body::Bytes(Bytes::new()),
    };
    let artifact = artifact_manifest(&manifest_desc, &[upload]);
    let artifact_digest = put_blob(&layout, &artifact)?;
    // Bound to the image, as `index --push` binds it: the tag names an image index listing
    // the manifest and the artifact.
    let binding = binding_index(
        None,
        &manifest_desc,
        &lazylayer_source::Platform::new("linux", "amd64", None),
        &BlobDescriptor {
            digest: artifact_digest.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: artifact.len() as u64,
        },
        ARTIFACT_TYPE,
    )?;
    let binding_digest = put_blob(&layout, &binding)?;
    let referrers = referrers_list(Vec::new(), &artifact_digest, artifact.len() as u64);
    let referrers_digest = put_blob(&layout, &referrers)?;
    let index_json = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": binding_digest, "size": binding.len(),
             "annotations": {"org.opencontainers.image.ref.name": "latest"}},
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": referrers_digest, "size": referrers.len(),
             "annotations": {"org.opencontainers.image.ref.name": referrers_tag(&manifest_desc.digest)}},
        ],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec_pretty(&index_json)?,
    )?;
    std::fs::write(dir.join("complete"), b"")?;
    Ok(sample)
}
