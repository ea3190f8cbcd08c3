//! Indexes made from a layer's own table of contents, for layers written to be read lazily
//! (eStargz, zstd:chunked): the manifest's layer annotations name the digest of the table, so
//! the table is bound to the image like a bound index. It is fetched with a few ranged reads
//! and verified against that digest; the layer itself is not downloaded. Each chunk of file
//! data becomes a span checked against the chunk digest the table gives
//! ([`SpanStart::Chunk`]) before any byte of it is served, and the tar stream stays the truth:
//! the check at detach rebuilds the file table from the whole blob and compares it with the
//! one made here.
//!
//! [`SpanStart::Chunk`]: crate::format::SpanStart::Chunk

mod contents;
pub mod estargz;
pub mod zstd_chunked;

use std::collections::HashMap;

use lazylayer_source::{BlobDescriptor, Digest, ImageSource};

use crate::format::{Compression, LayerIndex};
use crate::{Error, Result};

/// The annotation naming the digest of an eStargz layer's table of contents (its JSON); the
/// zstd:chunked layers `ctr-remote` writes have it too.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The prefixes of a zstd:chunked layer's annotations `manifest-checksum` (the digest of its
/// compressed table of contents) and `manifest-position` (`offset:length:JSON length:type`):
/// containers/storage as in Debian, and newer.
const ZSTD_CHUNKED_PREFIXES: [&str; 2] = [
    "io.containers.zstd-chunked.",
    "io.github.containers.zstd-chunked.",
];

/// The table of contents a layer's annotations announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announced {
    /// The layout of the layer (and for zstd:chunked, where its table is).
    pub format: TocFormat,
    /// The digest of the table's JSON, when annotated.
    pub json_digest: Option<Digest>,
}

/// Layer layouts with a table of contents that lazylayer reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TocFormat {
    /// eStargz: a gzip member per chunk of file data, the table in a gzip member at the end.
    Estargz,
    /// zstd:chunked: zstd frames per chunk of file data, the table in a skippable frame.
    ZstdChunked(ZstdPosition),
}

/// Where a zstd:chunked layer's table of contents is, and the digest of its compressed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZstdPosition {
    /// Blob offset of the compressed table (inside its skippable frame).
    pub offset: u64,
    /// Its compressed length.
    pub length: u64,
    /// The length of its JSON.
    pub raw_length: u64,
    /// The table's type (1: eStargz's JSON).
    pub manifest_type: u64,
    /// The digest of the compressed table.
    pub checksum: Digest,
}

impl TocFormat {
    /// The name `inspect` and progress show.
    pub fn name(&self) -> &'static str {
        match self {
            TocFormat::Estargz => "eStargz",
            TocFormat::ZstdChunked(_) => "zstd:chunked",
        }
    }
}

/// The layer annotations of an image manifest, by layer position (bottom first); a manifest
/// that does not parse has none.
pub fn layer_annotations(manifest: &[u8]) -> Vec<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        layers: Vec<Layer>,
    }
    #[derive(serde::Deserialize)]
    struct Layer {
        #[serde(default)]
        annotations: Option<HashMap<String, String>>,
    }
    serde_json::from_slice::<Manifest>(manifest)
        .map(|m| {
            m.layers
                .into_iter()
                .map(|l| l.annotations.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// The table of contents the annotations of a layer of `media_type` announce, if any; a
/// malformed announcement is an error.
pub fn announced(
    media_type: &str,
    annotations: &HashMap<String, String>,
) -> Result<Option<Announced>> {
    let bad = |reason: String| Error::bad_index("announced by the layer annotations", reason);
    let digest = |key: &str, value: &str| -> Result<Digest> {
        value
            .parse()
            .map_err(|e| bad(format!("{key} {value:?} is not a digest: {e}")))
    };
    let json_digest = annotations
        .get(TOC_DIGEST)
        .map(|value| digest(TOC_DIGEST, value))
        .transpose()?;
    let compression = Compression::from_media_type(media_type);
    if compression == Some(Compression::Zstd) {
        for prefix in ZSTD_CHUNKED_PREFIXES {
            let position_key = format!("{prefix}manifest-position");
            let checksum_key = format!("{prefix}manifest-checksum");
            let (Some(position), Some(checksum)) = (
                annotations.get(&position_key),
                annotations.get(&checksum_key),
            ) else {
                continue;
            };
            let malformed = || {
                bad(format!(
                    "{position_key} {position:?} is not OFFSET:LENGTH:LENGTH:TYPE"
                ))
            };
            let numbers = position
                .split(':')
                .map(|n| n.parse::<u64>().map_err(|_| malformed()))
                .collect::<Result<Vec<u64>>>()?;
            let [offset, length, raw_length, manifest_type] = numbers[..] else {
                return Err(malformed());
            };
            return Ok(Some(Announced {
                format: TocFormat::ZstdChunked(ZstdPosition {
                    offset,
                    length,
                    raw_length,
                    manifest_type,
                    checksum: digest(&checksum_key, checksum)?,
                }),
                json_digest,
            }));
        }
    }
    Ok(match (compression, json_digest) {
        (Some(Compression::Gzip), Some(json_digest)) => Some(Announced {
            format: TocFormat::Estargz,
            json_digest: Some(json_digest),
        }),
        _ => None,
    })
}

/// The entry eStargz puts after the files its builder found a workload reads first
/// (`ctr-remote image optimize`, `convert --estargz-record-in`).
pub const PREFETCH_LANDMARK: &[u8] = b".prefetch.landmark";

/// The files (with data) a layer indexed from its table of contents puts before its prefetch
/// landmark, in order: the files to fetch first, as stargz-snapshotter does.
pub fn prioritized(index: &LayerIndex) -> Vec<usize> {
    if !index.from_toc() {
        return Vec::new();
    }
    let Some(landmark) = index
        .entries
        .iter()
        .position(|e| e.path == PREFETCH_LANDMARK)
    else {
        return Vec::new();
    };
    (0..landmark)
        .filter(|&i| {
            let entry = &index.entries[i];
            entry.kind == crate::EntryKind::File && entry.stored_size() > 0
        })
        .collect()
}

/// Makes the lazy index of `layer` from its table of contents, fetched from `source` with a
/// few ranged reads and checked against the announced digests; `None` when the layer has no
/// file data to read lazily. `diff_id` is the image config's.
pub async fn index_from_toc(
    source: &ImageSource,
    layer: &BlobDescriptor,
    toc: &Announced,
    diff_id: &Digest,
) -> Result<Option<LayerIndex>> {
    match (&toc.format, &toc.json_digest) {
        (TocFormat::Estargz, Some(digest)) => estargz::index(source, layer, digest, diff_id)
            .await
            .map(Some),
        (TocFormat::Estargz, None) => Err(Error::bad_index(
            "announced by the layer annotations",
            format!("an eStargz layer without {TOC_DIGEST}"),
        )),
        (TocFormat::ZstdChunked(position), json_digest) => {
            zstd_chunked::index(source, layer, position, json_digest.as_ref(), diff_id).await
        }
    }
}
