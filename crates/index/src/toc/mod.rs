//! Indexes made from a layer's own table of contents, for layers written to be read lazily
//! (eStargz today): the manifest's layer annotations name the digest of the table, so the
//! table is bound to the image like a bound index. It is fetched with a few ranged reads and
//! verified against that digest; the layer itself is not downloaded. Each chunk of file data
//! becomes a span checked against the chunk digest the table gives ([`SpanStart::Chunk`])
//! before any byte of it is served, and the tar stream stays the truth: the check at detach
//! rebuilds the file table from the whole blob and compares it with the one made here.
//!
//! [`SpanStart::Chunk`]: crate::format::SpanStart::Chunk

pub mod estargz;

use std::collections::HashMap;

use lazylayer_source::{BlobDescriptor, Digest, ImageSource};

use crate::format::LayerIndex;
use crate::{Error, Result};

/// The annotation of an eStargz layer naming the digest of its table of contents.
pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// The table of contents a layer's annotations announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announced {
    /// The layout of the layer and its table.
    pub format: TocFormat,
    /// The digest of the table (of its uncompressed JSON).
    pub digest: Digest,
}

/// Layer layouts with a table of contents that lazylayer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TocFormat {
    /// eStargz: a gzip member per chunk of file data, the table in a gzip member at the end.
    Estargz,
}

impl TocFormat {
    /// The name `inspect` and progress show.
    pub fn name(self) -> &'static str {
        match self {
            TocFormat::Estargz => "eStargz",
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

/// The table of contents `annotations` announce, if any; an announcement with a malformed
/// digest is an error.
pub fn announced(annotations: &HashMap<String, String>) -> Result<Option<Announced>> {
    let Some(digest) = annotations.get(ESTARGZ_TOC_DIGEST) else {
        return Ok(None);
    };
    let digest: Digest = digest.parse().map_err(|e| {
        Error::bad_index(
            "announced by the layer annotations",
            format!("{ESTARGZ_TOC_DIGEST} {digest:?} is not a digest: {e}"),
        )
    })?;
    Ok(Some(Announced {
        format: TocFormat::Estargz,
        digest,
    }))
}

/// Makes the lazy index of `layer` from its table of contents, fetched from `source` with a
/// few ranged reads and checked against the announced digest. `diff_id` is the image config's.
pub async fn index_from_toc(
    source: &ImageSource,
    layer: &BlobDescriptor,
    toc: &Announced,
    diff_id: &Digest,
) -> Result<LayerIndex> {
    match toc.format {
        TocFormat::Estargz => estargz::index(source, layer, &toc.digest, diff_id).await,
    }
}
