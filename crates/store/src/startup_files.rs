//! Files nearly every container start opens, whatever its workload: the runtime's user and
//! group lookup, the dynamic linker at its ABI-fixed paths, the linker's cache and the C
//! library. A lazy layer holding them has them fetched first, like a recorded profile's files,
//! so that a first start without a profile does not wait for each of them in turn.

use std::collections::HashMap;

use lazylayer_index::{EntryKind, LayerIndex};

/// The paths (in a layer, without the leading `/`) of [`startup_files`]. Symlinks in the
/// layer are followed, so `lib64/ld-linux-x86-64.so.2` finds the linker on merged-`/usr`
/// distributions too.
pub const COMMON_STARTUP_PATHS: &[&str] = &[
    "etc/passwd",
    "etc/group",
    "etc/ld.so.cache",
    // ELF interpreters (fixed by each architecture's ABI).
    "lib64/ld-linux-x86-64.so.2",
    "lib/ld-linux-aarch64.so.1",
    "lib/ld-musl-x86_64.so.1",
    "lib/ld-musl-aarch64.so.1",
    // glibc, where Debian, Ubuntu, Fedora and their relatives keep it.
    "lib/x86_64-linux-gnu/libc.so.6",
    "lib/aarch64-linux-gnu/libc.so.6",
    "lib64/libc.so.6",
    "usr/lib64/libc.so.6",
];

/// Most symlinks followed while resolving one path (a loop ends here).
const MAX_HOPS: usize = 16;

/// The regular files of `index` that [`COMMON_STARTUP_PATHS`] name, in that order, each once,
/// symlinks and hard links within the layer followed.
pub fn startup_files(index: &LayerIndex) -> Vec<usize> {
    let by_path: HashMap<&[u8], usize> = index
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_slice(), i))
        .collect();
    let mut found = Vec::new();
    for path in COMMON_STARTUP_PATHS {
        if let Some(i) = resolve(index, &by_path, path.as_bytes())
            && !found.contains(&i)
        {
            found.push(i);
        }
    }
    found
}

/// The regular file `path` leads to inside the layer, if it does.
fn resolve(index: &LayerIndex, by_path: &HashMap<&[u8], usize>, path: &[u8]) -> Option<usize> {
    let mut pending: Vec<Vec<u8>> = components(path);
    pending.reverse();
    let mut resolved: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        match name.as_slice() {
            b"." => continue,
            b".." => {
                resolved.pop();
                continue;
            }
            _ => resolved.push(name),
        }
        let here = resolved.join(&b'/');
        let entry = &index.entries[*by_path.get(here.as_slice())?];
        if entry.kind != EntryKind::Symlink {
            continue;
        }
        hops += 1;
        if hops > MAX_HOPS {
            return None;
        }
        let target = entry.link.as_deref()?;
        resolved.pop();
        if target.starts_with(b"/") {
            resolved.clear();
        }
        for part in components(target).into_iter().rev() {
            pending.push(part);
        }
    }
    let i = *by_path.get(resolved.join(&b'/').as_slice())?;
    let entry = &index.entries[i];
    match entry.kind {
        EntryKind::File => Some(i),
        EntryKind::Hardlink => {
            let target = *by_path.get(entry.link.as_deref()?)?;
            (index.entries[target].kind == EntryKind::File).then_some(target)
        }
        _ => None,
    }
}

fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_source::{BlobDescriptor, Digest};
    use sha2::Digest as _;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    /// The index of a plain tar of `dir`, made by GNU tar.
    fn index_of(dir: &std::path::Path) -> LayerIndex {
        let output = Command::new("tar")
            .args(["--numeric-owner", "--sort=name", "-cf", "-", "-C"])
            .arg(dir)
            .arg(".")
            .output()
            .unwrap();
        assert!(output.status.success());
        let blob = output.stdout;
        let descriptor = BlobDescriptor {
            digest: format!("sha256:{:x}", sha2::Sha256::digest(&blob))
                .parse::<Digest>()
                .unwrap(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            size: blob.len() as u64,
        };
        lazylayer_index::build_from_reader(
            std::io::Cursor::new(blob),
            &descriptor,
            None,
            lazylayer_index::BuildOptions::default(),
        )
        .unwrap()
    }

    fn paths(index: &LayerIndex, found: &[usize]) -> Vec<String> {
        found
            .iter()
            .map(|&i| index.entries[i].display_path())
            .collect()
    }

    #[test]
    fn merged_usr_symlinks_and_hard_links_lead_to_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["etc", "usr/lib/x86_64-linux-gnu", "usr/lib64"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::hard_link(root.join("etc/passwd"), root.join("etc/group")).unwrap();
        std::fs::write(
            root.join("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            "ld",
        )
        .unwrap();
        std::fs::write(root.join("usr/lib/x86_64-linux-gnu/libc.so.6"), "libc").unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("usr/lib64", root.join("lib64")).unwrap();
        symlink(
            "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            root.join("usr/lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        // A loop, and a link climbing above the root (which stays at the root, as in a
        // container): neither is a file.
        symlink("libc.so.6", root.join("usr/lib64/libc.so.6")).unwrap();
        symlink("../../../../etc/ld.so.cache", root.join("etc/ld.so.cache")).unwrap();
        let index = index_of(root);
        let found = startup_files(&index);
        // etc/passwd and etc/group are one file (tar stores the first name it meets, group,
        // and the other as a hard link to it): listed once.
        assert_eq!(
            paths(&index, &found),
            [
                "etc/group",
                "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "usr/lib/x86_64-linux-gnu/libc.so.6",
            ]
        );
    }

    #[test]
    fn a_layer_without_them_has_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/main.py"), "print(1)\n").unwrap();
        symlink("/app/main.py", dir.path().join("lib64")).unwrap();
        assert!(startup_files(&index_of(dir.path())).is_empty());
    }
}
