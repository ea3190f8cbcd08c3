//! eStargz (stargz-snapshotter's layout, written by `ctr-remote image convert --estargz` and
//! nerdctl): a gzip tar whose file data is cut into chunks, each in its own gzip member, with
//! the table of contents (`stargz.index.json`, itself a tar entry) in a gzip member after the
//! last file, and a 51-byte footer (an empty gzip member whose extra field holds the table's
//! offset). The table lists every entry in tar order with its metadata, and each chunk with
//! the offset of its member and the sha256 of its data.
//!
//! The index made from it has the spans: the members before the first chunk (tar headers,
//! checked by their compressed sha256, fetched here), one span per chunk (from its member to
//! the next chunk's, so the tar headers after a file's last chunk ride along unread), the
//! table's member (its whole output, the `stargz.index.json` entry included) and the footer.
//! Its uncompressed stream is the chunks back to back: tar headers take no room in it.

use std::collections::BTreeMap;
use std::ops::Range;

use base64::Engine as _;
use lazylayer_source::{BlobDescriptor, Digest, DigestAlgorithm, ImageSource};
use serde::Deserialize;

use crate::build::table::Table;
use crate::build::{DEFAULT_SPACING, entry_of};
use crate::codec::gzip::inflate_member;
use crate::entry::{Entry, EntryKind};
use crate::format::{Compression, IndexMeta, LayerIndex, Span, SpanStart, sha256};
use crate::{Error, Result};

/// The footer's size (the legacy 47-byte footer of stargz before eStargz is not read).
pub const FOOTER_SIZE: u64 = 51;
/// The name of the table of contents in the tar stream.
pub const TOC_TAR_NAME: &[u8] = b"stargz.index.json";
/// The largest table of contents read: compressed, and as JSON.
const MAX_TOC_COMPRESSED: u64 = 64 << 20;
const MAX_TOC_JSON: usize = 512 << 20;
/// Bytes read from the start of the blob together with the footer: the tar headers before the
/// first chunk usually fit, and then cost no round trip of their own.
const HEAD_GUESS: u64 = 64 << 10;

/// The table of contents as eStargz writes it (fields lazylayer uses).
#[derive(Deserialize)]
struct Jtoc {
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

/// Makes the index of eStargz `layer` from its table of contents (see the module docs).
pub async fn index(
    source: &ImageSource,
    layer: &BlobDescriptor,
    toc_digest: &Digest,
    diff_id: &Digest,
) -> Result<LayerIndex> {
    let name = layer.digest.to_string();
    let bad = |reason: String| Error::BadLayer {
        layer: name.clone(),
        reason: format!("eStargz: {reason}"),
    };
    if Compression::from_media_type(&layer.media_type) != Some(Compression::Gzip) {
        return Err(bad(format!(
            "announced on a layer of media type {}, not gzip",
            layer.media_type
        )));
    }
    let size = layer.size;
    if size < FOOTER_SIZE + 20 {
        return Err(bad(format!("a {size}-byte blob has no room for a footer")));
    }
    let footer_at = size - FOOTER_SIZE;
    let head_len = HEAD_GUESS.min(footer_at);
    let (footer, head) = tokio::try_join!(
        source.read_range(&layer.digest, footer_at..size),
        source.read_range(&layer.digest, 0..head_len),
    )?;
    let toc_offset = parse_footer(&footer).map_err(&bad)?;
    if toc_offset == 0 || toc_offset >= footer_at || footer_at - toc_offset > MAX_TOC_COMPRESSED {
        return Err(bad(format!(
            "the footer puts the table of contents at {toc_offset} of a {size}-byte blob"
        )));
    }
    let toc_member = source
        .read_range(&layer.digest, toc_offset..footer_at)
        .await?;
    let toc_output = inflate_member(&toc_member, MAX_TOC_JSON + (64 << 10))
        .map_err(|e| bad(format!("the table of contents does not decompress: {e}")))?;
    let (toc_entry, json_range) = toc_tar_entry(&name, &toc_output)?;
    let json = &toc_output[json_range.clone()];
    let actual = Digest::compute(toc_digest.algorithm(), json);
    if &actual != toc_digest {
        return Err(bad(format!(
            "the table of contents is {actual}, the manifest's annotation says {toc_digest}"
        )));
    }
    let toc: Jtoc = serde_json::from_slice(json)
        .map_err(|e| bad(format!("the table of contents is not eStargz JSON: {e}")))?;
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
            reason: format!("eStargz table of contents: {e}"),
        })?;
        if data {
            entry.data_offset = cursor;
            let mut written = 0u64;
            let mut chunk = item;
            loop {
                let len = chunk_len(chunk, entry.size, written).map_err(|e| Error::BadEntry {
                    layer: name.clone(),
                    path: item.name.clone(),
                    reason: format!("eStargz table of contents: {e}"),
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
                    digest: sha256_digest(&chunk.chunk_digest)
                        .ok_or_else(|| bad(format!("a chunk of {} has no sha256", item.name)))?,
                });
                written += len;
                cursor += len;
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
    // The table itself is the last entry of the tar stream.
    let toc_start = cursor;
    let mut toc_file = toc_entry;
    toc_file.data_offset = toc_start + json_range.start as u64;
    toc_file.digest = Some(sha256(json));
    table.add(TOC_TAR_NAME, toc_file)?;
    let uncompressed_size = toc_start + toc_output.len() as u64;

    let first_chunk = chunks.first().map_or(toc_offset, |c| c.offset);
    if first_chunk >= toc_offset {
        return Err(bad("a chunk lies in the table of contents".into()));
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
        let end = chunks.get(i + 1).map_or(toc_offset, |c| c.offset);
        spans.push(Span {
            compressed_start: chunk.offset,
            compressed_end: end,
            uncompressed_start: at,
            digest: chunk.digest,
            start: SpanStart::Chunk { len: chunk.len },
        });
        at += chunk.len;
    }
    spans.push(Span {
        compressed_start: toc_offset,
        compressed_end: footer_at,
        uncompressed_start: toc_start,
        digest: sha256(&toc_output),
        start: SpanStart::Chunk {
            len: toc_output.len() as u64,
        },
    });
    spans.push(Span {
        compressed_start: footer_at,
        compressed_end: size,
        uncompressed_start: uncompressed_size,
        digest: sha256(&footer),
        start: SpanStart::Fresh,
    });
    LayerIndex::from_meta(IndexMeta {
        blob_digest: layer.digest.clone(),
        blob_size: size,
        media_type: layer.media_type.clone(),
        diff_id: diff_id.clone(),
        compression: Compression::Gzip,
        uncompressed_size,
        spacing: DEFAULT_SPACING,
        spans,
        entries: table.finish(),
    })
}

/// A chunk of file data: where its gzip member starts, its length and sha256.
struct Chunk {
    offset: u64,
    len: u64,
    digest: [u8; 32],
}

/// The TOC offset the footer holds: an empty gzip member whose extra field has the subfield
/// `SG`, 22 bytes: 16 hex digits and `STARGZ`.
fn parse_footer(footer: &[u8]) -> std::result::Result<u64, String> {
    let bad = || "the blob does not end with an eStargz footer".to_string();
    if footer.len() != FOOTER_SIZE as usize || footer[..3] != [0x1f, 0x8b, 8] {
        return Err(bad());
    }
    if footer[3] & 4 == 0 {
        return Err(bad());
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]) as usize;
    let extra = footer.get(12..12 + xlen).ok_or_else(bad)?;
    if xlen != 26 || &extra[..2] != b"SG" || u16::from_le_bytes([extra[2], extra[3]]) != 22 {
        return Err(bad());
    }
    let subfield = &extra[4..];
    if &subfield[16..] != b"STARGZ" {
        return Err(bad());
    }
    let hex = std::str::from_utf8(&subfield[..16]).map_err(|_| bad())?;
    u64::from_str_radix(hex, 16).map_err(|_| bad())
}

/// The `stargz.index.json` entry of the table's tar stream and where its data is.
fn toc_tar_entry(layer: &str, output: &[u8]) -> Result<(Entry, Range<usize>)> {
    let bad = |reason: String| Error::BadLayer {
        layer: layer.to_string(),
        reason: format!("eStargz: the table of contents' tar: {reason}"),
    };
    let mut archive = tar::Archive::new(output);
    let mut members = archive.entries().map_err(|e| bad(e.to_string()))?;
    let mut member = members
        .next()
        .ok_or_else(|| bad("empty".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let start = member.raw_file_position() as usize;
    let (path, entry) =
        entry_of(layer, &mut member, false)?.ok_or_else(|| bad("a PAX global header".into()))?;
    if path != TOC_TAR_NAME || entry.kind != EntryKind::File {
        return Err(bad(format!(
            "its first member is {:?}, not {}",
            String::from_utf8_lossy(&path),
            String::from_utf8_lossy(TOC_TAR_NAME)
        )));
    }
    let end = start
        .checked_add(entry.size as usize)
        .filter(|end| *end <= output.len() && entry.size as usize <= MAX_TOC_JSON)
        .ok_or_else(|| bad("its data runs past its end".into()))?;
    Ok((entry, start..end))
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
        Some(sha256_digest(&item.digest).ok_or("a file without its sha256")?)
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

    #[test]
    fn footers() {
        // The footer stargz-snapshotter writes for a table at 0x1234: an empty gzip member
        // (no compression) with the extra field.
        let mut footer = vec![
            0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        footer.extend_from_slice(b"0000000000001234STARGZ");
        footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(footer.len(), FOOTER_SIZE as usize);
        assert_eq!(parse_footer(&footer), Ok(0x1234));
        footer[30] = b'X';
        assert!(parse_footer(&footer).is_err());
        assert!(parse_footer(&footer[1..]).is_err());
    }
}
