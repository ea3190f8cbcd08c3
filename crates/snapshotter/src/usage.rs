//! Disk usage of a snapshot's directory as `du` counts it: allocated blocks, not file sizes,
//! so that a lazy layer's sparse placeholders count for what they really hold, and each
//! hardlinked inode once. kubelet's image garbage collection reads this.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes allocated and inodes under `root` (not following symlinks, not crossing into other
/// filesystems).
pub fn disk_usage(root: &Path) -> std::io::Result<(u64, u64)> {
    let top = std::fs::symlink_metadata(root)?;
    let device = top.dev();
    let mut seen = HashSet::new();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            // Removed while walking (a container's upper changes under us).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if metadata.dev() != device {
            continue;
        }
        if seen.insert(metadata.ino()) {
            bytes += metadata.blocks() * 512;
            inodes += 1;
        }
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_files_count_their_blocks_and_hardlinks_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        std::fs::write(dir.path().join("data"), vec![7u8; 64 << 10]).unwrap();
        std::fs::hard_link(dir.path().join("data"), dir.path().join("link")).unwrap();
        let (bytes, inodes) = disk_usage(dir.path()).unwrap();
        assert_eq!(inodes, 3, "the directory, the sparse file, the data once");
        assert!(((64 << 10)..(1 << 20)).contains(&bytes), "{bytes} bytes");
    }
}
