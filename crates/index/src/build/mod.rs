//! Building a layer's index in one streaming pass: the blob is decompressed once (cutting
//! spans and hashing them), the uncompressed stream is hashed (diff_id) and walked as a tar
//! (the file table). Nothing of the blob is kept; memory stays bounded by the buffers.
//!
//! Why one file of this size: one streaming pass and the tests of its bounds (the tar walk is in
//! `table.rs`, the header guard in `header_guard.rs`).

pub mod header_guard;
pub mod slots;
pub mod table;

use std::collections::BTreeMap;
use std::io::{self, Read};

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_source::{BlobDescriptor, Digest, DigestAlgorithm, DigestHasher, ImageSource};
use tokio::sync::mpsc;

use self::header_guard::HeaderGuard;
use self::slots::{Checked, Mismatch, Sameness, Slots};
use self::table::{MAX_ENTRIES, Table, parse_sparse_map_01, read_sparse_map};
use crate::codec;
use crate::entry::{Entry, EntryKind};
use crate::format::{Compression, IndexMeta, LayerIndex};
use crate::{Error, Result};

/// Default checkpoint spacing, in compressed bytes (see docs/benchmarks.md for the choice).
pub const DEFAULT_SPACING: u64 = 384 << 10;

/// Default continuation spacing of gzip layers, in compressed bytes: a read fetches and
/// verifies from its span's checkpoint up to the end of what it needs, in pieces this size,
/// instead of whole checkpoint spans (see docs/benchmarks.md, "continuation spans").
pub const DEFAULT_CONTINUATION: u64 = 64 << 10;

/// How to build.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    /// Compressed bytes between checkpoints (at least; checkpoints fall on block or frame
    /// boundaries).
    pub spacing: u64,
    /// Compressed bytes between the cuts of continuation spans, which have a digest but no
    /// checkpoint (at least; they fall on deflate block boundaries); 0 for none. gzip only.
    pub continuation: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            spacing: DEFAULT_SPACING,
            continuation: DEFAULT_CONTINUATION,
        }
    }
}

impl BuildOptions {
    /// Checkpoints every `spacing` bytes and no continuation spans (the format-2 layout).
    pub fn spans_of(spacing: u64) -> Self {
        BuildOptions {
            spacing,
            continuation: 0,
        }
    }
}

/// Builds the index of `layer` from `source`, checking the blob digest and, when given, the
/// diff_id. The CPU work runs on a blocking thread; the blob streams through a small channel.
pub async fn build(
    source: &ImageSource,
    layer: &BlobDescriptor,
    diff_id: Option<&Digest>,
    options: BuildOptions,
) -> Result<LayerIndex> {
    build_teeing(source, layer, diff_id, options, None, &|_| {}).await
}

/// Builds the index while keeping the blob's bytes in the span cache under `span_dir`, so a
/// layer that had no index is fetched once: afterwards every span is local (and verified, since
/// the whole blob matched its digest). `progress` hears the bytes fetched so far.
pub async fn build_and_cache(
    source: &ImageSource,
    layer: &BlobDescriptor,
    diff_id: Option<&Digest>,
    options: BuildOptions,
    span_dir: &std::path::Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<LayerIndex> {
    std::fs::create_dir_all(span_dir)
        .map_err(|e| Error::io(format!("creating {}", span_dir.display()), e))?;
    let data = span_dir.join(format!("{}.spans", layer.digest.hex()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&data)
        .map_err(|e| Error::io(format!("opening {}", data.display()), e))?;
    let index = build_teeing(source, layer, diff_id, options, Some(&file), progress).await?;
    crate::read::cache::SpanCache::open(span_dir, &index)?.mark_all_present()?;
    Ok(index)
}

async fn build_teeing(
    source: &ImageSource,
    layer: &BlobDescriptor,
    diff_id: Option<&Digest>,
    options: BuildOptions,
    tee: Option<&std::fs::File>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<LayerIndex> {
    use std::os::unix::fs::FileExt;
    let mut stream = source.open_blob(layer).await?;
    let mut offset = 0u64;
    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(16);
    let layer_owned = layer.clone();
    let diff_id = diff_id.cloned();
    let worker = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            receiver,
            current: Bytes::new(),
        };
        build_from_reader(reader, &layer_owned, diff_id.as_ref(), options)
    });
    while let Some(chunk) = stream.next().await {
        if let Ok(bytes) = &chunk {
            if let Some(file) = tee {
                file.write_all_at(bytes, offset)
                    .map_err(|e| Error::io("writing the span cache", e))?;
            }
            offset += bytes.len() as u64;
            progress(offset);
        }
        let item = chunk.map_err(|e| io::Error::other(e.to_string()));
        let failed = item.is_err();
        if sender.send(item).await.is_err() || failed {
            break; // the builder stopped (it reports why) or the blob failed
        }
    }
    drop(sender);
    worker.await.map_err(|e| Error::BadLayer {
        layer: layer.digest.to_string(),
        reason: format!("index builder failed: {e}"),
    })?
}

/// A blocking reader over chunks sent from the async side.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Counts and hashes the uncompressed stream as the tar walker reads it.
struct Uncompressed<R> {
    inner: R,
    hasher: DigestHasher,
}

impl<R: Read> Read for Uncompressed<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        Ok(n)
    }
}

/// Builds the index from the blob's bytes (already being verified by the caller's stream:
/// a wrong digest must surface as a read error at the end).
pub fn build_from_reader<R: Read + Send + 'static>(
    blob: R,
    layer: &BlobDescriptor,
    diff_id: Option<&Digest>,
    options: BuildOptions,
) -> Result<LayerIndex> {
    let name = layer.digest.to_string();
    let (table, built) = walk_blob(blob, layer, diff_id, options, Table::new(&name))?;
    let entries = table.finish();
    LayerIndex::built(
        IndexMeta {
            entries,
            ..built.meta
        },
        built.windows_file,
        built.windows_len,
    )
}

/// What the blob rebuilds of an index whose file table was compared as the tar was walked.
pub(crate) struct Rebuilt {
    /// The index rebuilt but for its file table, which is empty.
    pub index: LayerIndex,
    /// Whether the walk's file table is the one compared with; where it first differs if not.
    pub entries: std::result::Result<(), Box<Mismatch>>,
}

/// Rebuilds the index from the blob's bytes (verified as [`build_from_reader`]'s are), comparing
/// the file table entry by entry with `claimed` as the tar is walked: the rebuilt table is
/// never held whole beside the one in use (see [`slots`]).
pub(crate) fn rebuild_comparing<R: Read + Send + 'static>(
    blob: R,
    layer: &BlobDescriptor,
    diff_id: Option<&Digest>,
    options: BuildOptions,
    claimed: &[Entry],
    sameness: Sameness,
) -> Result<Rebuilt> {
    let name = layer.digest.to_string();
    let table = Table::in_slots(&name, Checked::new(claimed, sameness), MAX_ENTRIES);
    let (table, built) = walk_blob(blob, layer, diff_id, options, table)?;
    let entries = table.into_slots().compare();
    let index = LayerIndex::built(built.meta, built.windows_file, built.windows_len)?;
    Ok(Rebuilt { index, entries })
}

/// An index's parts from its blob, but for its file table (empty in `meta`).
struct BuiltParts {
    meta: IndexMeta,
    windows_file: std::fs::File,
    windows_len: u64,
}

/// Decompresses the blob once, cutting spans, hashing the uncompressed stream (checked against
/// `diff_id` when given) and walking it as a tar into `table`.
fn walk_blob<R: Read + Send + 'static, S: Slots>(
    blob: R,
    layer: &BlobDescriptor,
    diff_id: Option<&Digest>,
    options: BuildOptions,
    table: Table<S>,
) -> Result<(Table<S>, BuiltParts)> {
    let name = layer.digest.to_string();
    let bad = |reason: String| Error::BadLayer {
        layer: name.clone(),
        reason,
    };
    let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
        bad(format!(
            "media type {} is not a tar layer lazylayer can index",
            layer.media_type
        ))
    })?;
    let indexer = codec::indexer(compression, blob, options.spacing, options.continuation)
        .map_err(|e| bad(e.to_string()))?;
    let mut uncompressed = Uncompressed {
        inner: indexer,
        hasher: DigestHasher::new(DigestAlgorithm::Sha256),
    };
    let table = walk_tar(&name, &mut HeaderGuard::new(&mut uncompressed), table)?;
    // The tar's end marker may be followed by padding: it is part of the diff_id.
    io::copy(&mut uncompressed, &mut io::sink()).map_err(|e| bad(e.to_string()))?;
    let uncompressed_size = uncompressed.hasher.len();
    let actual_diff_id = uncompressed.hasher.finish();
    if let Some(expected) = diff_id
        && expected != &actual_diff_id
    {
        return Err(Error::DiffIdMismatch {
            layer: name,
            expected: expected.clone(),
            actual: actual_diff_id,
        });
    }
    let (spans, windows) = uncompressed
        .inner
        .finish()
        .map_err(|e| bad(e.to_string()))?;
    let (windows_file, windows_len) = windows.into_parts();
    let meta = IndexMeta {
        blob_digest: layer.digest.clone(),
        blob_size: layer.size,
        media_type: layer.media_type.clone(),
        diff_id: actual_diff_id,
        compression,
        uncompressed_size,
        spacing: options.spacing,
        spans,
        entries: Vec::new(),
        // Only gzip layers have continuation spans; the others stay readable by builds
        // that know only version 2.
        continuation: match compression {
            Compression::Gzip => options.continuation,
            Compression::Zstd | Compression::None => 0,
        },
        // Taken from the windows file by `LayerIndex::built`.
        window_digests: Vec::new(),
    };
    Ok((
        table,
        BuiltParts {
            meta,
            windows_file,
            windows_len,
        },
    ))
}

/// Walks the tar into `table`.
fn walk_tar<R: Read, S: Slots>(
    layer: &str,
    reader: &mut R,
    mut table: Table<S>,
) -> Result<Table<S>> {
    let bad_layer = |reason: String| Error::BadLayer {
        layer: layer.to_string(),
        reason,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad_layer(format!("tar: {e}")))?;
    for item in entries {
        let mut tar_entry = item.map_err(|e| bad_layer(format!("tar: {e}")))?;
        if let Some((path, entry)) = entry_of(layer, &mut tar_entry, true)? {
            table.add(&path, entry)?;
        }
    }
    Ok(table)
}

/// The index entry a tar member makes, with its raw path (`None` for a PAX global header),
/// its data hashed when `hash` (else `digest` is `None`). Reads the member's sparse map, and
/// with `hash` its data.
pub(crate) fn entry_of<R: Read>(
    layer: &str,
    tar_entry: &mut tar::Entry<'_, R>,
    hash: bool,
) -> Result<Option<(Vec<u8>, Entry)>> {
    let raw_path = tar_entry.path_bytes().into_owned();
    let bad_entry = |reason: String| Error::BadEntry {
        layer: layer.to_string(),
        path: String::from_utf8_lossy(&raw_path).into_owned(),
        reason,
    };
    let header = tar_entry.header().clone();
    let pax: BTreeMap<String, Vec<u8>> = match tar_entry.pax_extensions() {
        Ok(Some(extensions)) => extensions
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.key().ok()?.to_string(), e.value_bytes().to_vec())))
            .collect(),
        Ok(None) => BTreeMap::new(),
        Err(e) => return Err(bad_entry(format!("PAX header: {e}"))),
    };
    let pax_str = |key: &str| pax.get(key).and_then(|v| std::str::from_utf8(v).ok());
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Link => EntryKind::Hardlink,
        tar::EntryType::Char => EntryKind::CharDevice,
        tar::EntryType::Block => EntryKind::BlockDevice,
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::XGlobalHeader => return Ok(None),
        tar::EntryType::GNUSparse => {
            return Err(bad_entry("old GNU sparse entries are not supported (GNU tar --format=pax writes supported ones)".into()));
        }
        other => return Err(bad_entry(format!("unsupported tar entry type {other:?}"))),
    };
    let number = |value: io::Result<u64>, what: &str| {
        value.map_err(|e| bad_entry(format!("bad {what}: {e}")))
    };
    let mode = header
        .mode()
        .map_err(|e| bad_entry(format!("bad mode: {e}")))?
        & 0o7777;
    let uid = match pax_str("uid") {
        Some(v) => v.parse().map_err(|_| bad_entry("bad PAX uid".into()))?,
        None => number(header.uid(), "uid")?,
    };
    let gid = match pax_str("gid") {
        Some(v) => v.parse().map_err(|_| bad_entry("bad PAX gid".into()))?,
        None => number(header.gid(), "gid")?,
    };
    let (mtime, mtime_nsec) = match pax_str("mtime") {
        Some(v) => parse_pax_time(v).ok_or_else(|| bad_entry(format!("bad PAX mtime {v:?}")))?,
        None => (number(header.mtime(), "mtime")? as i64, 0),
    };
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (key, value) in &pax {
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            xattrs.push((name.as_bytes().to_vec(), value.clone()));
        } else if let Some(name) = key.strip_prefix("LIBARCHIVE.xattr.") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(value.strip_suffix(b"=").unwrap_or(value))
                .or_else(|_| base64::engine::general_purpose::STANDARD.decode(value))
                .map_err(|_| bad_entry(format!("bad base64 in {key}")))?;
            let name = percent_decode(name);
            if !xattrs.iter().any(|(n, _)| *n == name) {
                xattrs.push((name, decoded));
            }
        }
    }
    xattrs.sort();
    let device = match kind {
        EntryKind::CharDevice | EntryKind::BlockDevice => Some((
            header
                .device_major()
                .map_err(|e| bad_entry(format!("bad device major: {e}")))?
                .unwrap_or(0),
            header
                .device_minor()
                .map_err(|e| bad_entry(format!("bad device minor: {e}")))?
                .unwrap_or(0),
        )),
        _ => None,
    };
    let link = match kind {
        EntryKind::Symlink | EntryKind::Hardlink => Some(
            tar_entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .ok_or_else(|| bad_entry("link without a target".into()))?,
        ),
        _ => None,
    };
    let stored = tar_entry.size();
    let mut data_offset = tar_entry.raw_file_position();
    let mut size = if kind == EntryKind::File { stored } else { 0 };
    let mut sparse = None;
    let mut path = raw_path.clone();
    let is_sparse = ["GNU.sparse.major", "GNU.sparse.map", "GNU.sparse.size"]
        .iter()
        .any(|key| pax.contains_key(*key));
    if kind == EntryKind::File && is_sparse {
        let real_size: u64 = pax_str("GNU.sparse.realsize")
            .or_else(|| pax_str("GNU.sparse.size"))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad_entry("sparse file without its real size".into()))?;
        if let Some(name) = pax.get("GNU.sparse.name") {
            path = name.clone();
        }
        let segments = match (pax_str("GNU.sparse.major"), pax_str("GNU.sparse.minor")) {
            (Some("1"), Some("0")) => {
                let (segments, map_len) =
                    read_sparse_map(tar_entry, stored, real_size).map_err(bad_entry)?;
                data_offset += map_len;
                segments
            }
            (None | Some("0"), _) if pax.contains_key("GNU.sparse.map") => {
                parse_sparse_map_01(pax_str("GNU.sparse.map").unwrap_or(""), real_size)
                    .map_err(bad_entry)?
            }
            _ => {
                return Err(bad_entry(
                    "unsupported GNU sparse format (1.0 and 0.1 are supported)".into(),
                ));
            }
        };
        let stored_total: u64 = segments.iter().map(|(_, len)| len).sum();
        if data_offset - tar_entry.raw_file_position() + stored_total > stored {
            return Err(bad_entry("the sparse data is larger than the entry".into()));
        }
        size = real_size;
        sparse = Some(segments);
    }
    let digest = if kind == EntryKind::File && hash {
        let stored_total = match &sparse {
            Some(segments) => segments.iter().map(|(_, len)| len).sum(),
            None => stored,
        };
        Some(hash_data(tar_entry, stored_total).map_err(bad_entry)?)
    } else {
        None
    };
    Ok(Some((
        path,
        Entry {
            path: Vec::new(),
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
            data_offset: if kind == EntryKind::File {
                data_offset
            } else {
                0
            },
            sparse,
            digest,
            opaque: false,
            implied: false,
        },
    )))
}

/// sha256 of the next `len` bytes of a file's stored data.
fn hash_data(data: &mut impl Read, len: u64) -> std::result::Result<[u8; 32], String> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    const CHUNK: usize = 64 << 10;
    let mut buffer = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = data
            .read(&mut buffer[..left.min(CHUNK as u64) as usize])
            .map_err(|e| format!("reading file data: {e}"))?;
        if n == 0 {
            return Err("file data ends early".into());
        }
        hasher.update(&buffer[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

/// PAX times: decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(text: &str) -> Option<(i64, u32)> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let seconds: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = fraction.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let mut nanos: u32 = digits.parse().ok()?;
    let mut seconds = seconds;
    if whole.starts_with('-') && nanos > 0 {
        // -1.5 is half a second before -1: seconds -2, nanos 500000000.
        seconds -= 1;
        nanos = 1_000_000_000 - nanos;
    }
    Some((seconds, nanos))
}

/// libarchive percent-encodes xattr names in PAX keys.
fn percent_decode(name: &str) -> Vec<u8> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&name[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("981173106.123456789"),
            Some((981173106, 123456789))
        );
        assert_eq!(parse_pax_time("12.5"), Some((12, 500000000)));
        assert_eq!(parse_pax_time("7"), Some((7, 0)));
        assert_eq!(parse_pax_time("-1.5"), Some((-2, 500000000)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.2e3"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("user.a%3Db"), b"user.a=b");
        assert_eq!(percent_decode("user.plain"), b"user.plain");
    }
}
