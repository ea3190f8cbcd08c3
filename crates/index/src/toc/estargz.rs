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

use std::ops::Range;

use lazylayer_source::{BlobDescriptor, Digest, ImageSource};

use super::contents::{self, Contents};
use crate::build::entry_of;
use crate::codec::gzip::inflate_member;
use crate::entry::{Entry, EntryKind};
use crate::format::{Compression, LayerIndex, Span, SpanStart, sha256};
use crate::{Error, Result};

/// The footer's size (the legacy 47-byte footer of stargz before eStargz is not read).
pub const FOOTER_SIZE: u64 = 51;
/// The name of the table of contents in the tar stream.
pub const TOC_TAR_NAME: &[u8] = b"stargz.index.json";
/// The largest table of contents read: compressed, and as JSON.
pub(super) const MAX_TOC_COMPRESSED: u64 = 64 << 20;
pub(super) const MAX_TOC_JSON: usize = 512 << 20;
/// Bytes read from the start of the blob together with the footer: the tar headers before the
/// first chunk usually fit, and then cost no round trip of their own.
pub(super) const HEAD_GUESS: u64 = 64 << 10;

/// Makes the index of eStargz `layer` from its table of contents (see the module docs).
pub async fn index(
    source: &ImageSource,
    layer: &BlobDescriptor,
    toc_digest: &Digest,
    diff_id: &Digest,
) -> Result<LayerIndex> {
    let name = layer.digest.to_string();
    let bad = |reason: String| contents::bad_layer(layer, "eStargz", reason);
    contents::require_compression(layer, "eStargz", Compression::Gzip)?;
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
    let Contents {
        mut table,
        chunks,
        data_len,
    } = contents::read(&name, "eStargz", json)?;
    // The table itself is the last entry of the tar stream.
    let toc_start = data_len;
    let mut toc_file = toc_entry;
    toc_file.data_offset = toc_start + json_range.start as u64;
    toc_file.digest = Some(sha256(json));
    table.add(TOC_TAR_NAME, toc_file)?;
    let uncompressed_size = toc_start + toc_output.len() as u64;

    let mut spans = contents::data_spans(source, layer, head, &chunks, toc_offset).await?;
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
    contents::index_of(
        layer,
        Compression::Gzip,
        diff_id,
        uncompressed_size,
        spans,
        table,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
