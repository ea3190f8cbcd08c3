//! Checking a file's index entry against the blob before its data is served, for indexes that
//! nobody vouches for (unbound referrers): the tar header in front of the file's data (with the
//! PAX and GNU long-name headers before it, and a GNU sparse map after it), decompressed from
//! verified spans, must make exactly the entry the index claims: path, type, size, mode, owner,
//! times, xattrs, sparse map and data offset. The data itself is checked against the entry's
//! digest as it is written.
//!
//! The headers are found backwards from the claimed data offset: the member's own header is the
//! block just before its data (or before its sparse map), and each extension header before it
//! is a valid header block whose payload ends exactly where the next header starts. What this
//! cannot tell: a claimed offset inside an uncompressed tar file stored in the layer, whose
//! members look like real ones; the check at detach (the whole index rebuilt from the blob)
//! catches that and every other lie.

use std::io::Read;

use crate::build::entry_of;
use crate::build::table::normalise;
use crate::entry::EntryKind;
use crate::format::LayerIndex;

/// How far before a file's data the headers are looked for first.
pub const HEADER_WINDOW: u64 = 64 << 10;
/// How far at most: the largest PAX header and GNU long name a layer may have, and a header.
pub const MAX_HEADER_WINDOW: u64 = (16 << 20) + (1 << 20) + 4096;

const BLOCK: u64 = 512;

/// Checks entry `i` of `index` (a regular file) against `window`, the uncompressed stream bytes
/// from `window_start` to the entry's data offset. `Err` says what does not match (or that no
/// header was found: the headers may start before the window).
pub fn check_file_header(
    index: &LayerIndex,
    i: usize,
    window_start: u64,
    window: &[u8],
) -> std::result::Result<(), String> {
    let claimed = &index.entries[i];
    let end = claimed.data_offset;
    if claimed.kind != EntryKind::File {
        return Err("is not a regular file".into());
    }
    if window_start + window.len() as u64 != end {
        return Err(format!(
            "the window {window_start}+{} does not end at the data offset {end}",
            window.len()
        ));
    }
    let block = |at: u64| -> Option<&[u8]> {
        if at < window_start || at + BLOCK > end {
            return None;
        }
        let from = (at - window_start) as usize;
        Some(&window[from..from + BLOCK as usize])
    };
    // The member's own header: just before its data, or before a GNU sparse 1.0 map.
    let reach = if claimed.sparse.is_some() {
        window.len() as u64 / BLOCK
    } else {
        1
    };
    let own = (1..=reach)
        .map(|k| end - k * BLOCK)
        .find(|&at| {
            block(at)
                .and_then(header_fields)
                .is_some_and(|(t, _)| is_file_type(t))
        })
        .ok_or("no tar header for it in front of its data")?;
    // Extension headers before it, each ending where the next header starts.
    let mut start = own;
    'chain: loop {
        let mut at = start;
        while at >= window_start + BLOCK {
            at -= BLOCK;
            let Some((kind, size)) = block(at).and_then(header_fields) else {
                continue;
            };
            if matches!(kind, b'x' | b'L' | b'K')
                && at + BLOCK + size.div_ceil(BLOCK) * BLOCK == start
            {
                start = at;
                continue 'chain;
            }
        }
        break;
    }

    let members = &window[(start - window_start) as usize..];
    let stream = members.chain(std::io::repeat(0));
    let mut archive = tar::Archive::new(stream);
    let layer = index.blob_digest.to_string();
    let mut entries = archive
        .entries()
        .map_err(|e| format!("its tar header does not parse: {e}"))?;
    let mut member = entries
        .next()
        .ok_or("no tar member in front of its data")?
        .map_err(|e| format!("its tar header does not parse: {e}"))?;
    let (raw_path, mut found) = entry_of(&layer, &mut member, false)
        .map_err(|e| format!("its tar header is refused: {e}"))?
        .ok_or("the header in front of its data is a PAX global header")?;
    found.path = normalise(&raw_path).ok_or("its tar header has a path that escapes")?;
    found.data_offset += start;
    if found.path != claimed.path {
        // A hardlink whose target was replaced later in the layer lives on under the link's
        // name, with the data of a member the layer no longer shows: accepted only when no
        // entry of the index is that member (its name with its data).
        let promoted = !index
            .entries
            .iter()
            .any(|e| e.path == found.path && e.data_offset == found.data_offset);
        if !promoted {
            return Err(format!(
                "its data is that of {}",
                String::from_utf8_lossy(&found.path)
            ));
        }
        found.path = claimed.path.clone();
    }
    let mut expected = claimed.clone();
    expected.digest = None;
    if found != expected {
        return Err(differences(&found, &expected));
    }
    Ok(())
}

/// The type flag and size of a header block, if it is one (its checksum holds).
fn header_fields(block: &[u8]) -> Option<(u8, u64)> {
    let header = tar::Header::from_byte_slice(block);
    let stored = header.cksum().ok()?;
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u32
            }
        })
        .sum();
    if stored != sum {
        return None;
    }
    Some((block[156], header.entry_size().ok()?))
}

fn is_file_type(flag: u8) -> bool {
    matches!(flag, b'0' | 0 | b'7')
}

/// Which fields differ, for the error message.
pub(crate) fn differences(found: &crate::Entry, claimed: &crate::Entry) -> String {
    let checks = [
        ("type", found.kind == claimed.kind),
        ("size", found.size == claimed.size),
        ("mode", found.mode == claimed.mode),
        (
            "owner",
            (found.uid, found.gid) == (claimed.uid, claimed.gid),
        ),
        (
            "mtime",
            (found.mtime, found.mtime_nsec) == (claimed.mtime, claimed.mtime_nsec),
        ),
        ("xattrs", found.xattrs == claimed.xattrs),
        ("sparse map", found.sparse == claimed.sparse),
        ("link target", found.link == claimed.link),
        ("device numbers", found.device == claimed.device),
        ("content digest", found.digest == claimed.digest),
        ("data offset", found.data_offset == claimed.data_offset),
    ];
    let mut fields: Vec<&str> = checks
        .iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| *name)
        .collect();
    if fields.is_empty() {
        fields.push("other fields");
    }
    format!(
        "its tar header disagrees with the index on {}",
        fields.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BuildOptions, build_from_reader};
    use lazylayer_source::{BlobDescriptor, Digest};

    /// The tar seeds GNU tar made (fuzz/make-seeds.sh): PAX and GNU long names, hardlinks
    /// whose target was replaced later (promoted), base-256 numbers, sparse 1.0 and 0.1 maps,
    /// xattrs and devices.
    fn seeds() -> Vec<(String, Vec<u8>)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/tar_table");
        let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= 6,
            "the GNU tar seeds are in {}",
            dir.display()
        );
        seeds
    }

    fn index_of(tar: &[u8]) -> LayerIndex {
        let layer = BlobDescriptor {
            digest: Digest::sha256(tar),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            size: tar.len() as u64,
        };
        build_from_reader(
            std::io::Cursor::new(tar.to_vec()),
            &layer,
            None,
            BuildOptions::default(),
        )
        .unwrap()
    }

    fn check(index: &LayerIndex, tar: &[u8], i: usize) -> std::result::Result<(), String> {
        let end = index.entries[i].data_offset;
        let start = end.saturating_sub(HEADER_WINDOW);
        check_file_header(index, i, start, &tar[start as usize..end as usize])
    }

    fn files(index: &LayerIndex) -> Vec<usize> {
        (0..index.entries.len())
            .filter(|&i| {
                index.entries[i].kind == EntryKind::File && index.entries[i].stored_size() > 0
            })
            .collect()
    }

    #[test]
    fn every_file_of_a_true_index_passes() {
        let mut checked = 0;
        for (name, tar) in seeds() {
            let index = index_of(&tar);
            for i in files(&index) {
                check(&index, &tar, i)
                    .unwrap_or_else(|e| panic!("{name}: {}: {e}", index.entries[i].display_path()));
                checked += 1;
            }
        }
        assert!(checked > 15, "{checked} files checked");
    }

    #[test]
    fn a_lie_about_any_field_of_a_file_is_caught() {
        type Lie = fn(&mut crate::Entry);
        let lies: [(&str, Lie); 6] = [
            ("setuid", |e| e.mode ^= 0o4000),
            ("owner", |e| e.uid += 1),
            ("mtime", |e| e.mtime += 1),
            ("size", |e| e.size += 1),
            ("xattr", |e| {
                e.xattrs.push((b"user.lie".to_vec(), b"1".to_vec()))
            }),
            ("path", |e| e.path = b"etc/elsewhere".to_vec()),
        ];
        for (name, tar) in seeds() {
            let mut index = index_of(&tar);
            for i in files(&index) {
                let truth = index.entries[i].clone();
                for (what, lie) in &lies {
                    lie(&mut index.entries[i]);
                    let checked = check(&index, &tar, i);
                    index.entries[i] = truth.clone();
                    // A name no entry has with this data is what a promoted hardlink looks
                    // like: that lie is let through (the check at detach catches it).
                    if *what == "path" {
                        continue;
                    }
                    assert!(
                        checked.is_err(),
                        "{name}: {} with a lying {what} passed",
                        truth.display_path()
                    );
                }
            }
        }
    }

    /// The name of the tar member whose data starts at each offset, as the archive says.
    fn member_names(tar: &[u8]) -> std::collections::HashMap<u64, Vec<u8>> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.raw_file_position(), normalise(&e.path_bytes()).unwrap())
            })
            .collect()
    }

    #[test]
    fn the_data_of_another_file_is_caught() {
        for (name, tar) in seeds() {
            let mut index = index_of(&tar);
            let files = files(&index);
            let members = member_names(&tar);
            for pair in files.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                if index.entries[a].data_offset == index.entries[b].data_offset {
                    continue; // hardlinks share their data
                }
                if members.get(&index.entries[b].data_offset) != Some(&index.entries[b].path) {
                    // The data of a member the layer no longer shows (a promoted hardlink's):
                    // the one lie let through before detach.
                    continue;
                }
                let truth = index.entries[a].clone();
                let theirs = index.entries[b].clone();
                let lie = &mut index.entries[a];
                lie.data_offset = theirs.data_offset;
                lie.size = theirs.size;
                lie.sparse = theirs.sparse.clone();
                lie.digest = theirs.digest;
                let checked = check(&index, &tar, a);
                index.entries[a] = truth.clone();
                assert!(
                    checked.is_err(),
                    "{name}: {} given {}'s data passed",
                    truth.display_path(),
                    theirs.display_path()
                );
            }
        }
    }

    #[test]
    fn an_offset_that_is_not_after_a_header_is_caught() {
        for (name, tar) in seeds() {
            let mut index = index_of(&tar);
            for i in files(&index) {
                let truth = index.entries[i].clone();
                index.entries[i].data_offset += 512;
                let fits = truth.data_offset + 512 + truth.stored_size() <= tar.len() as u64;
                let checked = check(&index, &tar, i);
                index.entries[i] = truth.clone();
                if fits {
                    assert!(checked.is_err(), "{name}: {}", truth.display_path());
                }
            }
        }
    }

    /// Writes the `index_decode` fuzz seeds with lying file tables (a true index of a GNU tar
    /// seed, then a file made setuid, and a file given another's data): run by hand with
    /// `cargo test -p lazylayer-index --lib -- --ignored lying_table_seeds`.
    #[test]
    #[ignore]
    fn lying_table_seeds() {
        let out =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/index_decode");
        let (_, tar) = seeds()
            .into_iter()
            .find(|(name, _)| name.ends_with("seed-layer2.tar"))
            .unwrap();
        let mut index = index_of(&tar);
        let files = files(&index);
        index.entries[files[0]].mode |= 0o4000;
        std::fs::write(out.join("seed-lying-setuid.idx"), index.encode().unwrap()).unwrap();
        let theirs = index.entries[files[1]].clone();
        let lie = &mut index.entries[files[0]];
        lie.data_offset = theirs.data_offset;
        lie.size = theirs.size;
        lie.digest = theirs.digest;
        std::fs::write(out.join("seed-lying-data.idx"), index.encode().unwrap()).unwrap();
    }
}
