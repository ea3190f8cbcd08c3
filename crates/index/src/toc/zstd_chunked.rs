//! zstd:chunked (containers/storage's layout, written by podman, buildah and skopeo with
//! `--compression-format zstd:chunked`, and by `ctr-remote image convert --zstdchunked`): a
//! zstd tar whose file data is in frames of their own, with the table of contents (the same
//! JSON as eStargz's, in a zstd frame) in a skippable frame after the last file, so it is no
//! part of the tar stream, and a footer in another. The layer annotations give the table's
//! position and the digest of its compressed bytes.
//!
//! The index made from it has the spans: the frames before the first chunk (tar headers,
//! checked by their compressed sha256), one span per chunk (from its frame to the next chunk's),
//! and everything from the table's skippable frame to the end of the blob (checked by its
//! sha256, no part of the uncompressed stream).

use lazylayer_source::{BlobDescriptor, Digest, ImageSource};

use super::ZstdPosition;
use super::contents::{self, Contents};
use super::estargz::{HEAD_GUESS, MAX_TOC_COMPRESSED, MAX_TOC_JSON};
use crate::Result;
use crate::format::{Compression, LayerIndex, Span, SpanStart, sha256};

/// A skippable frame's magic number, little-endian (the table and the footer are in them).
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// The manifest type of a table in eStargz's JSON (the only one written so far).
const MANIFEST_TYPE_CRFS: u64 = 1;

/// Makes the index of zstd:chunked `layer` from the table of contents at `position`, checked
/// against its annotated digests; `None` when the layer has no file data to read lazily.
pub async fn index(
    source: &ImageSource,
    layer: &BlobDescriptor,
    position: &ZstdPosition,
    json_digest: Option<&Digest>,
    diff_id: &Digest,
) -> Result<Option<LayerIndex>> {
    let name = layer.digest.to_string();
    let bad = |reason: String| contents::bad_layer(layer, "zstd:chunked", reason);
    contents::require_compression(layer, "zstd:chunked", Compression::Zstd)?;
    let size = layer.size;
    let ZstdPosition {
        offset,
        length,
        raw_length,
        manifest_type,
        ref checksum,
    } = *position;
    if manifest_type != MANIFEST_TYPE_CRFS {
        return Err(bad(format!(
            "table of contents of type {manifest_type}, lazylayer reads type {MANIFEST_TYPE_CRFS}"
        )));
    }
    let tail_start = offset.checked_sub(8).filter(|start| *start > 0);
    let end = offset.checked_add(length).filter(|end| *end <= size);
    let (Some(tail_start), Some(_)) = (tail_start, end) else {
        return Err(bad(format!(
            "the table of contents at {offset}+{length} is outside the {size}-byte blob"
        )));
    };
    if size - tail_start > 2 * MAX_TOC_COMPRESSED || raw_length > MAX_TOC_JSON as u64 {
        return Err(bad(format!(
            "a table of contents of {length} bytes ({raw_length} as JSON) is past lazylayer's \
             limit"
        )));
    }
    let (tail, head) = tokio::try_join!(
        source.read_range(&layer.digest, tail_start..size),
        source.read_range(&layer.digest, 0..HEAD_GUESS.min(tail_start)),
    )?;
    if tail[..4] != SKIPPABLE_MAGIC {
        return Err(bad(
            "the table of contents is not in a skippable frame".into()
        ));
    }
    let compressed = &tail[8..8 + length as usize];
    let actual = Digest::compute(checksum.algorithm(), compressed);
    if &actual != checksum {
        return Err(bad(format!(
            "the table of contents is {actual}, the manifest's annotation says {checksum}"
        )));
    }
    let json = zstd::bulk::decompress(compressed, raw_length as usize)
        .map_err(|e| bad(format!("the table of contents does not decompress: {e}")))?;
    if json.len() as u64 != raw_length {
        return Err(bad(format!(
            "the table of contents is {} bytes, the annotation says {raw_length}",
            json.len()
        )));
    }
    if let Some(expected) = json_digest {
        let actual = Digest::compute(expected.algorithm(), &json);
        if &actual != expected {
            return Err(bad(format!(
                "the table of contents is {actual}, the manifest's annotation says {expected}"
            )));
        }
    }
    let Contents {
        table,
        chunks,
        data_len,
    } = contents::read(&name, "zstd:chunked", &json)?;
    if chunks.is_empty() {
        return Ok(None);
    }
    let mut spans = contents::data_spans(source, layer, head, &chunks, tail_start).await?;
    spans.push(Span {
        compressed_start: tail_start,
        compressed_end: size,
        uncompressed_start: data_len,
        digest: sha256(&tail),
        start: SpanStart::Fresh,
    });
    contents::index_of(layer, Compression::Zstd, diff_id, data_len, spans, table).map(Some)
}
