//! Inode numbers and directory listings of a layer, from its index. Numbers are the entry's
//! position in the index plus two (the root is 1, as FUSE wants), so they are the same at every
//! mount and after every daemon restart; a hardlink has the number of the file it links to.

use std::collections::HashMap;

use lazylayer_index::{EntryKind, LayerIndex};

/// FUSE's root inode number.
pub const ROOT: u64 = 1;

/// The layer's inode numbers and directory children.
pub struct InodeTable {
    /// The index entry of the root directory, if the layer lists one.
    root: Option<usize>,
    /// Children of each directory inode, sorted by name: (name, entry index).
    children: HashMap<u64, Vec<(Vec<u8>, usize)>>,
    /// The entry that holds each inode's metadata (for hardlinks, the file they link to).
    by_ino: HashMap<u64, usize>,
    /// Links to each file inode.
    nlink: HashMap<u64, u32>,
    /// The file entry each hardlink entry links to.
    hardlinks: HashMap<usize, usize>,
}

impl InodeTable {
    /// Builds the table of `index`.
    pub fn new(index: &LayerIndex) -> InodeTable {
        let entries = &index.entries;
        let by_path: HashMap<&[u8], usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_slice(), i))
            .collect();
        let root = by_path.get(&b""[..]).copied();
        let mut table = InodeTable {
            root,
            children: HashMap::new(),
            by_ino: HashMap::new(),
            nlink: HashMap::new(),
            hardlinks: HashMap::new(),
        };
        table.children.insert(ROOT, Vec::new());
        for (i, entry) in entries.iter().enumerate() {
            if entry.path.is_empty() {
                continue;
            }
            let (parent, name) = match entry.path.iter().rposition(|b| *b == b'/') {
                Some(slash) => (&entry.path[..slash], &entry.path[slash + 1..]),
                None => (&b""[..], &entry.path[..]),
            };
            let parent_ino = match by_path.get(parent) {
                Some(&p) if !parent.is_empty() => p as u64 + 2,
                _ => ROOT,
            };
            table
                .children
                .entry(parent_ino)
                .or_default()
                .push((name.to_vec(), i));
            let target = match entry.kind {
                EntryKind::Hardlink => entry
                    .link
                    .as_deref()
                    .and_then(|l| by_path.get(l).copied())
                    .unwrap_or(i),
                _ => i,
            };
            if target != i {
                table.hardlinks.insert(i, target);
            }
            let ino = target as u64 + 2;
            table.by_ino.insert(ino, target);
            if entry.kind == EntryKind::Dir {
                table.children.entry(i as u64 + 2).or_default();
            } else {
                *table.nlink.entry(ino).or_default() += 1;
            }
        }
        for list in table.children.values_mut() {
            list.sort();
        }
        table
    }

    /// The inode number of entry `i` (a hardlink's is its target's).
    pub fn ino_of(&self, index: &LayerIndex, i: usize) -> u64 {
        if index.entries[i].path.is_empty() {
            return ROOT;
        }
        self.hardlinks.get(&i).copied().unwrap_or(i) as u64 + 2
    }

    /// The entry holding inode `ino`'s metadata; `None` for the root when the layer lists none.
    pub fn entry(&self, ino: u64) -> Option<Option<usize>> {
        if ino == ROOT {
            return Some(self.root);
        }
        self.by_ino.get(&ino).map(|&i| Some(i))
    }

    /// Whether `ino` is a directory of this layer.
    pub fn is_dir(&self, ino: u64) -> bool {
        self.children.contains_key(&ino)
    }

    /// The child `name` of directory `parent`: its entry index.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<usize> {
        let children = self.children.get(&parent)?;
        children
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|k| children[k].1)
    }

    /// The children of directory `parent`, sorted by name.
    pub fn children(&self, parent: u64) -> &[(Vec<u8>, usize)] {
        self.children.get(&parent).map_or(&[], |c| c.as_slice())
    }

    /// Links to inode `ino` (directories: 2 plus subdirectories).
    pub fn nlink(&self, index: &LayerIndex, ino: u64) -> u32 {
        if self.is_dir(ino) {
            let subdirs = self
                .children(ino)
                .iter()
                .filter(|(_, i)| index.entries[*i].kind == EntryKind::Dir)
                .count();
            return 2 + subdirs as u32;
        }
        self.nlink.get(&ino).copied().unwrap_or(1)
    }
}
