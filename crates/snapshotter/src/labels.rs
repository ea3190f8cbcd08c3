//! The snapshot labels containerd's clients send, and what they say about a layer.
//!
//! containerd's unpacker puts `containerd.io/snapshot.ref` (the target: the layer's chain ID)
//! on every layer it prepares; which image and layer that is comes from labels its clients add
//! to each layer: CRI's (`containerd.io/snapshot/cri.*`, with `disable_snapshot_annotations =
//! false`) or stargz's `ctr-remote image rpull` (`containerd.io/snapshot/remote/stargz.*`).

use std::collections::HashMap;

use lazylayer_source::Digest;

/// The label naming the committed snapshot a prepared layer becomes (its chain ID).
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// CRI: the image reference.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI: the layer's compressed digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// CRI: the image manifest's digest.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// ctr-remote (stargz): the image reference.
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// ctr-remote (stargz): the layer's compressed digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Set by lazylayer on a snapshot it made from a lazy layer: the layer's digest.
pub const LAZYLAYER_LAYER: &str = "containerd.io/snapshot/lazylayer.layer";

/// A layer containerd asks for by label: which image, which layer, and the target snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRequest {
    /// The target snapshot name (the layer's chain ID, as containerd computed it).
    pub target: String,
    /// The image reference as the client named it.
    pub image: String,
    /// The layer's compressed digest.
    pub layer: Digest,
    /// The manifest the client resolved, when it says (CRI does).
    pub manifest: Option<Digest>,
}

/// What the labels of a Prepare ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// No target: a plain snapshot (a container's writable layer, `ctr image pull`'s unpack).
    Plain,
    /// A target, but not which image and layer: containerd unpacks it (the reason says why).
    Unpack(String),
    /// A layer of an image, which may be served lazily.
    Layer(LayerRequest),
}

/// Reads the labels of a Prepare.
pub fn asked(labels: &HashMap<String, String>) -> Asked {
    let Some(target) = labels.get(TARGET) else {
        return Asked::Plain;
    };
    let image = labels
        .get(CRI_IMAGE_REF)
        .or_else(|| labels.get(STARGZ_REFERENCE));
    let layer = labels
        .get(CRI_LAYER_DIGEST)
        .or_else(|| labels.get(STARGZ_DIGEST));
    let (Some(image), Some(layer)) = (image, layer) else {
        return Asked::Unpack(
            "no image reference or layer digest among the labels (CRI needs \
             disable_snapshot_annotations = false; ctr needs ctr-remote image rpull)"
                .into(),
        );
    };
    let layer = match layer.parse::<Digest>() {
        Ok(layer) => layer,
        Err(e) => return Asked::Unpack(format!("the layer digest label {layer:?}: {e}")),
    };
    let manifest = match labels.get(CRI_MANIFEST_DIGEST).map(|m| m.parse::<Digest>()) {
        None => None,
        Some(Ok(manifest)) => Some(manifest),
        Some(Err(e)) => return Asked::Unpack(format!("the manifest digest label: {e}")),
    };
    Asked::Layer(LayerRequest {
        target: target.clone(),
        image: image.clone(),
        layer,
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYER: &str = "sha256:12aff705f8e0f1b6d3c9b6c1d0f3f0c9b5f6e2c1a0b9d8e7f6a5b4c3d2e1f0a9";

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_target_is_a_plain_snapshot() {
        assert_eq!(asked(&labels(&[(CRI_LAYER_DIGEST, LAYER)])), Asked::Plain);
    }

    #[test]
    fn cri_and_stargz_labels_name_the_layer() {
        for (image_key, layer_key) in [
            (CRI_IMAGE_REF, CRI_LAYER_DIGEST),
            (STARGZ_REFERENCE, STARGZ_DIGEST),
        ] {
            let got = asked(&labels(&[
                (TARGET, "sha256:chain"),
                (image_key, "127.0.0.1:5000/a:b"),
                (layer_key, LAYER),
            ]));
            assert_eq!(
                got,
                Asked::Layer(LayerRequest {
                    target: "sha256:chain".into(),
                    image: "127.0.0.1:5000/a:b".into(),
                    layer: LAYER.parse().unwrap(),
                    manifest: None,
                })
            );
        }
    }

    #[test]
    fn a_target_without_its_layer_is_unpacked() {
        assert!(matches!(
            asked(&labels(&[(TARGET, "sha256:chain")])),
            Asked::Unpack(_)
        ));
        assert!(matches!(
            asked(&labels(&[
                (TARGET, "sha256:chain"),
                (STARGZ_REFERENCE, "r"),
                (STARGZ_DIGEST, "not-a-digest"),
            ])),
            Asked::Unpack(_)
        ));
    }
}
