//! Making a layer containerd asks for available lazily: the image is pulled through the
//! engine (lazy indexes only: a layer without one is left to containerd), and what the labels
//! claim is checked against what the pull found before the layer stands for containerd's
//! target snapshot.

use lazylayer_engine::{Engine, IndexTrust, LazyPulls, Mode};
use lazylayer_source::Digest;
use lazylayer_store::ImageRecord;

use crate::labels::LayerRequest;

/// A layer made available lazily for a target snapshot.
#[derive(Clone, Debug)]
pub struct Available {
    /// The image it was pulled with.
    pub image: ImageRecord,
    /// Whether this pull added the image to the store (the snapshotter then owns its record).
    pub new_image: bool,
    /// The layer's digest.
    pub layer: Digest,
}

/// Pulls images lazily for the snapshotter, once per image reference at a time (its layers'
/// Prepares share one pull).
pub struct RemoteLayers {
    pulls: LazyPulls,
}

impl RemoteLayers {
    /// Pulls through `engine`, serving new lazy layers in `mode` and trusting indexes as
    /// `index_trust` says.
    pub fn new(engine: Engine, mode: Mode, index_trust: IndexTrust) -> RemoteLayers {
        RemoteLayers {
            // Containerd mounts a snapshot only through `Mounts`, which starts the daemon and
            // waits for it to take every lazy layer up.
            pulls: LazyPulls::new(engine, mode, index_trust).taking_up_in_background(),
        }
    }

    /// Makes the layer `request` names available lazily, or says why it cannot be (containerd
    /// then downloads and unpacks it). `parent_layer` is the lazy layer the parent snapshot
    /// stands for, if it is one.
    pub async fn make_available(
        &self,
        request: &LayerRequest,
        parent_layer: Option<&Digest>,
    ) -> Result<Available, String> {
        let pulled = self
            .pulls
            .pull(&request.image, Some(&request.layer))
            .await?;
        check_claims(&pulled.image, request, parent_layer)?;
        Ok(Available {
            image: pulled.image,
            new_image: pulled.new_image,
            layer: request.layer.clone(),
        })
    }
}

/// Checks that the pulled `image` is what containerd asked for: the manifest it resolved (when
/// the labels say), the layer among the image's layers, the target the chain ID of the image's
/// layers up to it, and the parent the layer below.
pub fn check_claims(
    image: &ImageRecord,
    request: &LayerRequest,
    parent_layer: Option<&Digest>,
) -> Result<(), String> {
    if let Some(manifest) = &request.manifest
        && *manifest != image.manifest
    {
        return Err(format!(
            "{} now names manifest {}, not the {manifest} containerd resolved",
            request.image, image.manifest
        ));
    }
    let Some(position) = image.layers.iter().position(|l| l.digest == request.layer) else {
        return Err(format!(
            "layer {} is not a layer of {} ({})",
            request.layer, request.image, image.manifest
        ));
    };
    let diff_ids = diff_ids(image)?;
    let chain = chain_id(&diff_ids[..=position]);
    if chain != request.target {
        return Err(format!(
            "the target {} is not the chain ID {chain} of layer {} of {}",
            request.target,
            position + 1,
            request.image
        ));
    }
    if let Some(parent) = parent_layer {
        let below = position.checked_sub(1).map(|i| &image.layers[i].digest);
        if below != Some(parent) {
            return Err(format!(
                "the parent snapshot is layer {parent}, not the layer below {} in {}",
                request.layer, request.image
            ));
        }
    }
    Ok(())
}

/// The image config's diff IDs, one per layer.
fn diff_ids(image: &ImageRecord) -> Result<Vec<String>, String> {
    let ids: Vec<String> = image.config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if ids.len() != image.layers.len() {
        return Err(format!(
            "the image config of {} has {} diff IDs for {} layers",
            image.reference,
            ids.len(),
            image.layers.len()
        ));
    }
    Ok(ids)
}

/// The OCI chain ID of layers with these diff IDs, bottom first (what containerd names a
/// committed layer snapshot).
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = diff_ids[0].clone();
    for id in &diff_ids[1..] {
        chain = Digest::sha256(format!("{chain} {id}").as_bytes()).to_string();
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(std::slice::from_ref(&a)), a);
        let expected = Digest::sha256(format!("{a} {b}").as_bytes()).to_string();
        assert_eq!(chain_id(&[a, b]), expected);
    }
}
