//! Finding each layer's lazy index: the local store first, then the image's index artifact in
//! its registry (fetched and verified).

use lazylayer_index::distribution::{fetch_index, find_indexes};
use lazylayer_index::{IndexStore, LayerIndex};
use lazylayer_source::{Digest, ImageSource, ResolvedImage};

/// Where an index was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The local store under --root.
    Local,
    /// The registry (verified against the artifact manifest).
    Registry,
}

/// A layer's index and where it came from.
pub struct FoundIndex {
    pub index: LayerIndex,
    pub origin: Origin,
    /// Digest and size of the encoded index.
    pub digest: Digest,
    pub size: u64,
}

/// The index of every layer of `image`, where one exists.
pub async fn find(
    store: &IndexStore,
    source: &ImageSource,
    image: &ResolvedImage,
) -> anyhow::Result<Vec<Option<FoundIndex>>> {
    let mut found = Vec::with_capacity(image.layers.len());
    for layer in &image.layers {
        found.push(match (store.get(layer)?, store.stored(layer)?) {
            (Some(index), Some(stored)) => Some(FoundIndex {
                index,
                origin: Origin::Local,
                digest: stored.digest,
                size: stored.size,
            }),
            _ => None,
        });
    }
    if found.iter().all(Option::is_some) {
        return Ok(found);
    }
    let ImageSource::Registry { repository, .. } = source else {
        return Ok(found);
    };
    let remote = find_indexes(repository, image).await?;
    for (slot, layer) in found.iter_mut().zip(&image.layers) {
        if slot.is_some() {
            continue;
        }
        if let Some(descriptor) = remote.by_layer.get(&layer.digest) {
            let (index, _) = fetch_index(repository, descriptor, layer).await?;
            *slot = Some(FoundIndex {
                index,
                origin: Origin::Registry,
                digest: descriptor.digest.clone(),
                size: descriptor.size,
            });
        }
    }
    Ok(found)
}
