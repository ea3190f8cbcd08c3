//! The file table: one entry per path of the layer, with the metadata extraction would apply
//! and, for regular files, where their bytes sit in the uncompressed stream.

use serde::{Deserialize, Serialize};

/// What a layer entry is. OCI whiteout files are turned into [`EntryKind::Whiteout`] entries
/// (`.wh.NAME`) and the `opaque` flag of directories (`.wh..wh..opq`), so later steps never see
/// the `.wh.` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (`link` is its target, as stored).
    Symlink,
    /// A hard link to the entry at `link`: a normalised path in this layer, of an earlier entry
    /// that is not a directory, a whiteout or another hardlink (usually a regular file; tar
    /// writers also link symlinks, devices and fifos).
    Hardlink,
    /// A character device (`device` holds major and minor).
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// `path` is deleted from the layers below (from `.wh.NAME`).
    Whiteout,
}

/// One path of a layer, after duplicates are resolved the way extraction does (last wins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the layer root, `/`-separated, no `.`/`..`/empty components; the empty
    /// path is the root directory itself. Raw bytes: names need not be UTF-8.
    pub path: Vec<u8>,
    /// The kind of entry.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time (from PAX `mtime`).
    pub mtime_nsec: u32,
    /// File size (the logical size for sparse files); 0 for other kinds.
    pub size: u64,
    /// Symlink target, or the hardlink's target path.
    pub link: Option<Vec<u8>>,
    /// Device numbers (major, minor).
    pub device: Option<(u32, u32)>,
    /// Extended attributes (PAX `SCHILY.xattr.*` / `LIBARCHIVE.xattr.*`), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the file's stored bytes start in the uncompressed layer stream.
    pub data_offset: u64,
    /// For sparse files: the data segments `(file offset, length)`, stored back to back from
    /// `data_offset`; everything else of the file reads as zeros.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// For regular files: sha256 of the stored bytes (for sparse files, the data segments back
    /// to back), so a populated file can be checked without the layer.
    pub digest: Option<[u8; 32]>,
    /// For directories: hides what the layers below have in it (from `.wh..wh..opq`).
    pub opaque: bool,
    /// True for a directory the layer does not list but implies (a parent of an entry).
    pub implied: bool,
}

impl Entry {
    /// The path for display (lossy UTF-8).
    pub fn display_path(&self) -> String {
        if self.path.is_empty() {
            ".".to_string()
        } else {
            String::from_utf8_lossy(&self.path).into_owned()
        }
    }

    /// How many bytes of the file are stored in the stream (less than `size` for sparse files).
    pub fn stored_size(&self) -> u64 {
        match (&self.kind, &self.sparse) {
            (EntryKind::File, Some(segments)) => segments.iter().map(|(_, len)| len).sum(),
            (EntryKind::File, None) => self.size,
            _ => 0,
        }
    }

    /// Maps the file range `offset..offset+len` to pieces: either stored bytes at a stream
    /// offset or a run of zeros (a sparse hole), in file order.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        let Some(segments) = &self.sparse else {
            return vec![Piece::Stored {
                stream_offset: self.data_offset + offset,
                len: end - offset,
            }];
        };
        let mut pieces = Vec::new();
        let mut position = offset;
        let mut stored_before = 0u64;
        for &(seg_offset, seg_len) in segments {
            if position >= end {
                break;
            }
            let seg_end = seg_offset + seg_len;
            if seg_end <= position {
                stored_before += seg_len;
                continue;
            }
            if position < seg_offset {
                let hole_end = seg_offset.min(end);
                pieces.push(Piece::Zeros {
                    len: hole_end - position,
                });
                position = hole_end;
                if position >= end {
                    break;
                }
            }
            let piece_end = seg_end.min(end);
            pieces.push(Piece::Stored {
                stream_offset: self.data_offset + stored_before + (position - seg_offset),
                len: piece_end - position,
            });
            position = piece_end;
            stored_before += seg_len;
        }
        if position < end {
            pieces.push(Piece::Zeros {
                len: end - position,
            });
        }
        pieces
    }
}

/// A part of a file read: stored bytes or a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at `stream_offset` of the uncompressed layer.
    Stored { stream_offset: u64, len: u64 },
    /// `len` zero bytes (a hole of a sparse file).
    Zeros { len: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file() -> Entry {
        Entry {
            path: b"s".to_vec(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 100,
            link: None,
            device: None,
            xattrs: vec![],
            data_offset: 1000,
            sparse: Some(vec![(0, 10), (50, 10)]),
            digest: None,
            opaque: false,
            implied: false,
        }
    }

    #[test]
    fn sparse_pieces() {
        let e = sparse_file();
        assert_eq!(e.stored_size(), 20);
        assert_eq!(
            e.pieces(5, 60),
            vec![
                Piece::Stored {
                    stream_offset: 1005,
                    len: 5
                },
                Piece::Zeros { len: 40 },
                Piece::Stored {
                    stream_offset: 1010,
                    len: 10
                },
                Piece::Zeros { len: 5 },
            ]
        );
        assert_eq!(e.pieces(95, 100), vec![Piece::Zeros { len: 5 }]);
        assert_eq!(e.pieces(100, 1), vec![]);
    }

    #[test]
    fn plain_pieces_are_clamped_to_the_size() {
        let mut e = sparse_file();
        e.sparse = None;
        assert_eq!(
            e.pieces(90, 50),
            vec![Piece::Stored {
                stream_offset: 1090,
                len: 10
            }]
        );
    }
}
