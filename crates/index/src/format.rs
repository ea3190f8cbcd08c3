//! The index format: versioned, compact, with its own digest (the sha256 of the file), and
//! checked on load so that a truncated, garbled or foreign index is an error.
//!
//! ```text
//! magic "LZLYIDX\0" | version u32 | meta_len u64 | meta_raw_len u64 | windows_len u64   (LE)
//! meta:    zstd(postcard(Meta))          file table, spans, layer identity
//! windows: zstd-compressed 32 KiB deflate windows, one per gzip checkpoint, read on demand
//! ```
//!
//! Why one file of this size: the on-disk layout, its encoder and its checked decoder must change
//! together.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use lazylayer_source::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::entry::{Entry, EntryKind};
use crate::{Error, Result};

/// Deflate's back-reference distance: the dictionary a gzip checkpoint holds (the index keeps
/// one per gzip span; `codec/gzip.rs` makes them).
pub const WINDOW: usize = 32 << 10;

/// First bytes of every index file.
pub const MAGIC: &[u8; 8] = b"LZLYIDX\0";
/// The format version this build writes for indexes with continuation spans (it writes the
/// others as version 2). It reads both: version 2's metadata is version 3's without
/// [`IndexMeta::continuation`] (its last field) and has no [`SpanStart::Continue`] span.
pub const VERSION: u32 = 3;
/// The oldest format version this build reads.
const OLDEST_VERSION: u32 = 2;
/// Media type of an index blob in a registry.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.lazylayer.layer.index.v1";
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8;
/// Largest metadata section accepted (uncompressed).
const META_LIMIT: u64 = 512 << 20;

/// How the layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
    /// Plain tar.
    None,
}

impl Compression {
    /// The compression a layer media type says.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            _ => None,
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

/// Where decompression of a span begins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpanStart {
    /// Nothing to restore: the start of the blob, of a gzip member, of zstd frames, or any
    /// offset of a plain tar.
    Fresh,
    /// Raw deflate resumes: the first `bits` bits come from the span's first byte, and the
    /// window (the preceding output) is at `window_offset..+window_len` of the windows section.
    Deflate {
        bits: u8,
        window_offset: u64,
        window_len: u32,
    },
    /// One chunk of a layer indexed from its own table of contents (eStargz, zstd:chunked): the
    /// span is whole compressed units (gzip members, zstd frames) that decompress on their own,
    /// and `digest` is the sha256 of its first `len` output bytes, the chunk the table of
    /// contents names, not of its compressed bytes. What follows the chunk in its output (the
    /// tar headers of the next entries) is read by no file. Appended last: indexes without such
    /// spans decode as before. Never in an index from a registry.
    Chunk {
        /// The chunk's length: the span's share of the (file data only) uncompressed stream.
        len: u64,
    },
    /// No checkpoint: decompression goes on from the previous span, as one stream from the
    /// nearest span before it that has one (see [`LayerIndex::checkpoint_of`]). Such spans let
    /// a read fetch and verify only the compressed bytes from that checkpoint to the end of
    /// what it needs, in small verified pieces, while the index keeps one window per
    /// checkpoint (docs/benchmarks.md, "continuation spans"). Appended last: version-2
    /// indexes decode as before.
    Continue,
}

/// A run of compressed bytes that decompresses on its own from its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// First compressed byte (for gzip it may be the last byte of the previous span, whose
    /// low bits belong to this one).
    pub compressed_start: u64,
    /// End of the compressed bytes (exclusive).
    pub compressed_end: u64,
    /// Uncompressed offset of the span's first output byte.
    pub uncompressed_start: u64,
    /// sha256 of `compressed_start..compressed_end` of the blob.
    pub digest: [u8; 32],
    /// How to start decompressing.
    pub start: SpanStart,
}

impl Span {
    /// Whether `compressed` (the span's bytes of the blob) are what the span says: their
    /// sha256, or for a [`SpanStart::Chunk`] the sha256 of the chunk they decompress to.
    pub fn holds(&self, compression: Compression, compressed: &[u8]) -> bool {
        let SpanStart::Chunk { len } = self.start else {
            return sha256(compressed) == self.digest;
        };
        let mut hasher = Sha256::new();
        let mut produced = 0u64;
        let decompressed = crate::codec::resume(
            compression,
            &SpanStart::Fresh,
            &[],
            compressed,
            len,
            &mut |out| {
                produced += out.len() as u64;
                hasher.update(out);
                Ok(())
            },
        );
        decompressed.is_ok()
            && produced == len
            && <[u8; 32]>::from(hasher.finalize()) == self.digest
    }
}

/// What an index says about its layer: identity, spans and file table (the metadata section).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexMeta {
    /// The layer blob's digest.
    pub blob_digest: Digest,
    /// The layer blob's size.
    pub blob_size: u64,
    /// The layer's media type.
    pub media_type: String,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// How the blob is compressed.
    pub compression: Compression,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The checkpoint spacing asked for when building (compressed bytes).
    pub spacing: u64,
    /// The spans, in order; they cover the whole blob.
    pub spans: Vec<Span>,
    /// The file table in archive order.
    pub entries: Vec<Entry>,
    /// The continuation spacing asked for when building (compressed bytes between the cuts of
    /// [`SpanStart::Continue`] spans); 0 for none. Last, so a version-2 metadata section is
    /// this one without it.
    pub continuation: u64,
}

/// How a run of spans decompresses (see [`LayerIndex::run_plan`]).
pub enum RunPlan {
    /// As one stream from the first span's checkpoint.
    Stream {
        /// The first span's checkpoint.
        start: SpanStart,
        /// Its deflate window, if it has one.
        window: Vec<u8>,
    },
    /// Span by span, each on its own (chunks of a layer indexed from its table of contents):
    /// the bytes of each within the run, and how much of its output belongs to the stream.
    Pieces(Vec<(std::ops::Range<usize>, u64)>),
}

/// Where the compressed windows are: in memory (a decoded index), or in a file (an opened or
/// just built index), read when a span needs one.
enum Windows {
    Memory(Vec<u8>),
    File { file: File, base: u64, len: u64 },
}

impl Windows {
    fn len(&self) -> u64 {
        match self {
            Windows::Memory(bytes) => bytes.len() as u64,
            Windows::File { len, .. } => *len,
        }
    }

    /// Bytes `offset..offset+len` of the windows section.
    fn read(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        match self {
            Windows::Memory(bytes) => Ok(bytes[offset as usize..(offset + len) as usize].to_vec()),
            Windows::File { file, base, .. } => {
                let mut out = vec![0; len as usize];
                file.read_exact_at(&mut out, base + offset)?;
                Ok(out)
            }
        }
    }
}

/// A layer's lazy index: its metadata (reachable through `Deref`) and the deflate windows,
/// which stay in their file until a span needs one.
pub struct LayerIndex {
    meta: IndexMeta,
    windows: Windows,
}

impl std::ops::Deref for LayerIndex {
    type Target = IndexMeta;

    fn deref(&self) -> &IndexMeta {
        &self.meta
    }
}

impl std::ops::DerefMut for LayerIndex {
    fn deref_mut(&mut self) -> &mut IndexMeta {
        &mut self.meta
    }
}

impl std::fmt::Debug for LayerIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerIndex")
            .field("blob_digest", &self.blob_digest)
            .field("compression", &self.compression)
            .field("spans", &self.spans.len())
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl LayerIndex {
    /// An index without deflate windows (one made from a layer's table of contents), checked
    /// like a decoded one.
    pub fn from_meta(meta: IndexMeta) -> Result<Self> {
        let index = LayerIndex {
            meta,
            windows: Windows::Memory(Vec::new()),
        };
        index.validate("made from the layer's table of contents")?;
        Ok(index)
    }

    /// A just-built index whose windows are in `windows_file` (checked like a decoded one).
    pub(crate) fn built(meta: IndexMeta, windows_file: File, windows_len: u64) -> Result<Self> {
        let index = LayerIndex {
            meta,
            windows: Windows::File {
                file: windows_file,
                base: 0,
                len: windows_len,
            },
        };
        index.validate("just built")?;
        Ok(index)
    }

    /// The index as bytes (what is stored and pushed).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_to(&mut out)?;
        Ok(out)
    }

    /// Writes the index to `out`, streaming the windows (they are never all in memory).
    pub fn encode_to(&self, out: &mut dyn Write) -> Result<()> {
        let mut raw =
            postcard::to_stdvec(&self.meta).map_err(|e| Error::bad_index("encoding", e))?;
        // An index without continuation spans is written as version 2, which builds from
        // before version 3 read too (byte for byte what they wrote): its metadata is this one
        // without the last field, `continuation` = 0, one byte.
        let version = if self.continuation == 0
            && !self.spans.iter().any(|s| s.start == SpanStart::Continue)
        {
            raw.pop();
            OLDEST_VERSION
        } else {
            VERSION
        };
        let packed =
            zstd::bulk::compress(&raw, 9).map_err(|e| Error::io("compressing index", e))?;
        let windows_len = self.windows.len();
        let written = (|| -> std::io::Result<()> {
            out.write_all(MAGIC)?;
            out.write_all(&version.to_le_bytes())?;
            out.write_all(&(packed.len() as u64).to_le_bytes())?;
            out.write_all(&(raw.len() as u64).to_le_bytes())?;
            out.write_all(&windows_len.to_le_bytes())?;
            out.write_all(&packed)?;
            let mut offset = 0;
            while offset < windows_len {
                let chunk = (windows_len - offset).min(1 << 20);
                out.write_all(&self.windows.read(offset, chunk)?)?;
                offset += chunk;
            }
            Ok(())
        })();
        written.map_err(|e| Error::io("writing the index", e))
    }

    /// Decodes and checks an index held in memory; `what` names it in errors.
    pub fn decode(what: &str, bytes: &[u8]) -> Result<Self> {
        let (meta_len, windows_len, meta) =
            decode_header_and_meta(what, bytes.len() as u64, bytes)?;
        let start = HEADER_LEN as u64 + meta_len;
        let windows = bytes[start as usize..(start + windows_len) as usize].to_vec();
        let index = LayerIndex {
            meta,
            windows: Windows::Memory(windows),
        };
        index.validate(what)?;
        Ok(index)
    }

    /// Opens an index file: the metadata is read now, the windows when a span needs one.
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let mut file =
            std::fs::File::open(path).map_err(|e| Error::io(format!("opening {what}"), e))?;
        let size = file.metadata().map_err(|e| Error::io(&what, e))?.len();
        let mut header = vec![0u8; HEADER_LEN.min(size as usize)];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(&what, e))?;
        let (meta_len, ..) = parse_header(&what, size, &header)?;
        let mut head_and_meta = header;
        head_and_meta.resize(HEADER_LEN + meta_len as usize, 0);
        file.read_exact(&mut head_and_meta[HEADER_LEN..])
            .map_err(|e| Error::io(&what, e))?;
        let (meta_len, windows_len, meta) = decode_header_and_meta(&what, size, &head_and_meta)?;
        let index = LayerIndex {
            meta,
            windows: Windows::File {
                file,
                base: HEADER_LEN as u64 + meta_len,
                len: windows_len,
            },
        };
        index.validate(&what)?;
        Ok(index)
    }

    /// The digest of the encoded index (what a registry names it by).
    pub fn digest_of(encoded: &[u8]) -> Digest {
        Digest::sha256(encoded)
    }

    /// The deflate window a span resumes with (empty for other spans).
    pub fn window(&self, span: &Span) -> Result<Vec<u8>> {
        let SpanStart::Deflate {
            window_offset,
            window_len,
            ..
        } = span.start
        else {
            return Ok(Vec::new());
        };
        let packed = self
            .windows
            .read(window_offset, u64::from(window_len))
            .map_err(|e| Error::io("reading a deflate window", e))?;
        let window = zstd::bulk::decompress(&packed, WINDOW)
            .map_err(|e| Error::bad_index("window", format!("does not decompress: {e}")))?;
        Ok(window)
    }

    /// Whether the index was made from the layer's own table of contents (eStargz,
    /// zstd:chunked): its
    /// spans are chunks checked by their output, and its uncompressed stream holds file data
    /// only, so its offsets are not those of the tar stream.
    pub fn from_toc(&self) -> bool {
        self.spans
            .iter()
            .any(|s| matches!(s.start, SpanStart::Chunk { .. }))
    }

    /// The span decompression of span `i` starts from: `i` itself, or for a
    /// [`SpanStart::Continue`] span the nearest one before it that has a checkpoint.
    pub fn checkpoint_of(&self, i: usize) -> usize {
        let mut c = i.min(self.spans.len().saturating_sub(1));
        while c > 0 && self.spans[c].start == SpanStart::Continue {
            c -= 1;
        }
        c
    }

    /// The last span that goes on from the same checkpoint as span `i` (the end of the
    /// continuation spans after it; `i` itself when none follows).
    pub fn checkpoint_span_end(&self, i: usize) -> usize {
        let mut last = i;
        while self
            .spans
            .get(last + 1)
            .is_some_and(|s| s.start == SpanStart::Continue)
        {
            last += 1;
        }
        last
    }

    /// How spans `first..=last`, fetched as one run of compressed bytes, decompress; `first`
    /// must have a checkpoint (see [`checkpoint_of`](Self::checkpoint_of)).
    pub fn run_plan(&self, first: usize, last: usize) -> Result<RunPlan> {
        if !self.from_toc() {
            let span = &self.spans[first];
            if span.start == SpanStart::Continue {
                return Err(Error::BadRead(format!(
                    "span {first} has no checkpoint to decompress from"
                )));
            }
            return Ok(RunPlan::Stream {
                start: span.start.clone(),
                window: self.window(span)?,
            });
        }
        let base = self.spans[first].compressed_start;
        Ok(RunPlan::Pieces(
            (first..=last)
                .map(|i| {
                    let span = &self.spans[i];
                    let range = (span.compressed_start - base) as usize
                        ..(span.compressed_end - base) as usize;
                    (
                        range,
                        self.span_uncompressed_end(i) - span.uncompressed_start,
                    )
                })
                .collect(),
        ))
    }

    /// The spans holding the data of the entries `files`, each once, in the order the entries
    /// come: a prefetch of a profile's files (listed in the order a workload first waited for
    /// them) fetches first what a starting workload needs first.
    pub fn spans_of(&self, files: &[usize]) -> Vec<usize> {
        let mut seen = std::collections::HashSet::new();
        let mut spans = Vec::new();
        for &i in files {
            let Some(entry) = self.entries.get(i) else {
                continue;
            };
            let stored = entry.stored_size();
            if stored > 0 {
                let first = self.span_at(entry.data_offset);
                let last = self.span_at(entry.data_offset + stored - 1);
                spans.extend((first..=last).filter(|span| seen.insert(*span)));
            }
        }
        spans
    }

    /// The span containing uncompressed offset `offset`.
    pub fn span_at(&self, offset: u64) -> usize {
        self.spans
            .partition_point(|s| s.uncompressed_start <= offset)
            .saturating_sub(1)
    }

    /// Uncompressed end of span `i`.
    pub fn span_uncompressed_end(&self, i: usize) -> u64 {
        self.spans
            .get(i + 1)
            .map_or(self.uncompressed_size, |s| s.uncompressed_start)
    }

    /// The entry at `path` (normalised, as in the table).
    pub fn entry(&self, path: &[u8]) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }

    /// Checks every invariant readers rely on; a hostile index fails here, not later.
    fn validate(&self, what: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::bad_index(what, reason));
        if self.spans.is_empty() {
            return bad("no spans".into());
        }
        let windows_len = self.windows.len();
        let from_toc = self.from_toc();
        let first = &self.spans[0];
        if first.compressed_start != 0
            || first.uncompressed_start != 0
            || first.start != SpanStart::Fresh
        {
            return bad("the first span does not start at the beginning".into());
        }
        for (i, span) in self.spans.iter().enumerate() {
            if span.compressed_start >= span.compressed_end || span.compressed_end > self.blob_size
            {
                return bad(format!(
                    "span {i} covers bytes {}..{} of a {}-byte blob",
                    span.compressed_start, span.compressed_end, self.blob_size
                ));
            }
            if span.uncompressed_start > self.uncompressed_size {
                return bad(format!("span {i} starts past the uncompressed end"));
            }
            if let Some(next) = self.spans.get(i + 1) {
                let contiguous = next.compressed_start == span.compressed_end
                    || (self.compression == Compression::Gzip
                        && next.compressed_start + 1 == span.compressed_end);
                // Only an index from a table of contents has spans no file reads (tar headers,
                // the footer): they take no room in its uncompressed stream.
                let in_order = next.uncompressed_start > span.uncompressed_start
                    || (from_toc
                        && next.uncompressed_start == span.uncompressed_start
                        && span.start == SpanStart::Fresh);
                if !contiguous || !in_order {
                    return bad(format!("spans {i} and {} are not in order", i + 1));
                }
            } else if span.compressed_end != self.blob_size {
                return bad("the spans do not reach the end of the blob".into());
            }
            if span.start == SpanStart::Continue
                && (self.compression != Compression::Gzip || from_toc)
            {
                return bad(format!("span {i} continues a stream it cannot continue"));
            }
            if let SpanStart::Chunk { len } = span.start
                && (self.compression == Compression::None
                    || len == 0
                    || span.uncompressed_start.checked_add(len)
                        != Some(self.span_uncompressed_end(i)))
            {
                return bad(format!("span {i} is a chunk of the wrong length"));
            }
            if let SpanStart::Deflate {
                bits,
                window_offset,
                window_len,
            } = span.start
            {
                if self.compression != Compression::Gzip || bits > 7 {
                    return bad(format!("span {i} has a deflate checkpoint it cannot use"));
                }
                if window_offset
                    .checked_add(u64::from(window_len))
                    .is_none_or(|end| end > windows_len)
                {
                    return bad(format!("span {i}'s window is outside the index"));
                }
            }
        }
        // The kind of each path seen so far (entries before the current one).
        let mut paths = std::collections::HashMap::new();
        for entry in &self.entries {
            let name = entry.display_path();
            if !valid_path(&entry.path) {
                return bad(format!("entry {name:?} has an invalid path"));
            }
            if paths.insert(entry.path.as_slice(), entry.kind).is_some() {
                return bad(format!("entry {name:?} appears twice"));
            }
            if entry.mode > 0o7777 || entry.mtime_nsec >= 1_000_000_000 {
                return bad(format!("entry {name:?} has an invalid mode or time"));
            }
            match entry.kind {
                EntryKind::File => {
                    let end = entry.data_offset.checked_add(entry.stored_size());
                    if end.is_none_or(|end| end > self.uncompressed_size) {
                        return bad(format!("entry {name:?} has data past the end of the layer"));
                    }
                    if let Some(segments) = &entry.sparse {
                        let mut position = 0u64;
                        for &(offset, len) in segments {
                            let seg_end = offset.checked_add(len);
                            if offset < position || seg_end.is_none_or(|e| e > entry.size) {
                                return bad(format!("entry {name:?} has a bad sparse map"));
                            }
                            position = offset + len;
                        }
                    }
                }
                EntryKind::Hardlink
                    if !entry
                        .link
                        .as_deref()
                        .is_some_and(|l| valid_path(l) && !l.is_empty()) =>
                {
                    return bad(format!("hardlink {name:?} has an invalid target"));
                }
                EntryKind::Hardlink => {
                    // Placeholders are created in order, each link from its target.
                    let target = entry.link.as_deref().unwrap_or_default();
                    let shown = String::from_utf8_lossy(target);
                    match paths.get(target) {
                        None if self.entries.iter().any(|e| e.path == target) => {
                            return bad(format!(
                                "hardlink {name:?} comes before its target {shown:?}"
                            ));
                        }
                        None => {
                            return bad(format!(
                                "hardlink {name:?} points at {shown:?}, which is not in the layer"
                            ));
                        }
                        Some(
                            kind @ (EntryKind::Dir | EntryKind::Whiteout | EntryKind::Hardlink),
                        ) => {
                            return bad(format!(
                                "hardlink {name:?} points at {shown:?}, which is a {kind:?}, not a file"
                            ));
                        }
                        Some(_) => {}
                    }
                }
                EntryKind::Symlink if entry.link.is_none() => {
                    return bad(format!("symlink {name:?} has no target"));
                }
                EntryKind::CharDevice | EntryKind::BlockDevice if entry.device.is_none() => {
                    return bad(format!("device {name:?} has no numbers"));
                }
                _ => {}
            }
            if (entry.kind == EntryKind::File) != entry.digest.is_some() {
                return bad(format!(
                    "entry {name:?} lacks its content digest or has one it should not"
                ));
            }
            if entry.opaque && entry.kind != EntryKind::Dir {
                return bad(format!("entry {name:?} is opaque but not a directory"));
            }
            if entry.kind != EntryKind::File && (entry.size != 0 || entry.sparse.is_some()) {
                return bad(format!("entry {name:?} has data but is not a file"));
            }
        }
        Ok(())
    }
}

/// A path as the table stores it: relative, `/`-separated, no empty, `.` or `..` component,
/// no NUL. The empty path is the root.
pub fn valid_path(path: &[u8]) -> bool {
    path.is_empty()
        || (!path.contains(&0)
            && path
                .split(|b| *b == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".."))
}

/// The header's (metadata length, windows length, raw metadata length, version).
fn parse_header(what: &str, size: u64, header: &[u8]) -> Result<(u64, u64, u64, u32)> {
    if header.len() < HEADER_LEN || &header[..8] != MAGIC {
        return Err(Error::bad_index(what, "not a lazylayer index (bad magic)"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(Error::bad_index(
            what,
            format!(
                "format version {version}, this lazylayer reads versions {OLDEST_VERSION} to \
                 {VERSION}"
            ),
        ));
    }
    let (meta_len, meta_raw_len, windows_len) = (u64_at(12), u64_at(20), u64_at(28));
    let expected = (HEADER_LEN as u64)
        .checked_add(meta_len)
        .and_then(|n| n.checked_add(windows_len));
    if expected != Some(size) {
        return Err(Error::bad_index(
            what,
            format!("truncated or padded: {size} bytes, the header says {expected:?}"),
        ));
    }
    if meta_raw_len > META_LIMIT {
        return Err(Error::bad_index(what, "metadata larger than the limit"));
    }
    Ok((meta_len, windows_len, meta_raw_len, version))
}

fn decode_header_and_meta(what: &str, size: u64, bytes: &[u8]) -> Result<(u64, u64, IndexMeta)> {
    let (meta_len, windows_len, meta_raw_len, version) = parse_header(what, size, bytes)?;
    let packed = &bytes[HEADER_LEN..HEADER_LEN + meta_len as usize];
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(packed)
        .map_err(|e| Error::io(what, e))?
        .take(meta_raw_len + 1)
        .read_to_end(&mut raw)
        .map_err(|e| Error::bad_index(what, format!("metadata does not decompress: {e}")))?;
    if raw.len() as u64 != meta_raw_len {
        return Err(Error::bad_index(what, "metadata has the wrong length"));
    }
    if version == 2 {
        // Version 2 ends before `continuation`: 0, as postcard writes it.
        raw.push(0);
    }
    let meta: IndexMeta = postcard::from_bytes(&raw)
        .map_err(|e| Error::bad_index(what, format!("metadata does not decode: {e}")))?;
    Ok((meta_len, windows_len, meta))
}

/// sha256 as raw bytes, for span digests.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
