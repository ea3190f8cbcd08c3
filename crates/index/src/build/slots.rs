//! Where the tar table keeps its entries. Building an index keeps each entry whole. Checking an
//! index in use against its verified blob keeps, for each entry the walk makes that equals the
//! index's entry at that place, only that entry's number: the rebuilt table of a 100,000-entry
//! layer took about 25 MiB beside the index in use (a third of the worker's peak while the
//! check ran), and its entries almost always equal the index's.

use crate::entry::Entry;

/// The entries of a table, by slot number; a slot is emptied when its entry leaves the table.
pub trait Slots {
    /// How many slots there are, emptied ones included.
    fn count(&self) -> usize;
    /// The entry in slot `i`.
    fn get(&self, i: usize) -> Option<&Entry>;
    /// Changes the entry in slot `i` (nothing when the slot is empty).
    fn modify(&mut self, i: usize, change: impl FnOnce(&mut Entry));
    /// Empties slot `i`, returning its entry.
    fn take(&mut self, i: usize) -> Option<Entry>;
    /// Adds a slot holding `entry`.
    fn push(&mut self, entry: Entry);
}

impl Slots for Vec<Option<Entry>> {
    fn count(&self) -> usize {
        self.len()
    }

    fn get(&self, i: usize) -> Option<&Entry> {
        self[i].as_ref()
    }

    fn modify(&mut self, i: usize, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self[i].as_mut() {
            change(entry);
        }
    }

    fn take(&mut self, i: usize) -> Option<Entry> {
        self[i].take()
    }

    fn push(&mut self, entry: Entry) {
        Vec::push(self, Some(entry));
    }
}

/// How an entry of the rebuilt table must equal the index's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sameness {
    /// In every field.
    Whole,
    /// In every field but `data_offset`: an index made from a table of contents places file
    /// data in a stream of file data only.
    ButDataOffset,
}

impl Sameness {
    fn holds(self, found: &Entry, claimed: &Entry) -> bool {
        match self {
            Sameness::Whole => found == claimed,
            Sameness::ButDataOffset => {
                // Compared field by field, not on a copy: no entry is cloned to be compared.
                let Entry {
                    path,
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime,
                    mtime_nsec,
                    size,
                    link,
                    device,
                    xattrs,
                    data_offset: _,
                    sparse,
                    digest,
                    opaque,
                    implied,
                } = found;
                *path == claimed.path
                    && *kind == claimed.kind
                    && *mode == claimed.mode
                    && *uid == claimed.uid
                    && *gid == claimed.gid
                    && *mtime == claimed.mtime
                    && *mtime_nsec == claimed.mtime_nsec
                    && *size == claimed.size
                    && *link == claimed.link
                    && *device == claimed.device
                    && *xattrs == claimed.xattrs
                    && *sparse == claimed.sparse
                    && *digest == claimed.digest
                    && *opaque == claimed.opaque
                    && *implied == claimed.implied
            }
        }
    }
}

/// No entry of the index is known to be this slot's.
const NO_PLACE: u32 = u32::MAX;

/// One slot of a [`Checked`] table.
enum Slot {
    Empty,
    /// Equal to the index's entry with this number.
    Same(u32),
    /// Differs from the index's entries (so far): kept whole, with the number of the index's
    /// entry of the same path it was made in place of ([`NO_PLACE`] if none), which it may
    /// yet come to equal (a directory whose opaque marker comes later).
    Own(Box<Entry>, u32),
}

/// Slots that hold the number of the index's entry where an entry equals it.
pub struct Checked<'a> {
    claimed: &'a [Entry],
    sameness: Sameness,
    slots: Vec<Slot>,
    /// The index's entry the next new entry is expected to be: entries come in archive order,
    /// as the index's do.
    next: usize,
    /// The place of the first entry taken out since the last push: a replacement of a path is
    /// pushed right after the old entry (and what was under it) is taken, and takes the old
    /// entry's place when the index has it there.
    freed: u32,
}

impl<'a> Checked<'a> {
    /// Slots for checking a walk against `claimed`, the file table of the index in use.
    pub fn new(claimed: &'a [Entry], sameness: Sameness) -> Self {
        Checked {
            claimed,
            sameness,
            slots: Vec::new(),
            next: 0,
            freed: NO_PLACE,
        }
    }

    /// `entry` as a slot made in place of the index's entry `place`.
    fn slot(&self, entry: Entry, place: u32) -> Slot {
        match self.claimed.get(place as usize) {
            Some(claimed) if self.sameness.holds(&entry, claimed) => Slot::Same(place),
            _ => Slot::Own(Box::new(entry), place),
        }
    }

    fn free(&mut self, place: u32) {
        if self.freed == NO_PLACE {
            self.freed = place;
        }
    }

    /// How many entries are kept whole (for tests of how little the check holds).
    #[cfg(test)]
    pub fn kept_whole(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Own(..)))
            .count()
    }

    /// Whether the table's entries, in slot order, are the index's; the first that is not,
    /// if one is not.
    pub fn compare(self) -> Result<(), Box<Mismatch>> {
        let mut rank = 0;
        for slot in &self.slots {
            let found = match slot {
                Slot::Empty => continue,
                Slot::Same(k) if *k as usize == rank => {
                    rank += 1;
                    continue;
                }
                Slot::Same(k) => &self.claimed[*k as usize],
                Slot::Own(entry, _) => entry,
            };
            match self.claimed.get(rank) {
                Some(claimed) if self.sameness.holds(found, claimed) => rank += 1,
                claimed => {
                    return Err(Box::new(Mismatch {
                        rank,
                        found: Some(found.clone()),
                        claimed: claimed.cloned(),
                    }));
                }
            }
        }
        match self.claimed.get(rank) {
            None => Ok(()),
            Some(claimed) => Err(Box::new(Mismatch {
                rank,
                found: None,
                claimed: Some(claimed.clone()),
            })),
        }
    }
}

/// Where a rebuilt file table first differs from the index's.
#[derive(Debug)]
pub struct Mismatch {
    /// The entry's place in the table.
    pub rank: usize,
    /// What the blob has there (`None`: the blob's table ends there).
    pub found: Option<Entry>,
    /// What the index has there (`None`: the index's table ends there).
    pub claimed: Option<Entry>,
}

impl Slots for Checked<'_> {
    fn count(&self) -> usize {
        self.slots.len()
    }

    fn get(&self, i: usize) -> Option<&Entry> {
        match &self.slots[i] {
            Slot::Empty => None,
            Slot::Same(k) => Some(&self.claimed[*k as usize]),
            Slot::Own(entry, _) => Some(entry),
        }
    }

    fn modify(&mut self, i: usize, change: impl FnOnce(&mut Entry)) {
        let (entry, place) = match std::mem::replace(&mut self.slots[i], Slot::Empty) {
            Slot::Empty => return,
            Slot::Same(k) => (self.claimed[k as usize].clone(), k),
            Slot::Own(entry, place) => (*entry, place),
        };
        let mut entry = entry;
        change(&mut entry);
        self.slots[i] = self.slot(entry, place);
    }

    fn take(&mut self, i: usize) -> Option<Entry> {
        match std::mem::replace(&mut self.slots[i], Slot::Empty) {
            Slot::Empty => None,
            Slot::Same(k) => {
                self.free(k);
                Some(self.claimed[k as usize].clone())
            }
            Slot::Own(entry, place) => {
                self.free(place);
                Some(*entry)
            }
        }
    }

    fn push(&mut self, entry: Entry) {
        // An entry of the path the index has next takes that place, equal or not (the index
        // may say something else of it, or a later marker may make it equal), so one
        // difference does not put every later entry out of step.
        let freed = std::mem::replace(&mut self.freed, NO_PLACE);
        let place = match self.claimed.get(self.next) {
            Some(claimed) if claimed.path == entry.path => {
                self.next += 1;
                u32::try_from(self.next - 1).unwrap_or(NO_PLACE)
            }
            _ if self
                .claimed
                .get(freed as usize)
                .is_some_and(|claimed| claimed.path == entry.path) =>
            {
                freed
            }
            _ => NO_PLACE,
        };
        let slot = self.slot(entry, place);
        self.slots.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::table::Table;
    use crate::entry::EntryKind;

    /// A file of one byte whose data offset and digest tell it apart by `mark`.
    fn file(path: &str, mark: u8) -> Entry {
        Entry {
            size: 1,
            data_offset: u64::from(mark) * 1000,
            digest: Some([mark; 32]),
            ..crate::build::table::tests::file(path)
        }
    }

    fn dir(path: &str) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            size: 0,
            digest: None,
            data_offset: 0,
            mode: 0o700,
            ..file(path, 0)
        }
    }

    fn link(target: &str) -> Entry {
        Entry {
            kind: EntryKind::Hardlink,
            link: Some(target.as_bytes().to_vec()),
            size: 0,
            digest: None,
            data_offset: 0,
            ..file("", 0)
        }
    }

    /// Tar members that exercise what the table resolves: replaced files and directories,
    /// implied parents, whiteouts, opaque markers, a relisted directory and hardlinks that
    /// outlive their targets.
    fn members() -> Vec<(&'static str, Entry)> {
        vec![
            ("a/b/c", file("", 1)),
            ("d/", dir("")),
            ("d/f", file("", 2)),
            ("g", file("", 3)),
            ("d", file("", 4)),
            ("g", file("", 5)),
            ("etc/.wh.passwd", file("", 0)),
            ("var/", dir("")),
            ("var/x", file("", 6)),
            ("var/.wh..wh..opq", file("", 0)),
            (
                "a/",
                Entry {
                    mode: 0o750,
                    ..dir("")
                },
            ),
            ("h", file("", 7)),
            ("i", link("h")),
            ("j", link("./i")),
            ("h", file("", 8)),
            ("p", file("", 9)),
            ("q", link("p")),
            ("p", link("q")),
            ("k/", dir("")),
            ("k/f", file("", 10)),
            ("k/g", link("k/f")),
            ("out", link("k/f")),
            ("k", file("", 11)),
            ("out", link("out")),
            ("z", file("", 12)),
        ]
    }

    fn plain_table(members: &[(&str, Entry)]) -> Vec<Entry> {
        let mut table = Table::new("l");
        for (path, entry) in members {
            table.add(path.as_bytes(), entry.clone()).unwrap();
        }
        table.finish()
    }

    fn checked<'a>(
        members: &[(&str, Entry)],
        claimed: &'a [Entry],
        sameness: Sameness,
    ) -> Checked<'a> {
        let mut table = Table::in_slots("l", Checked::new(claimed, sameness), 100);
        for (path, entry) in members {
            table.add(path.as_bytes(), entry.clone()).unwrap();
        }
        table.into_slots()
    }

    #[test]
    fn the_walk_of_a_layer_matches_its_own_table_keeping_only_what_it_replaced() {
        let members = members();
        let claimed = plain_table(&members);
        let slots = checked(&members, &claimed, Sameness::Whole);
        // Nothing is kept whole: replacements take the place of what they replace, and promoted
        // links and directories marked opaque come to equal the index's entries. A cursor
        // that lost step at the first difference kept 17 of the 21 whole.
        assert_eq!(slots.kept_whole(), 0);
        slots.compare().unwrap();
    }

    #[test]
    fn any_difference_from_the_claimed_table_is_found() {
        let members = members();
        let good = plain_table(&members);
        let mut wrong: Vec<(String, Vec<Entry>)> = Vec::new();
        for i in 0..good.len() {
            let changed = |change: &dyn Fn(&mut Entry)| {
                let mut table = good.clone();
                change(&mut table[i]);
                table
            };
            let at = good[i].display_path();
            wrong.push((format!("{at}: mode"), changed(&|e| e.mode ^= 0o4000)));
            wrong.push((format!("{at}: opaque"), changed(&|e| e.opaque = !e.opaque)));
            wrong.push((
                format!("{at}: implied"),
                changed(&|e| e.implied = !e.implied),
            ));
            wrong.push((format!("{at}: offset"), changed(&|e| e.data_offset += 1)));
            wrong.push((format!("{at}: path"), changed(&|e| e.path.push(b'x'))));
            let mut dropped = good.clone();
            dropped.remove(i);
            wrong.push((format!("{at}: dropped"), dropped));
            let mut doubled = good.clone();
            doubled.insert(i, good[i].clone());
            wrong.push((format!("{at}: doubled"), doubled));
            if i + 1 < good.len() {
                let mut swapped = good.clone();
                swapped.swap(i, i + 1);
                wrong.push((format!("{at}: swapped with the next"), swapped));
            }
        }
        let mut extra = good.clone();
        extra.push(file("zz", 13));
        wrong.push(("an extra entry".into(), extra));
        for (what, claimed) in &wrong {
            let result = checked(&members, claimed, Sameness::Whole).compare();
            assert!(result.is_err(), "{what}: not found");
        }
    }

    #[test]
    fn a_table_of_contents_index_may_place_data_elsewhere_but_say_nothing_else() {
        let members = members();
        let good = plain_table(&members);
        let mut moved = good.clone();
        for entry in &mut moved {
            entry.data_offset = entry.data_offset / 2 + 7;
        }
        checked(&members, &moved, Sameness::ButDataOffset)
            .compare()
            .unwrap();
        assert!(
            checked(&members, &moved, Sameness::Whole)
                .compare()
                .is_err()
        );
        let mut wrong = moved.clone();
        let file = wrong.iter_mut().find(|e| e.digest.is_some()).unwrap();
        file.digest = Some([99; 32]);
        let mismatch = checked(&members, &wrong, Sameness::ButDataOffset)
            .compare()
            .unwrap_err();
        assert_eq!(mismatch.claimed.unwrap().digest, Some([99; 32]));
    }
}
