//! Finding each layer's lazy index for `inspect`: the local store first, then the index bound
//! to the image in its registry, then its referrers (fetched and verified, whatever the trust
//! policy: `inspect` only shows them, and says where each came from).

use lazylayer_index::distribution::{
    IndexOrigin, RemoteIndexes, fetch_index, find_bound_indexes, find_referrer_indexes,
};
use lazylayer_index::{IndexStore, LayerIndex};
use lazylayer_source::{Digest, ImageSource, Repository, ResolvedImage};

/// A layer's index and where it came from.
pub struct FoundIndex {
    pub index: LayerIndex,
    /// Who vouches for it.
    pub origin: IndexOrigin,
    /// Whether it is in the local store (else it was just fetched from the registry).
    pub stored: bool,
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
                origin: store.origin(layer)?,
                stored: true,
                digest: stored.digest,
                size: stored.size,
            }),
            _ => None,
        });
    }
    let ImageSource::Registry { repository, .. } = source else {
        return Ok(found);
    };
    if found.iter().any(Option::is_none) {
        let bound = find_bound_indexes(repository, image).await?;
        fill_from(&mut found, repository, image, &bound).await?;
    }
    if found.iter().any(Option::is_none) {
        let referrers = find_referrer_indexes(repository, image).await?;
        fill_from(&mut found, repository, image, &referrers).await?;
    }
    Ok(found)
}

async fn fill_from(
    found: &mut [Option<FoundIndex>],
    repository: &Repository,
    image: &ResolvedImage,
    remote: &RemoteIndexes,
) -> anyhow::Result<()> {
    for (slot, layer) in found.iter_mut().zip(&image.layers) {
        if slot.is_some() {
            continue;
        }
        if let Some(descriptor) = remote.by_layer.get(&layer.digest) {
            let index = fetch_index(repository, descriptor, layer).await?;
            *slot = Some(FoundIndex {
                index,
                origin: remote.origin,
                stored: false,
                digest: descriptor.blob.digest.clone(),
                size: descriptor.blob.size,
            });
        }
    }
    Ok(())
}
