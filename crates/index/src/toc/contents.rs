//! What the tables of contents of eStargz and zstd:chunked layers share: the JSON that
//! stargz-snapshotter (and containers/storage, with a few more fields) writes, the file table
//! made from it, and the spans of the file data chunks.

use std::collections::BTreeMap;
use std::ops::Range;

use base64::Engine as _;
use bytes::Bytes;
use lazylayer_source::{BlobDescriptor, Digest, DigestAlgorithm, ImageSource};
use serde::Deserialize;

use crate::build::DEFAULT_SPACING;
use crate::build::table::Table;
use crate::entry::{Entry, EntryKind};
use crate::format::{Compression, IndexMeta, LayerIndex, Span, SpanStart, sha256};
use crate::{Error, Result};

/// The table of contents as eStargz and zstd:chunked write it (fields lazylayer uses).
#[derive(Deserialize)]
pub(super) struct Jtoc {
    version: i64,
    entries: Vec<TocEntry>,
}

#[derive(Deserialize)]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default, rename = "linkName")]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: i64,
    #[serde(default)]
    gid: i64,
    #[serde(default)]
    offset: i64,
    #[serde(default, rename = "devMajor")]
    dev_major: i64,
    #[serde(default, rename = "devMinor")]
    dev_minor: i64,
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default)]
    digest: String,
    #[serde(default, rename = "chunkOffset")]
    chunk_offset: i64,
    #[serde(default, rename = "chunkSize")]
    chunk_size: i64,
    #[serde(default, rename = "chunkDigest")]
    chunk_digest: String,
}

/// The error of `format` layer `layer` for `reason`.
pub(super) fn bad_layer(layer: &BlobDescriptor, format: &str, reason: String) -> Error {
    Error::BadLayer {
        layer: layer.digest.to_string(),
        reason: format!("{format}: {reason}"),
    }
}

/// Refuses a `format` announcement on a layer whose media type is not `compression`.
pub(super) fn require_compression(
    layer: &BlobDescriptor,
    format: &str,
    compression: Compression,
) -> Result<()> {
    if Compression::from_media_type(&layer.media_type) != Some(compression) {
        return Err(bad_layer(
            layer,
            format,
            format!(
                "announced on a layer of media type {}, not {}",
                layer.media_type,
                compression.name()
            ),
        ));
    }
    Ok(())
}

/// The index of `layer` made from its table of contents: its spans, file table and the length
/// of its uncompressed stream; checked like a decoded one.
pub(super) fn index_of(
    layer: &BlobDescriptor,
    compression: Compression,
    diff_id: &Digest,
    uncompressed_size: u64,
    spans: Vec<Span>,
    table: Table,
) -> Result<LayerIndex> {
    LayerIndex::from_meta(IndexMeta {
        blob_digest: layer.digest.clone(),
        blob_size: layer.size,
        media_type: layer.media_type.clone(),
        diff_id: diff_id.clone(),
        compression,
        uncompressed_size,
        spacing: DEFAULT_SPACING,
        spans,
        entries: table.finish(),
        continuation: 0,
        window_digests: Vec::new(),
    })
}

/// The file table of a table of contents, and the chunks of file data in blob order.
pub(super) struct Contents {
    /// The entries, in tar order.
    pub table: Table,
    /// Every chunk of file data.
    pub chunks: Vec<Chunk>,
    /// The length of the file data: where the index's uncompressed stream ends.
    pub data_len: u64,
}

/// A chunk of file data: where its compressed unit (gzip member, zstd frame) starts, its
/// length and sha256.
pub(super) struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub digest: [u8; 32],
}

/// Reads the `format` table of contents `json` of `layer`.
pub(super) fn read(layer: &str, format: &str, json: &[u8]) -> Result<Contents> {
    let name = layer.to_string();
    let bad = |reason: String| Error::BadLayer {
        layer: name.clone(),
        reason: format!("{format}: {reason}"),
    };
    let toc: Jtoc = serde_json::from_slice(json)
        .map_err(|e| bad(format!("the table of contents is not {format} JSON: {e}")))?;
    if toc.version != 1 {
        return Err(bad(format!(
            "table of contents version {}, lazylayer reads version 1",
            toc.version
        )));
    }
    let mut table = Table::new(&name);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut cursor = 0u64;
    let mut entries = toc.entries.iter().peekable();
    while let Some(item) = entries.next() {
        let path = item.name.as_bytes();
        let (mut entry, data) = entry_from(item).map_err(|e| Error::BadEntry {
            layer: name.clone(),
            path: item.name.clone(),
            reason: format!("{format} table of contents: {e}"),
        })?;
        if data {
            entry.data_offset = cursor;
            let mut written = 0u64;
            let mut chunk = item;
            loop {
                let len = chunk_len(chunk, entry.size, written).map_err(|e| Error::BadEntry {
                    layer: name.clone(),
                    path: item.name.clone(),
                    reason: format!("{format} table of contents: {e}"),
                })?;
                let offset = u64::try_from(chunk.offset).unwrap_or(0);
                if offset < chunks.last().map_or(1, |c: &Chunk| c.offset + 1) {
                    return Err(bad(format!(
                        "a chunk of {} is at offset {}, not after the one before",
                        item.name, chunk.offset
                    )));
                }
                chunks.push(Chunk {
                    offset,
                    len,
                    // containers/storage gives a file in one chunk only the file's digest.
                    digest: sha256_digest(&chunk.chunk_digest)
                        .or_else(|| {
                            (len == entry.size && chunk.chunk_digest.is_empty())
                                .then_some(entry.digest)
                                .flatten()
                        })
                        .ok_or_else(|| bad(format!("a chunk of {} has no sha256", item.name)))?,
                });
                written += len;
                cursor = cursor
                    .checked_add(len)
                    .ok_or_else(|| bad("the files' sizes add up past 2^64 bytes".to_string()))?;
                if written == entry.size {
                    break;
                }
                chunk = entries
                    .next_if(|next| next.kind == "chunk" && next.name == item.name)
                    .ok_or_else(|| {
                        bad(format!(
                            "{} has chunks for {written} of its {} bytes",
                            item.name, entry.size
                        ))
                    })?;
            }
        }
        table.add(path, entry)?;
    }
    Ok(Contents {
        table,
        chunks,
        data_len: cursor,
    })
}

/// The spans of the blob up to `data_end` (where the last chunk's unit ends): the tar headers
/// before the first chunk, checked by their sha256 (fetched now unless `head`, the first
/// bytes of the blob, holds them), then a span per chunk, to the next chunk's start.
pub(super) async fn data_spans(
    source: &ImageSource,
    layer: &BlobDescriptor,
    head: Bytes,
    chunks: &[Chunk],
    data_end: u64,
) -> Result<Vec<Span>> {
    let first_chunk = chunks.first().map_or(data_end, |c| c.offset);
    if first_chunk > data_end || chunks.last().is_some_and(|c| c.offset >= data_end) {
        return Err(Error::BadLayer {
            layer: layer.digest.to_string(),
            reason: "a chunk lies past the file data, in the table of contents".into(),
        });
    }
    let head = if first_chunk <= head.len() as u64 {
        head.slice(..first_chunk as usize)
    } else {
        source.read_range(&layer.digest, 0..first_chunk).await?
    };
    let mut spans = vec![Span {
        compressed_start: 0,
        compressed_end: first_chunk,
        uncompressed_start: 0,
        digest: sha256(&head),
        start: SpanStart::Fresh,
    }];
    let mut at = 0u64;
    for (i, chunk) in chunks.iter().enumerate() {
        let end = chunks.get(i + 1).map_or(data_end, |c| c.offset);
        spans.push(Span {
            compressed_start: chunk.offset,
            compressed_end: end,
            uncompressed_start: at,
            digest: chunk.digest,
            start: SpanStart::Chunk { len: chunk.len },
        });
        at += chunk.len;
    }
    Ok(spans)
}

/// The index entry of a table-of-contents entry, and whether it has chunks of data.
fn entry_from(item: &TocEntry) -> std::result::Result<(Entry, bool), String> {
    let kind = match item.kind.as_str() {
        "dir" => EntryKind::Dir,
        "reg" => EntryKind::File,
        "symlink" => EntryKind::Symlink,
        "hardlink" => EntryKind::Hardlink,
        "char" => EntryKind::CharDevice,
        "block" => EntryKind::BlockDevice,
        "fifo" => EntryKind::Fifo,
        "chunk" => return Err("a chunk without its file before it".into()),
        other => return Err(format!("unknown type {other:?}")),
    };
    let number = |value: i64, what: &str| {
        u64::try_from(value).map_err(|_| format!("negative {what} {value}"))
    };
    let (mtime, mtime_nsec) = match &item.modtime {
        Some(text) => parse_rfc3339(text).ok_or_else(|| format!("bad modtime {text:?}"))?,
        None => (0, 0),
    };
    let mut xattrs = Vec::new();
    for (key, value) in &item.xattrs {
        let value = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| format!("xattr {key} is not base64"))?;
        xattrs.push((key.as_bytes().to_vec(), value));
    }
    let size = if kind == EntryKind::File {
        number(item.size, "size")?
    } else {
        0
    };
    let digest = if kind == EntryKind::File {
        // containers/storage leaves out the digest of an empty file.
        let empty = (size == 0 && item.digest.is_empty()).then(|| sha256(b""));
        Some(
            sha256_digest(&item.digest)
                .or(empty)
                .ok_or("a file without its sha256")?,
        )
    } else {
        None
    };
    let link = matches!(kind, EntryKind::Symlink | EntryKind::Hardlink)
        .then(|| item.link_name.as_bytes().to_vec());
    let device = matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice)
        .then(|| -> std::result::Result<(u32, u32), String> {
            Ok((
                u32::try_from(item.dev_major).map_err(|_| "bad device major")?,
                u32::try_from(item.dev_minor).map_err(|_| "bad device minor")?,
            ))
        })
        .transpose()?;
    let entry = Entry {
        path: Vec::new(),
        kind,
        mode: (item.mode & 0o7777) as u32,
        uid: number(item.uid, "uid")?,
        gid: number(item.gid, "gid")?,
        mtime,
        mtime_nsec,
        size,
        link,
        device,
        xattrs,
        data_offset: 0,
        sparse: None,
        digest,
        opaque: false,
        implied: false,
    };
    Ok((entry, size > 0))
}

/// The length of `chunk` of a `size`-byte file of which `written` bytes are in earlier chunks.
fn chunk_len(chunk: &TocEntry, size: u64, written: u64) -> std::result::Result<u64, String> {
    if u64::try_from(chunk.chunk_offset) != Ok(written) {
        return Err(format!(
            "a chunk at file offset {}, the chunks before end at {written}",
            chunk.chunk_offset
        ));
    }
    let left = size - written;
    let len = match chunk.chunk_size {
        0 => left,
        n if n > 0 && (n as u64) <= left => n as u64,
        n => return Err(format!("a chunk of {n} bytes with {left} left")),
    };
    Ok(len)
}

/// The raw sha256 of a `sha256:HEX` digest.
fn sha256_digest(text: &str) -> Option<[u8; 32]> {
    let digest: Digest = text.parse().ok()?;
    if digest.algorithm() != DigestAlgorithm::Sha256 {
        return None;
    }
    let hex = digest.hex();
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Seconds and nanoseconds since the epoch of an RFC 3339 time (`2006-01-02T15:04:05Z`,
/// optionally with a fraction and a numeric offset), as eStargz writes modtimes.
fn parse_rfc3339(text: &str) -> Option<(i64, u32)> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let num = |range: Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = fraction[..digits].parse::<u32>().ok()? * 10u32.pow(9 - digits as u32);
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let minutes = rest[1..3].parse::<i64>().ok()? * 60 + rest[4..6].parse::<i64>().ok()?;
            if rest.starts_with('-') {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset * 60;
    Some((seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2023-06-01T12:34:56Z"),
            Some((1_685_622_896, 0))
        );
        assert_eq!(
            parse_rfc3339("2023-06-01T14:34:56.5+02:00"),
            Some((1_685_622_896, 500_000_000))
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(parse_rfc3339("2023-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
