//! The index format: versioned, compact, with its own digest (the sha256 of the file), and
//! checked on load so that a truncated, garbled or foreign index is an error.
//!
//! ```text
//! magic "LZLYIDX\0" | version u32 | meta_len u64 | meta_raw_len u64 | windows_len u64   (LE)
//! meta:    zstd(postcard(Meta))          file table, spans, layer identity, window digests
//! windows: zstd-compressed 32 KiB deflate windows, one per gzip checkpoint, read on demand
//! ```
//!
//! The header and metadata (the *head*) are enough to make a layer's tree. Since version 4 the
//! metadata holds the digest of every window, so an index from a registry can be fetched head
//! first (its digest rides in the artifact's descriptor, see [`IndexHead`]) and each window
//! later, when a read first decompresses from its checkpoint; a window not fetched yet is
//! zeros in the stored file (see [`LayerIndex::window_is_local`]).
//!
//! Why one file of this size: the on-disk layout, its encoder and its checked decoder must change
//! together.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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
/// The format version this build writes for indexes with deflate windows (it writes the others
/// as version 3 when they have continuation spans, else as version 2). It reads all three:
/// version 3's metadata is version 4's without [`IndexMeta::window_digests`] (its last field),
/// version 2's also without [`IndexMeta::continuation`], and has no [`SpanStart::Continue`]
/// span.
pub const VERSION: u32 = 4;
/// The version whose metadata ends with [`IndexMeta::continuation`].
const CONTINUATION_VERSION: u32 = 3;
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
    /// The sha256 of each deflate checkpoint's compressed window, in span order (one per
    /// [`SpanStart::Deflate`] span), so that a window fetched on its own can be checked; empty
    /// in indexes before version 4. Last, so a version-3 metadata section is this one without
    /// it.
    pub window_digests: Vec<[u8; 32]>,
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

/// Where the compressed windows are: in memory (a decoded index), in a file (an opened or just
/// built index; a window not fetched yet reads as zeros there), or not here at all (an index
/// fetched head first, before it is stored).
enum Windows {
    Memory(Vec<u8>),
    File {
        file: File,
        /// Whether windows fetched later can be written into it (an index opened from the
        /// store by its owner; they go to the file read, even if the store replaced it since).
        writable: bool,
        base: u64,
        len: u64,
    },
    Absent {
        len: u64,
    },
}

impl Windows {
    fn len(&self) -> u64 {
        match self {
            Windows::Memory(bytes) => bytes.len() as u64,
            Windows::File { len, .. } | Windows::Absent { len } => *len,
        }
    }

    /// Bytes `offset..offset+len` of the windows section (zeros where nothing is yet).
    fn read(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        match self {
            Windows::Memory(bytes) => Ok(bytes[offset as usize..(offset + len) as usize].to_vec()),
            Windows::File { file, base, .. } => {
                let mut out = vec![0; len as usize];
                file.read_exact_at(&mut out, base + offset)?;
                Ok(out)
            }
            Windows::Absent { .. } => Ok(vec![0; len as usize]),
        }
    }
}

/// The head of an encoded index (header and metadata, enough to make the layer's tree): its
/// size and digest. An index artifact's descriptor carries them, so that the head can be
/// fetched and checked on its own and each window later (only for version 4 indexes with
/// windows, whose metadata holds the windows' digests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexHead {
    /// Bytes from the start of the encoded index.
    pub size: u64,
    /// Their digest.
    pub digest: Digest,
}

impl IndexHead {
    /// The head of the encoded index `encoded`, if its windows can be fetched on their own.
    pub fn of(encoded: &[u8]) -> Option<IndexHead> {
        let size = head_len_of(encoded)?;
        Some(IndexHead {
            size,
            digest: Digest::sha256(encoded.get(..size as usize)?),
        })
    }

    /// The head of the index file `path` (see [`of`](Self::of)).
    pub fn of_file(path: &Path) -> std::io::Result<Option<IndexHead>> {
        let file = File::open(path)?;
        let mut header = [0u8; HEADER_LEN];
        if file.read_exact_at(&mut header, 0).is_err() {
            return Ok(None);
        }
        let Some(size) = head_len_of(&header) else {
            return Ok(None);
        };
        let mut head = vec![0u8; size as usize];
        file.read_exact_at(&mut head, 0)?;
        Ok(Some(IndexHead {
            size,
            digest: Digest::sha256(&head),
        }))
    }
}

/// The head length an index header announces, if the index (version 4 or later, with
/// windows) can be fetched head first.
fn head_len_of(header: &[u8]) -> Option<u64> {
    if header.len() < HEADER_LEN || &header[..8] != MAGIC {
        return None;
    }
    let version = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let meta_len = u64::from_le_bytes(header[12..20].try_into().ok()?);
    let windows_len = u64::from_le_bytes(header[28..36].try_into().ok()?);
    (version >= VERSION && windows_len > 0).then(|| HEADER_LEN as u64 + meta_len)
}

/// Where the windows of an index fetched head first are: the index blob, and the repository
/// it was fetched from (which has the layer too; another image sharing the layer may be in a
/// repository without the index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowsSource {
    /// The index blob.
    pub blob: Digest,
    /// `REGISTRY/NAME` of the repository.
    pub repository: String,
}

/// A layer's lazy index: its metadata (reachable through `Deref`) and the deflate windows,
/// which stay in their file until a span needs one.
pub struct LayerIndex {
    meta: IndexMeta,
    windows: Windows,
    /// Where the windows section starts in the encoded index, when known (a decoded or opened
    /// index): window ranges in the registry's blob are relative to it.
    head_len: Option<u64>,
    /// The spans with a deflate checkpoint, in order: window `k` (digest `window_digests[k]`)
    /// is span `deflate_spans[k]`'s.
    deflate_spans: Vec<usize>,
    /// Which windows have been found local and matching their digest.
    windows_local: Vec<AtomicBool>,
    /// Where windows not local yet come from.
    windows_source: Option<WindowsSource>,
    /// The head as it was decoded from (stored as it came, not compressed again), until the
    /// metadata is changed.
    decoded_head: Option<Vec<u8>>,
}

impl std::ops::Deref for LayerIndex {
    type Target = IndexMeta;

    fn deref(&self) -> &IndexMeta {
        &self.meta
    }
}

impl std::ops::DerefMut for LayerIndex {
    fn deref_mut(&mut self) -> &mut IndexMeta {
        self.decoded_head = None;
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
    fn assemble(meta: IndexMeta, windows: Windows, head_len: Option<u64>) -> Self {
        let deflate_spans: Vec<usize> = meta
            .spans
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.start, SpanStart::Deflate { .. }))
            .map(|(i, _)| i)
            .collect();
        let windows_local = deflate_spans
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        LayerIndex {
            meta,
            windows,
            head_len,
            deflate_spans,
            windows_local,
            windows_source: None,
            decoded_head: None,
        }
    }

    /// An index without deflate windows (one made from a layer's table of contents), checked
    /// like a decoded one.
    pub fn from_meta(meta: IndexMeta) -> Result<Self> {
        let index = LayerIndex::assemble(meta, Windows::Memory(Vec::new()), None);
        index.validate("made from the layer's table of contents")?;
        Ok(index)
    }

    /// A just-built index whose windows are in `windows_file` (checked like a decoded one);
    /// the digests of its windows are taken here.
    pub(crate) fn built(meta: IndexMeta, windows_file: File, windows_len: u64) -> Result<Self> {
        let windows = Windows::File {
            file: windows_file,
            writable: false,
            base: 0,
            len: windows_len,
        };
        let mut window_digests = Vec::new();
        for span in &meta.spans {
            if let SpanStart::Deflate {
                window_offset,
                window_len,
                ..
            } = span.start
            {
                let packed = windows
                    .read(window_offset, u64::from(window_len))
                    .map_err(|e| Error::io("reading a deflate window", e))?;
                window_digests.push(sha256(&packed));
            }
        }
        let index = LayerIndex::assemble(
            IndexMeta {
                window_digests,
                ..meta
            },
            windows,
            None,
        );
        index.validate("just built")?;
        Ok(index)
    }

    /// The index as bytes (what is stored and pushed; a window not local is zeros).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_to(&mut out)?;
        Ok(out)
    }

    /// The header and metadata of the encoded index (the [`IndexHead`]'s bytes); the windows
    /// section, [`windows_len`](Self::windows_len) bytes, follows them.
    pub fn encode_head(&self) -> Result<Vec<u8>> {
        if let Some(head) = &self.decoded_head {
            return Ok(head.clone());
        }
        let mut raw =
            postcard::to_stdvec(&self.meta).map_err(|e| Error::bad_index("encoding", e))?;
        // An index without windows is written as an older version, which older builds read
        // too (byte for byte what they wrote): its metadata is this one without the last field
        // (`window_digests`, empty: one byte), and for version 2 also without `continuation`
        // (0: one byte).
        let version = if !self.window_digests.is_empty() {
            VERSION
        } else {
            raw.pop();
            if self.continuation == 0 && !self.spans.iter().any(|s| s.start == SpanStart::Continue)
            {
                raw.pop();
                OLDEST_VERSION
            } else {
                CONTINUATION_VERSION
            }
        };
        let packed =
            zstd::bulk::compress(&raw, 9).map_err(|e| Error::io("compressing index", e))?;
        let mut out = Vec::with_capacity(HEADER_LEN + packed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(packed.len() as u64).to_le_bytes());
        out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.windows.len().to_le_bytes());
        out.extend_from_slice(&packed);
        Ok(out)
    }

    /// The length of the windows section.
    pub fn windows_len(&self) -> u64 {
        self.windows.len()
    }

    /// Writes the index to `out`, streaming the windows (they are never all in memory).
    pub fn encode_to(&self, out: &mut dyn Write) -> Result<()> {
        let head = self.encode_head()?;
        let windows_len = self.windows.len();
        let written = (|| -> std::io::Result<()> {
            out.write_all(&head)?;
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
        let mut index = LayerIndex::assemble(meta, Windows::Memory(windows), Some(start));
        index.decoded_head = Some(bytes[..start as usize].to_vec());
        index.validate(what)?;
        Ok(index)
    }

    /// Decodes and checks the head (see [`IndexHead`]) of an index of `size` bytes, whose
    /// windows are to be fetched from `source` (the index blob) when reads need them; the
    /// head must be of a version 4 index, which holds the windows' digests.
    pub fn decode_head(what: &str, head: &[u8], size: u64, source: WindowsSource) -> Result<Self> {
        let (meta_len, windows_len, meta) = decode_header_and_meta(what, size, head)?;
        if head.len() as u64 != HEADER_LEN as u64 + meta_len {
            return Err(Error::bad_index(
                what,
                format!(
                    "its head is {} bytes, its header says {}",
                    head.len(),
                    HEADER_LEN as u64 + meta_len
                ),
            ));
        }
        let mut index = LayerIndex::assemble(
            meta,
            Windows::Absent { len: windows_len },
            Some(head.len() as u64),
        );
        index.validate(what)?;
        if index.window_digests.len() != index.deflate_spans.len() {
            return Err(Error::bad_index(
                what,
                "has no window digests: its windows cannot be fetched on their own",
            ));
        }
        index.windows_source = Some(source);
        index.decoded_head = Some(head.to_vec());
        Ok(index)
    }

    /// Opens an index file: the metadata is read now, the windows when a span needs one.
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let (mut file, writable) = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(file) => (file, true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                let file = std::fs::File::open(path)
                    .map_err(|e| Error::io(format!("opening {what}"), e))?;
                (file, false)
            }
            Err(e) => return Err(Error::io(format!("opening {what}"), e)),
        };
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
        let base = HEADER_LEN as u64 + meta_len;
        let index = LayerIndex::assemble(
            meta,
            Windows::File {
                file,
                writable,
                base,
                len: windows_len,
            },
            Some(base),
        );
        index.validate(&what)?;
        Ok(index)
    }

    /// The digest of the encoded index (what a registry names it by).
    pub fn digest_of(encoded: &[u8]) -> Digest {
        Digest::sha256(encoded)
    }

    /// Where missing windows are fetched from, if some may be missing.
    pub fn windows_source(&self) -> Option<&WindowsSource> {
        self.windows_source.as_ref()
    }

    /// Says where missing windows are fetched from.
    pub fn set_windows_source(&mut self, source: Option<WindowsSource>) {
        self.windows_source = source;
    }

    /// The length of the head this index was decoded or opened with (window ranges in the
    /// index blob are relative to it).
    pub fn head_len(&self) -> Option<u64> {
        self.head_len
    }

    /// Which of the windows span `i`'s is (`None`: the span has none).
    fn window_slot(&self, i: usize) -> Option<usize> {
        self.deflate_spans.binary_search(&i).ok()
    }

    /// Whether span `i` can be decompressed from without fetching its window: it has none, or
    /// it is here and matches its digest (an index before version 4 has every window).
    pub fn window_is_local(&self, i: usize) -> bool {
        let Some(slot) = self.window_slot(i) else {
            return true;
        };
        if self.window_digests.is_empty() || self.windows_local[slot].load(Ordering::Relaxed) {
            return true;
        }
        self.packed_window(i).is_ok()
    }

    /// How many windows are not local (see [`window_is_local`](Self::window_is_local)).
    pub fn missing_windows(&self) -> usize {
        self.spans_missing_windows().len()
    }

    /// The spans whose windows are not local, in order.
    pub fn spans_missing_windows(&self) -> Vec<usize> {
        self.deflate_spans
            .iter()
            .copied()
            .filter(|&i| !self.window_is_local(i))
            .collect()
    }

    /// Where span `i`'s window is in the encoded index (what to fetch from the index blob).
    pub fn window_range(&self, i: usize) -> Option<std::ops::Range<u64>> {
        let SpanStart::Deflate {
            window_offset,
            window_len,
            ..
        } = self.spans.get(i)?.start
        else {
            return None;
        };
        let start = self.head_len? + window_offset;
        Some(start..start + u64::from(window_len))
    }

    /// Keeps span `i`'s window, fetched from the index blob, in the index file once it matches
    /// its digest.
    pub fn put_window(&self, i: usize, packed: &[u8]) -> Result<()> {
        let what = format!("of layer {}", self.blob_digest);
        let (Some(slot), Some(range)) = (self.window_slot(i), self.window_range(i)) else {
            return Err(Error::bad_index(what, format!("span {i} has no window")));
        };
        if self.window_digests.get(slot) != Some(&sha256(packed)) {
            return Err(Error::bad_index(
                what,
                format!(
                    "the window of span {i} fetched from the registry does not match its digest"
                ),
            ));
        }
        let Windows::File {
            file,
            writable: true,
            ..
        } = &self.windows
        else {
            return Err(Error::bad_index(
                what,
                "is not in a file this process may write: a fetched window has nowhere to go",
            ));
        };
        file.write_all_at(packed, range.start)
            .map_err(|e| Error::io("writing a window into its index file", e))?;
        self.windows_local[slot].store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Span `i`'s compressed window, checked against its digest (an index before version 4
    /// has none to check against: its windows came with it, under the blob's digest).
    fn packed_window(&self, i: usize) -> Result<Vec<u8>> {
        let SpanStart::Deflate {
            window_offset,
            window_len,
            ..
        } = self.spans[i].start
        else {
            return Ok(Vec::new());
        };
        let packed = self
            .windows
            .read(window_offset, u64::from(window_len))
            .map_err(|e| Error::io("reading a deflate window", e))?;
        if let Some(slot) = self.window_slot(i)
            && let Some(digest) = self.window_digests.get(slot)
            && !self.windows_local[slot].load(Ordering::Relaxed)
        {
            if sha256(&packed) != *digest {
                return Err(Error::WindowMissing {
                    layer: self.blob_digest.to_string(),
                    span: i,
                });
            }
            self.windows_local[slot].store(true, Ordering::Relaxed);
        }
        Ok(packed)
    }

    /// The deflate window span `i` resumes with (empty for other spans); an error if it is
    /// not local (see [`window_is_local`](Self::window_is_local)).
    pub fn window(&self, i: usize) -> Result<Vec<u8>> {
        let packed = self.packed_window(i)?;
        if packed.is_empty() {
            return Ok(packed);
        }
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
                window: self.window(first)?,
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
        if !self.window_digests.is_empty() && self.window_digests.len() != self.deflate_spans.len()
        {
            return bad(format!(
                "{} window digests for {} windows",
                self.window_digests.len(),
                self.deflate_spans.len()
            ));
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
    let Some(packed) = bytes.get(HEADER_LEN..HEADER_LEN + meta_len as usize) else {
        return Err(Error::bad_index(what, "truncated metadata"));
    };
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(packed)
        .map_err(|e| Error::io(what, e))?
        .take(meta_raw_len + 1)
        .read_to_end(&mut raw)
        .map_err(|e| Error::bad_index(what, format!("metadata does not decompress: {e}")))?;
    if raw.len() as u64 != meta_raw_len {
        return Err(Error::bad_index(what, "metadata has the wrong length"));
    }
    // Older versions end before `continuation` (version 2) or `window_digests` (version 3):
    // 0 and an empty list, as postcard writes them.
    if version < CONTINUATION_VERSION {
        raw.push(0);
    }
    if version < VERSION {
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
