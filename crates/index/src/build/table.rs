//! The file table from the tar stream, resolved the way extraction resolves it: duplicates
//! replace earlier entries (a non-directory replacing a directory removes what was under it),
//! parents that are not listed are implied, hardlinks point at the file they share an inode
//! with, and OCI whiteouts become whiteout entries and opaque flags.
//!
//! A hardlink names an inode, not a path: when its target path is replaced or removed later
//! in the layer, extraction unlinks the path and the link keeps the old file. So the first
//! link to a replaced entry takes the entry over (data, digest, metadata), the other links
//! point at it, and every link stays after the entry it points at.
//!
//! Why one file of this size: more than 300 of its lines are tests of extraction's corner cases.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io::Read;

use hashbrown::HashTable;

use super::slots::Slots;
use crate::entry::{Entry, EntryKind};
use crate::format::valid_path;
use crate::{Error, Result};

/// Where whiteout names start.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// The most tar entries (duplicates included) a layer may have. Indexing holds about 350
/// bytes per entry (a million empty files peak at 345 MiB), so this bounds a hostile layer of
/// tiny entries; real layers stay far below it.
pub const MAX_ENTRIES: usize = 2_000_000;

/// Collects entries in archive order with last-wins replacement.
pub struct Table<S = Vec<Option<Entry>>> {
    layer: String,
    slots: S,
    /// The slot of each path in the table: slot numbers only, hashed by the path the slot
    /// holds. A map keyed by a copy of every path held each path twice: the worker's peak,
    /// while the check of a whole layer builds this table beside the index in use, was 3-4 MiB
    /// higher on a layer of 100,000 files. Every slot it names is occupied.
    by_path: HashTable<usize>,
    /// Randomly keyed, as the paths come from the layer.
    hasher: RandomState,
    /// The slots of the hardlinks to each path (ascending; some may have been replaced since).
    links: HashMap<Vec<u8>, Vec<usize>>,
    max_entries: usize,
}

impl Table {
    pub fn new(layer: &str) -> Self {
        Table::with_limit(layer, MAX_ENTRIES)
    }

    /// A table that refuses a layer of more than `max_entries` entries.
    pub fn with_limit(layer: &str, max_entries: usize) -> Self {
        Table::in_slots(layer, Vec::new(), max_entries)
    }

    /// The entries in archive order.
    pub fn finish(self) -> Vec<Entry> {
        let Table {
            mut slots, by_path, ..
        } = self;
        drop(by_path);
        // In place: a layer of a million entries must not need its table twice over.
        slots.retain(Option::is_some);
        slots.into_iter().map(|slot| slot.expect("kept")).collect()
    }
}

impl<S: Slots> Table<S> {
    /// A table keeping its entries in `slots` (see [`Slots`]).
    pub fn in_slots(layer: &str, slots: S, max_entries: usize) -> Self {
        Table {
            layer: layer.to_string(),
            slots,
            by_path: HashTable::new(),
            hasher: RandomState::new(),
            links: HashMap::new(),
            max_entries,
        }
    }

    /// The slots, once every entry is in.
    pub fn into_slots(self) -> S {
        self.slots
    }

    fn bad(&self, path: &[u8], reason: impl Into<String>) -> Error {
        Error::BadEntry {
            layer: self.layer.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        }
    }

    fn get(&self, path: &[u8]) -> Option<&Entry> {
        self.slot_of(path).and_then(|i| self.slots.get(i))
    }

    /// The slot holding `path`.
    fn slot_of(&self, path: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.by_path
            .find(self.hasher.hash_one(path), |&i| holds(slots, i, path))
            .copied()
    }

    /// Forgets where `path` is; its slot, if it had one.
    fn unindex(&mut self, path: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        let found = self
            .by_path
            .find_entry(self.hasher.hash_one(path), |&i| holds(slots, i, path));
        found.ok().map(|entry| entry.remove().0)
    }

    /// Removes the entry at `path` (with everything under it, for a directory); links to a
    /// removed entry keep it (see [`promote_link`](Self::promote_link)).
    fn remove(&mut self, path: &[u8]) {
        let Some(i) = self.unindex(path) else {
            return;
        };
        let Some(removed) = self.slots.take(i) else {
            return;
        };
        let mut gone = vec![removed];
        if gone[0].kind == EntryKind::Dir {
            let mut prefix = path.to_vec();
            prefix.push(b'/');
            let slots = &self.slots;
            let mut below = Vec::new();
            self.by_path.retain(|&mut j| {
                let under =
                    path.is_empty() || slots.get(j).is_some_and(|e| e.path.starts_with(&prefix));
                if under {
                    below.push(j);
                }
                !under
            });
            below.sort_unstable();
            gone.extend(below.into_iter().filter_map(|j| self.slots.take(j)));
        }
        // Links are promoted once everything is gone, so a link inside a removed directory
        // is not promoted.
        for entry in gone {
            if !matches!(
                entry.kind,
                EntryKind::Dir | EntryKind::Hardlink | EntryKind::Whiteout
            ) {
                self.promote_link(entry);
            }
        }
    }

    /// `removed` left the table: its first remaining hardlink becomes it (its inode lives
    /// on under the link's name: same data, digest and metadata) and the other links point at
    /// that one. The promoted link keeps its place, which is after the removed entry's and
    /// before the other links'.
    fn promote_link(&mut self, removed: Entry) {
        let Some(slots) = self.links.remove(&removed.path) else {
            return;
        };
        let mut live: Vec<usize> = slots
            .into_iter()
            .filter(|&j| {
                self.slots.get(j).is_some_and(|e| {
                    e.kind == EntryKind::Hardlink && e.link.as_deref() == Some(&removed.path[..])
                })
            })
            .collect();
        live.sort_unstable();
        let Some((&first, rest)) = live.split_first() else {
            return;
        };
        let link_path = self.slots.get(first).expect("a live link").path.clone();
        for &j in rest {
            self.slots
                .modify(j, |link| link.link = Some(link_path.clone()));
        }
        if !rest.is_empty() {
            self.links
                .entry(link_path.clone())
                .or_default()
                .extend_from_slice(rest);
        }
        self.slots.modify(first, |link| {
            *link = Entry {
                path: link_path,
                ..removed
            }
        });
    }

    /// Adds `entry` in a new slot; nothing holds its path yet.
    fn push(&mut self, entry: Entry) {
        let hash = self.hasher.hash_one(&entry.path);
        self.slots.push(entry);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_path.insert_unique(hash, slots.count() - 1, |&i| {
            hasher.hash_one(&slots.get(i).expect("indexed slots are occupied").path)
        });
    }

    /// Makes sure every parent of `path` is a directory, implying missing ones.
    fn ensure_parents(&mut self, path: &[u8], template: &Entry) -> Result<()> {
        let mut end = 0;
        while let Some(slash) = path[end..].iter().position(|b| *b == b'/') {
            let parent = &path[..end + slash];
            match self.get(parent).map(|e| e.kind) {
                Some(EntryKind::Dir) => {}
                Some(_) => return Err(self.bad(path, "is under a path that is not a directory")),
                None => self.push(Entry {
                    path: parent.to_vec(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: template.mtime,
                    mtime_nsec: 0,
                    size: 0,
                    link: None,
                    device: None,
                    xattrs: Vec::new(),
                    data_offset: 0,
                    sparse: None,
                    digest: None,
                    opaque: false,
                    implied: true,
                }),
            }
            end += slash + 1;
        }
        Ok(())
    }

    /// Adds an entry whose raw tar name is `raw_path`.
    pub fn add(&mut self, raw_path: &[u8], mut entry: Entry) -> Result<()> {
        if self.slots.count() >= self.max_entries {
            return Err(self.bad(
                raw_path,
                format!(
                    "is past lazylayer's limit of {} entries in one layer",
                    self.max_entries
                ),
            ));
        }
        let path = normalise(raw_path)
            .ok_or_else(|| self.bad(raw_path, "has a `..` component or a NUL byte"))?;
        let (parent, name) = match path.iter().rposition(|b| *b == b'/') {
            Some(slash) => (&path[..slash], &path[slash + 1..]),
            None => (&path[..0], &path[..]),
        };
        if name == OPAQUE_MARKER {
            let parent = parent.to_vec();
            let dir = Entry {
                path: parent.clone(),
                kind: EntryKind::Dir,
                ..entry
            };
            self.ensure_parents(&path, &dir)?;
            if parent.is_empty() && self.get(b"").is_none() {
                self.push(Entry {
                    implied: true,
                    mode: 0o755,
                    ..dir
                });
            }
            let slot = self
                .slot_of(&parent)
                .expect("its parents were just ensured");
            self.slots.modify(slot, |dir| dir.opaque = true);
            return Ok(());
        }
        if name.starts_with(WHITEOUT_PREFIX) {
            let target = &name[WHITEOUT_PREFIX.len()..];
            if target.starts_with(WHITEOUT_PREFIX) {
                // aufs bookkeeping (.wh..wh.plnk and friends): not part of the filesystem.
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(self.bad(raw_path, "is a whiteout of an invalid name"));
            }
            let mut hidden = parent.to_vec();
            if !hidden.is_empty() {
                hidden.push(b'/');
            }
            hidden.extend_from_slice(target);
            entry = Entry {
                path: hidden,
                kind: EntryKind::Whiteout,
                size: 0,
                link: None,
                device: None,
                sparse: None,
                digest: None,
                data_offset: 0,
                ..entry
            };
        } else {
            entry.path = path.clone();
        }
        if entry.path.is_empty() && entry.kind != EntryKind::Dir {
            return Err(self.bad(raw_path, "the layer root must be a directory"));
        }
        self.ensure_parents(&entry.path.clone(), &entry)?;
        let existing = self.get(&entry.path).map(|e| e.kind);
        if entry.kind == EntryKind::Dir && existing == Some(EntryKind::Dir) {
            // A directory listed again: its metadata is replaced, its contents stay.
            let slot = self.slot_of(&entry.path).expect("present");
            self.slots.modify(slot, |old| {
                entry.opaque |= old.opaque;
                *old = entry;
            });
            return Ok(());
        }
        let mut link_target = None;
        if entry.kind == EntryKind::Hardlink {
            let raw_target = entry.link.clone().unwrap_or_default();
            let target = normalise(&raw_target)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| self.bad(raw_path, "is a hardlink to an invalid path"))?;
            if target == entry.path {
                // GNU tar archives a path listed twice as a hardlink to itself; extracting it
                // leaves the file as it is.
                return match existing {
                    Some(kind) if kind != EntryKind::Dir && kind != EntryKind::Whiteout => Ok(()),
                    _ => Err(self.bad(raw_path, "is a hardlink to itself")),
                };
            }
            link_target = Some(target);
        }
        // The old entry goes first: a hardlink that replaces its target's other name (`a`
        // linked to `b` where `b` is a link to `a`) points at what `b` keeps.
        if existing.is_some() {
            self.remove(&entry.path.clone());
        }
        if let Some(target) = link_target {
            // Point at the file itself, not at another link to it.
            let resolved = match self.get(&target) {
                Some(e) if e.kind == EntryKind::Hardlink => e.link.clone().unwrap_or_default(),
                Some(e) if e.kind == EntryKind::Dir => {
                    return Err(self.bad(raw_path, "is a hardlink to a directory"));
                }
                Some(e) if e.kind == EntryKind::Whiteout => {
                    return Err(self.bad(raw_path, "is a hardlink to a deleted path"));
                }
                Some(_) => target,
                None => {
                    return Err(
                        self.bad(raw_path, "is a hardlink to a path not (yet) in the layer")
                    );
                }
            };
            self.links
                .entry(resolved.clone())
                .or_default()
                .push(self.slots.count());
            entry.link = Some(resolved);
        }
        self.push(entry);
        Ok(())
    }
}

/// Whether slot `i` holds `path`.
fn holds(slots: &impl Slots, i: usize, path: &[u8]) -> bool {
    slots.get(i).is_some_and(|e| e.path == path)
}

/// Strips leading `/` and `./`, drops empty and `.` components; refuses `..` and NUL.
pub fn normalise(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.contains(&0) {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return None,
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(component);
            }
        }
    }
    debug_assert!(valid_path(&out));
    Some(out)
}

/// Reads a GNU sparse 1.0 map from the start of an entry's data: the segment count, then
/// offset and length of each, one decimal number per line, padded to 512 bytes. Returns the
/// segments and the map's size in bytes.
pub fn read_sparse_map(
    data: &mut impl Read,
    size: u64,
    real_size: u64,
) -> std::result::Result<(Vec<(u64, u64)>, u64), String> {
    let mut consumed = 0u64;
    let mut line = Vec::new();
    let mut next_number = |consumed: &mut u64| -> std::result::Result<u64, String> {
        line.clear();
        loop {
            let mut byte = [0u8; 1];
            if *consumed >= size || data.read_exact(&mut byte).is_err() {
                return Err("the sparse map is truncated".into());
            }
            *consumed += 1;
            if byte[0] == b'\n' {
                break;
            }
            if line.len() > 20 || !byte[0].is_ascii_digit() {
                return Err("the sparse map is not decimal numbers".into());
            }
            line.push(byte[0]);
        }
        std::str::from_utf8(&line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "the sparse map has a bad number".to_string())
    };
    let count = next_number(&mut consumed)?;
    if count > 1 << 20 {
        return Err("the sparse map has too many segments".into());
    }
    let mut segments = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let offset = next_number(&mut consumed)?;
        let len = next_number(&mut consumed)?;
        push_segment(&mut segments, offset, len, real_size)?;
    }
    let padded = consumed.div_ceil(512) * 512;
    if padded > size {
        return Err("the sparse map is longer than the entry".into());
    }
    let mut rest = vec![0u8; (padded - consumed) as usize];
    data.read_exact(&mut rest)
        .map_err(|_| "the sparse map is truncated".to_string())?;
    Ok((segments, padded))
}

/// Parses GNU sparse 0.1's `GNU.sparse.map` ("offset,length,offset,length").
pub fn parse_sparse_map_01(
    map: &str,
    real_size: u64,
) -> std::result::Result<Vec<(u64, u64)>, String> {
    let numbers: Vec<u64> = map
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| "bad number in GNU.sparse.map".to_string())
        })
        .collect::<std::result::Result<_, _>>()?;
    if !numbers.len().is_multiple_of(2) {
        return Err("GNU.sparse.map has an odd count".into());
    }
    let mut segments = Vec::new();
    for pair in numbers.chunks(2) {
        push_segment(&mut segments, pair[0], pair[1], real_size)?;
    }
    Ok(segments)
}

/// Appends a sparse data segment; segments must be in order, apart, and inside the file.
fn push_segment(
    segments: &mut Vec<(u64, u64)>,
    offset: u64,
    len: u64,
    real_size: u64,
) -> std::result::Result<(), String> {
    let end = offset
        .checked_add(len)
        .ok_or("a sparse segment overflows")?;
    let previous_end = segments.last().map_or(0, |(o, l)| o + l);
    if offset < previous_end || end > real_size {
        return Err("the sparse map's segments overlap or pass the file size".into());
    }
    if len > 0 {
        segments.push((offset, len));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An empty regular file at `path` (other tests of the build build theirs from it).
    pub(crate) fn file(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_nsec: 0,
            size: 0,
            link: None,
            device: None,
            xattrs: vec![],
            data_offset: 0,
            sparse: None,
            digest: None,
            opaque: false,
            implied: false,
        }
    }

    #[test]
    fn a_layer_past_the_entry_limit_is_refused() {
        let mut table = Table::with_limit("l", 3);
        for name in ["a", "b", "a"] {
            table.add(name.as_bytes(), file(name)).unwrap();
        }
        // Duplicates count: each takes memory while indexing.
        let error = table.add(b"c", file("c")).unwrap_err().to_string();
        assert!(error.contains("limit of 3 entries"), "{error}");
    }

    fn dir(path: &str) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            mode: 0o700,
            ..file(path)
        }
    }

    fn paths(table: Table) -> Vec<(String, EntryKind, bool)> {
        table
            .finish()
            .into_iter()
            .map(|e| (e.display_path(), e.kind, e.implied))
            .collect()
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalise(b"./a//b/./c/").unwrap(), b"a/b/c");
        assert_eq!(normalise(b"/etc/passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalise(b"./").unwrap(), b"");
        assert!(normalise(b"a/../../etc").is_none());
        assert!(normalise(b"a\0b").is_none());
    }

    #[test]
    fn last_entry_wins_and_replacing_a_dir_drops_its_contents() {
        let mut t = Table::new("l");
        t.add(b"./d/", dir("")).unwrap();
        t.add(b"./d/f", file("")).unwrap();
        t.add(b"./g", file("")).unwrap();
        t.add(b"./d", file("")).unwrap();
        t.add(
            b"./g",
            Entry {
                mode: 0o600,
                ..file("")
            },
        )
        .unwrap();
        let entries = t.finish();
        let names: Vec<String> = entries.iter().map(|e| e.display_path()).collect();
        assert_eq!(names, ["d", "g"]);
        assert_eq!(entries[1].mode, 0o600);
        assert_eq!(entries[0].kind, EntryKind::File);
    }

    #[test]
    fn parents_are_implied_and_must_be_directories() {
        let mut t = Table::new("l");
        t.add(b"a/b/c", file("")).unwrap();
        assert!(t.add(b"a/b/c/d", file("")).is_err(), "under a file");
        assert_eq!(
            paths(t),
            vec![
                ("a".into(), EntryKind::Dir, true),
                ("a/b".into(), EntryKind::Dir, true),
                ("a/b/c".into(), EntryKind::File, false),
            ]
        );
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let mut t = Table::new("l");
        t.add(b"./etc/.wh.passwd", file("")).unwrap();
        t.add(b"./var/", dir("")).unwrap();
        t.add(b"./var/.wh..wh..opq", file("")).unwrap();
        t.add(b"./.wh..wh.plnk", file("")).unwrap();
        assert!(t.add(b"./.wh...", file("")).is_err());
        let entries = t.finish();
        let whiteout = entries.iter().find(|e| e.path == b"etc/passwd").unwrap();
        assert_eq!(whiteout.kind, EntryKind::Whiteout);
        let var = entries.iter().find(|e| e.path == b"var").unwrap();
        assert!(var.opaque && !var.implied);
        assert_eq!(entries.len(), 3, "etc implied, etc/passwd whiteout, var");
    }

    #[test]
    fn hardlinks_resolve_to_the_file() {
        let mut t = Table::new("l");
        t.add(b"a", file("")).unwrap();
        let link = |target: &str| Entry {
            kind: EntryKind::Hardlink,
            link: Some(target.as_bytes().to_vec()),
            ..file("")
        };
        t.add(b"b", link("./a")).unwrap();
        t.add(b"c", link("b")).unwrap();
        assert!(t.add(b"x", link("missing")).is_err());
        assert!(t.add(b"y", link("../etc/shadow")).is_err());
        t.add(b"dir/", dir("")).unwrap();
        assert!(t.add(b"z", link("dir")).is_err());
        let entries = t.finish();
        let c = entries.iter().find(|e| e.path == b"c").unwrap();
        assert_eq!(c.link.as_deref(), Some(&b"a"[..]));
    }

    fn hardlink(target: &str) -> Entry {
        Entry {
            kind: EntryKind::Hardlink,
            link: Some(target.as_bytes().to_vec()),
            ..file("")
        }
    }

    /// A file with data at `offset`, as the tar walker makes it.
    fn stored(offset: u64, size: u64, mark: u8) -> Entry {
        Entry {
            data_offset: offset,
            size,
            digest: Some([mark; 32]),
            mode: 0o640,
            uid: u64::from(mark),
            ..file("")
        }
    }

    /// Every hardlink points at an earlier entry that is not a directory, whiteout or link
    /// (what the store needs to create the links in order, and what validation checks).
    fn assert_links_follow_targets(entries: &[Entry]) {
        for (i, entry) in entries.iter().enumerate() {
            if entry.kind == EntryKind::Hardlink {
                let target = entry.link.as_deref().unwrap();
                let at = entries[..i].iter().position(|e| e.path == target);
                let at = at.unwrap_or_else(|| panic!("{} before its target", entry.display_path()));
                assert!(
                    !matches!(
                        entries[at].kind,
                        EntryKind::Dir | EntryKind::Whiteout | EntryKind::Hardlink
                    ),
                    "{} points at a {:?}",
                    entry.display_path(),
                    entries[at].kind
                );
            }
        }
    }

    fn summary(entries: &[Entry]) -> Vec<(String, EntryKind, Option<String>, u64)> {
        entries
            .iter()
            .map(|e| {
                let link = e.link.as_deref().map(|l| String::from_utf8_lossy(l).into());
                (e.display_path(), e.kind, link, e.data_offset)
            })
            .collect()
    }

    #[test]
    fn a_hardlink_keeps_the_content_of_a_replaced_target() {
        let mut t = Table::new("l");
        t.add(b"a", stored(1000, 3, 1)).unwrap();
        t.add(b"b", hardlink("a")).unwrap();
        t.add(b"c", hardlink("./b")).unwrap();
        t.add(b"a", stored(5000, 5, 2)).unwrap();
        let entries = t.finish();
        assert_links_follow_targets(&entries);
        assert_eq!(
            summary(&entries),
            vec![
                ("b".into(), EntryKind::File, None, 1000),
                ("c".into(), EntryKind::Hardlink, Some("b".into()), 0),
                ("a".into(), EntryKind::File, None, 5000),
            ]
        );
        // b is the old a under another name: its data, digest, size and metadata.
        assert_eq!(
            entries[0],
            Entry {
                path: b"b".to_vec(),
                ..stored(1000, 3, 1)
            }
        );
        assert_eq!(entries[2].digest, Some([2; 32]));
    }

    #[test]
    fn a_hardlink_keeps_its_file_when_the_target_becomes_a_directory() {
        let mut t = Table::new("l");
        t.add(b"a", stored(1000, 3, 1)).unwrap();
        t.add(b"b", hardlink("a")).unwrap();
        t.add(b"a/", dir("")).unwrap();
        t.add(b"a/x", stored(3000, 1, 3)).unwrap();
        let error = t.add(b"z", hardlink("a")).unwrap_err().to_string();
        assert!(error.contains("hardlink to a directory"), "{error}");
        let entries = t.finish();
        assert_links_follow_targets(&entries);
        assert_eq!(
            summary(&entries),
            vec![
                ("b".into(), EntryKind::File, None, 1000),
                ("a".into(), EntryKind::Dir, None, 0),
                ("a/x".into(), EntryKind::File, None, 3000),
            ]
        );
        assert_eq!(entries[0].digest, Some([1; 32]));
    }

    #[test]
    fn a_hardlink_keeps_its_file_when_the_target_becomes_a_symlink() {
        let mut t = Table::new("l");
        t.add(b"a", stored(1000, 3, 1)).unwrap();
        t.add(b"b", hardlink("a")).unwrap();
        t.add(b"c", hardlink("a")).unwrap();
        let symlink = |target: &str| Entry {
            kind: EntryKind::Symlink,
            link: Some(target.as_bytes().to_vec()),
            ..file("")
        };
        t.add(b"a", symlink("elsewhere")).unwrap();
        // A link to a symlink (GNU tar writes those) keeps the symlink the same way.
        t.add(b"s", symlink("target")).unwrap();
        t.add(b"s2", hardlink("s")).unwrap();
        t.add(b"s", stored(4000, 1, 4)).unwrap();
        let entries = t.finish();
        assert_links_follow_targets(&entries);
        assert_eq!(
            summary(&entries),
            vec![
                ("b".into(), EntryKind::File, None, 1000),
                ("c".into(), EntryKind::Hardlink, Some("b".into()), 0),
                ("a".into(), EntryKind::Symlink, Some("elsewhere".into()), 0),
                ("s2".into(), EntryKind::Symlink, Some("target".into()), 0),
                ("s".into(), EntryKind::File, None, 4000),
            ]
        );
    }

    #[test]
    fn links_survive_whiteouts_relinks_and_removed_directories() {
        let mut t = Table::new("l");
        // A whiteout in the same layer removes the name, not the inode.
        t.add(b"a", stored(1000, 3, 1)).unwrap();
        t.add(b"b", hardlink("a")).unwrap();
        t.add(b".wh.a", file("")).unwrap();
        // `p` relinked to its own other name: both name the old file.
        t.add(b"p", stored(2000, 2, 2)).unwrap();
        t.add(b"q", hardlink("p")).unwrap();
        t.add(b"p", hardlink("q")).unwrap();
        // A directory replaced by a file: a link from outside keeps a file that was inside,
        // a link inside goes with the directory.
        t.add(b"d/", dir("")).unwrap();
        t.add(b"d/f", stored(3000, 1, 3)).unwrap();
        t.add(b"d/g", hardlink("d/f")).unwrap();
        t.add(b"out", hardlink("d/f")).unwrap();
        t.add(b"d", stored(4000, 1, 4)).unwrap();
        // GNU tar writes a path archived twice as a link to itself: the file stays.
        t.add(b"out", hardlink("out")).unwrap();
        assert!(t.add(b"new", hardlink("new")).is_err(), "no file to stay");
        let entries = t.finish();
        assert_links_follow_targets(&entries);
        assert_eq!(
            summary(&entries),
            vec![
                ("b".into(), EntryKind::File, None, 1000),
                ("a".into(), EntryKind::Whiteout, None, 0),
                ("q".into(), EntryKind::File, None, 2000),
                ("p".into(), EntryKind::Hardlink, Some("q".into()), 0),
                ("out".into(), EntryKind::File, None, 3000),
                ("d".into(), EntryKind::File, None, 4000),
            ]
        );
    }

    #[test]
    fn escaping_paths_are_refused() {
        let mut t = Table::new("l");
        let err = t.add(b"../../etc/cron.d/x", file("")).unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
    }

    #[test]
    fn sparse_maps() {
        let text = b"2\n0\n4\n1000\n6\n";
        let mut data = text.to_vec();
        data.resize(512 + 10, b'x');
        let (segments, len) = read_sparse_map(&mut &data[..], data.len() as u64, 2000).unwrap();
        assert_eq!(segments, vec![(0, 4), (1000, 6)]);
        assert_eq!(len, 512);
        assert!(
            read_sparse_map(&mut &b"1\n5\n4\n"[..], 6, 100).is_err(),
            "truncated padding"
        );
        assert!(
            read_sparse_map(&mut &b"1\n99\n4\n"[..], 512, 100).is_err(),
            "past the size"
        );
        assert_eq!(
            parse_sparse_map_01("0,4,10,2", 100).unwrap(),
            vec![(0, 4), (10, 2)]
        );
        assert!(parse_sparse_map_01("10,4,0,2", 100).is_err());
    }
}
