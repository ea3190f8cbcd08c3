//! Checking a layer directory against its index: every entry's type, mode, owner, times,
//! xattrs, link target and device numbers, and every populated file's content against the
//! sha256 the index records for it.

use std::os::unix::ffi::OsStrExt;

use lazylayer_index::{EntryKind, LayerIndex};
use rustix::fs::{AtFlags, FileType, OFlags};
use sha2::{Digest as _, Sha256};

use crate::tree::LayerTree;

/// Every difference between the directory and the index; files for which `populated` is false
/// are checked for metadata only (their data is not there yet).
pub fn verify_layer(
    tree: &LayerTree,
    index: &LayerIndex,
    populated: &dyn Fn(usize) -> bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, entry) in index.entries.iter().enumerate() {
        let shown = entry.display_path();
        let mut problem = |what: String| problems.push(format!("{shown}: {what}"));
        let stat = if entry.path.is_empty() {
            rustix::fs::fstat(tree.root_fd())
        } else {
            match tree.parent(&entry.path) {
                Ok((dir, name)) => rustix::fs::statat(
                    &dir,
                    std::ffi::OsStr::from_bytes(name),
                    AtFlags::SYMLINK_NOFOLLOW,
                ),
                Err(e) => {
                    problem(e.to_string());
                    continue;
                }
            }
        };
        let stat = match stat {
            Ok(stat) => stat,
            Err(e) => {
                problem(format!("missing ({e})"));
                continue;
            }
        };
        if entry.kind == EntryKind::Hardlink {
            // The target's own entry checks the inode's type and metadata (it may be a symlink
            // or a device: tar writers link those too).
            let target = entry.link.as_deref().unwrap_or_default();
            match tree.inode(target) {
                Ok((_, ino)) if ino == stat.st_ino => {}
                _ => problem("is not a hardlink of its target".into()),
            }
            continue;
        }
        let file_type = FileType::from_raw_mode(stat.st_mode);
        let expected_type = match entry.kind {
            EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
            EntryKind::Dir => FileType::Directory,
            EntryKind::Symlink => FileType::Symlink,
            EntryKind::CharDevice | EntryKind::Whiteout => FileType::CharacterDevice,
            EntryKind::BlockDevice => FileType::BlockDevice,
            EntryKind::Fifo => FileType::Fifo,
        };
        if file_type != expected_type {
            problem(format!(
                "is a {file_type:?}, the index says {:?}",
                entry.kind
            ));
            continue;
        }
        if entry.kind == EntryKind::Whiteout {
            if stat.st_rdev != 0 {
                problem("whiteout is not a 0:0 device".into());
            }
            continue;
        }
        if entry.kind != EntryKind::Symlink && stat.st_mode & 0o7777 != entry.mode {
            problem(format!(
                "mode {:o}, the index says {:o}",
                stat.st_mode & 0o7777,
                entry.mode
            ));
        }
        if (u64::from(stat.st_uid), u64::from(stat.st_gid)) != (entry.uid, entry.gid) {
            problem(format!(
                "owner {}:{}, the index says {}:{}",
                stat.st_uid, stat.st_gid, entry.uid, entry.gid
            ));
        }
        if (stat.st_mtime, stat.st_mtime_nsec as u32) != (entry.mtime, entry.mtime_nsec)
            && !entry.implied
        {
            problem(format!(
                "mtime {}.{:09}, the index says {}.{:09}",
                stat.st_mtime, stat.st_mtime_nsec, entry.mtime, entry.mtime_nsec
            ));
        }
        if let Some((major, minor)) = entry.device
            && stat.st_rdev != rustix::fs::makedev(major, minor)
        {
            problem("device numbers differ".into());
        }
        if entry.kind == EntryKind::Symlink {
            let target = tree.parent(&entry.path).ok().and_then(|(dir, name)| {
                rustix::fs::readlinkat(&dir, std::ffi::OsStr::from_bytes(name), Vec::new()).ok()
            });
            if target.as_ref().map(|t| t.as_bytes()) != entry.link.as_deref() {
                problem("symlink target differs".into());
            }
            continue;
        }
        if entry.kind == EntryKind::File {
            if stat.st_size as u64 != entry.size {
                problem(format!(
                    "size {}, the index says {}",
                    stat.st_size, entry.size
                ));
            } else if populated(i) {
                match content_digest(tree, entry) {
                    Ok(digest) if Some(digest) == entry.digest => {}
                    Ok(_) => problem("content differs from the index".into()),
                    Err(e) => problem(format!("cannot read: {e}")),
                }
            }
        }
        if matches!(entry.kind, EntryKind::File | EntryKind::Dir) {
            for (name, value) in &entry.xattrs {
                let fd = tree.open_entry(
                    &entry.path,
                    if entry.kind == EntryKind::Dir {
                        OFlags::RDONLY | OFlags::DIRECTORY
                    } else {
                        OFlags::RDONLY
                    },
                );
                let mut buffer = vec![0u8; 64 << 10];
                let got = fd.ok().and_then(|fd| {
                    rustix::fs::fgetxattr(&fd, std::ffi::OsStr::from_bytes(name), &mut buffer[..])
                        .ok()
                });
                if got.map(|n| &buffer[..n]) != Some(value.as_slice()) {
                    problem(format!("xattr {} differs", String::from_utf8_lossy(name)));
                }
            }
        }
    }
    problems
}

/// sha256 of a file's stored bytes (for sparse files, its data segments back to back).
fn content_digest(tree: &LayerTree, entry: &lazylayer_index::Entry) -> std::io::Result<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let fd = tree
        .open_entry(&entry.path, OFlags::RDONLY)
        .map_err(std::io::Error::other)?;
    let file = std::fs::File::from(fd);
    let mut hasher = Sha256::new();
    let segments = entry
        .sparse
        .clone()
        .unwrap_or_else(|| vec![(0, entry.size)]);
    let mut buffer = vec![0u8; 256 << 10];
    for (offset, len) in segments {
        let mut position = offset;
        while position < offset + len {
            let want = ((offset + len - position) as usize).min(buffer.len());
            file.read_exact_at(&mut buffer[..want], position)?;
            hasher.update(&buffer[..want]);
            position += want as u64;
        }
    }
    Ok(hasher.finalize().into())
}
