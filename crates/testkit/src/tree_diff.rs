//! The reference a layer directory is compared with: the layer extracted by GNU tar (owners,
//! modes, xattrs including capabilities, sparse files, devices, sub-second times), with OCI
//! whiteouts converted to overlayfs form as container runtimes do, and a comparison of two
//! trees that names every difference.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Extracts a layer blob (gzip, zstd or plain tar) into `dest` with GNU tar as root, then turns
/// `.wh.NAME` into a 0:0 character device and `.wh..wh..opq` into `trusted.overlay.opaque=y`.
pub fn extract_layer(blob: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).expect("create extraction dir");
    let status = Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "-xpf",
        ])
        .arg(blob)
        .arg("-C")
        .arg(dest)
        .status()
        .expect("run tar");
    assert!(status.success(), "tar -x {}", blob.display());
    convert_whiteouts(dest);
}

fn convert_whiteouts(dir: &Path) {
    let before = std::fs::metadata(dir).expect("stat dir");
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let mut opaque = false;
    for path in names {
        let name = path.file_name().expect("name").as_bytes().to_vec();
        let metadata = std::fs::symlink_metadata(&path).expect("lstat");
        if name == b".wh..wh..opq" {
            std::fs::remove_file(&path).expect("remove opaque marker");
            opaque = true;
        } else if let Some(target) = name.strip_prefix(b".wh.") {
            std::fs::remove_file(&path).expect("remove whiteout file");
            if !target.starts_with(b".wh.") {
                let whiteout = dir.join(std::ffi::OsStr::from_bytes(target));
                let mtime = metadata.mtime();
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &whiteout,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::from_raw_mode(metadata.mode() & 0o7777),
                    0,
                )
                .expect("mknod whiteout");
                let _ = rustix::fs::chownat(
                    rustix::fs::CWD,
                    &whiteout,
                    Some(rustix::fs::Uid::from_raw(metadata.uid())),
                    Some(rustix::fs::Gid::from_raw(metadata.gid())),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                );
                let time = rustix::fs::Timespec {
                    tv_sec: mtime,
                    tv_nsec: metadata.mtime_nsec() as _,
                };
                let _ = rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &whiteout,
                    &rustix::fs::Timestamps {
                        last_access: time,
                        last_modification: time,
                    },
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                );
            }
        } else if metadata.is_dir() {
            convert_whiteouts(&path);
        }
    }
    if opaque {
        rustix::fs::setxattr(
            dir,
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("set opaque");
    }
    // Replacing marker files changed the directory's times: put back what tar set.
    let time = rustix::fs::Timespec {
        tv_sec: before.mtime(),
        tv_nsec: before.mtime_nsec() as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dir,
        &rustix::fs::Timestamps {
            last_access: time,
            last_modification: time,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("restore directory times");
}

/// One path's comparable state.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    rdev: u64,
    link: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 64 << 10];
    let Ok(len) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return BTreeMap::new();
    };
    names[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let mut value = vec![0u8; 64 << 10];
            let name_os = std::ffi::OsStr::from_bytes(name);
            let n = rustix::fs::lgetxattr(path, name_os, &mut value[..]).unwrap_or(0);
            (name.to_vec(), value[..n].to_vec())
        })
        .collect()
}

fn node(path: &Path, compare_dir_times: bool) -> Node {
    let m = std::fs::symlink_metadata(path).expect("lstat");
    let t = m.file_type();
    let kind = if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_file() {
        "file"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "other"
    };
    Node {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if t.is_file() || t.is_symlink() {
            m.size()
        } else {
            0
        },
        mtime: if t.is_dir() && !compare_dir_times {
            (0, 0)
        } else {
            (m.mtime(), m.mtime_nsec())
        },
        nlink: if t.is_dir() { 0 } else { m.nlink() },
        rdev: m.rdev(),
        link: t.is_symlink().then(|| {
            std::fs::read_link(path)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec()
        }),
        xattrs: xattrs(path),
    }
}

/// Every difference between two trees (type, mode, owner, size, mtime, link count, device
/// numbers, symlink target, xattrs, file content); empty when they are equal. Directory times
/// are compared when `compare_dir_times` is set.
pub fn diff_trees(expected: &Path, actual: &Path, compare_dir_times: bool) -> Vec<String> {
    let mut differences = Vec::new();
    diff_dir(
        expected,
        actual,
        Path::new(""),
        compare_dir_times,
        &mut differences,
    );
    differences
}

fn diff_dir(
    expected: &Path,
    actual: &Path,
    relative: &Path,
    dir_times: bool,
    out: &mut Vec<String>,
) {
    let names = |dir: &Path| -> BTreeMap<Vec<u8>, PathBuf> {
        std::fs::read_dir(dir)
            .map(|listing| {
                listing
                    .map(|e| e.expect("entry"))
                    .map(|e| (e.file_name().as_bytes().to_vec(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (left, right) = (names(expected), names(actual));
    for name in left
        .keys()
        .chain(right.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let shown = relative.join(std::ffi::OsStr::from_bytes(name));
        match (left.get(name), right.get(name)) {
            (Some(_), None) => out.push(format!("{}: missing", shown.display())),
            (None, Some(_)) => out.push(format!("{}: unexpected", shown.display())),
            (Some(a), Some(b)) => {
                let (na, nb) = (node(a, dir_times), node(b, dir_times));
                if na != nb {
                    out.push(format!("{}: expected {na:?}, got {nb:?}", shown.display()));
                } else if na.kind == "file" && std::fs::read(a).ok() != std::fs::read(b).ok() {
                    out.push(format!("{}: content differs", shown.display()));
                } else if na.kind == "dir" {
                    diff_dir(a, b, &shown, dir_times, out);
                }
            }
            (None, None) => unreachable!(),
        }
    }
}
