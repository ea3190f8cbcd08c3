//! Which directories mounts use, in every mount namespace of the machine: a container made by
//! `lazylayer run` mounts its overlay in a namespace of its own, where the host's
//! `/proc/self/mountinfo` does not show it. Garbage collection asks this before removing a
//! layer or a writable directory.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The mount tables of every mount namespace, as text with mountinfo's octal escapes decoded.
#[derive(Debug, Default)]
pub struct MountTables {
    text: String,
}

impl MountTables {
    /// Reads `/proc/PID/mountinfo` once per mount namespace (processes that exit meanwhile are
    /// skipped).
    pub fn scan() -> std::io::Result<MountTables> {
        let mut namespaces = HashSet::new();
        let mut text = String::new();
        for entry in std::fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(namespace) = std::fs::metadata(entry.path().join("ns/mnt")) else {
                continue;
            };
            if !namespaces.insert((namespace.dev(), namespace.ino())) {
                continue;
            }
            if let Ok(table) = std::fs::read(entry.path().join("mountinfo")) {
                text.push_str(&decode(&String::from_utf8_lossy(&table)));
                text.push('\n');
            }
        }
        Ok(MountTables { text })
    }

    /// Tables from mountinfo text (for tests).
    pub fn from_text(text: &str) -> MountTables {
        MountTables { text: decode(text) }
    }

    /// Whether some mount names `path` (as a mount point, source, or in its options such as
    /// an overlay's `lowerdir`/`upperdir`) — exactly that path, not one it is a prefix of.
    pub fn uses(&self, path: &Path) -> bool {
        names(&self.text, path)
    }

    /// Whether an overlay mount names `path` (as a layer, or its upper or work directory).
    pub fn overlay_uses(&self, path: &Path) -> bool {
        self.text
            .lines()
            .filter(|line| line.contains(" - overlay "))
            .any(|line| names(line, path))
    }
}

/// Whether `text` names `path` exactly (not a longer path it is a prefix of).
fn names(text: &str, path: &Path) -> bool {
    let needle = path.to_string_lossy();
    let mut rest = text;
    while let Some(at) = rest.find(needle.as_ref()) {
        let after = rest[at + needle.len()..].chars().next();
        if matches!(after, None | Some(',' | ':' | ' ' | '\n' | '/')) {
            return true;
        }
        rest = &rest[at + needle.len()..];
    }
    false
}

/// Decodes mountinfo's `\ooo` escapes (space, tab, newline, backslash, comma).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_lower_among_overlay_options_with_escapes() {
        let tables = MountTables::from_text(
            "36 25 0:40 / /run/x rw - overlay lazylayer rw,lowerdir+=/var/lib/my\\040store/layers/sha256/ab/fs,upperdir=/u\n",
        );
        assert!(tables.uses(Path::new("/var/lib/my store/layers/sha256/ab/fs")));
        assert!(!tables.uses(Path::new("/var/lib/my store/layers/sha256/a")));
        assert!(!tables.uses(Path::new("/var/lib/my store/layers/sha256/cd/fs")));
        assert!(tables.uses(Path::new("/u")));
        assert!(tables.overlay_uses(Path::new("/u")));
        let fuse =
            MountTables::from_text("40 25 0:41 / /root/fuse/ab rw - fuse.lazylayer lazylayer rw\n");
        assert!(fuse.uses(Path::new("/root/fuse/ab")));
        assert!(!fuse.overlay_uses(Path::new("/root/fuse/ab")));
    }
}
