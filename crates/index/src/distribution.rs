//! Lazy indexes travel with the image as an OCI artifact: a manifest whose `subject` is the
//! image manifest, whose layers are the index blobs (annotated with the layer they index), and
//! which is found through the referrers API or, where a registry lacks it (CNCF distribution
//! 2.8), through the referrers tag schema (`sha256-<hex>` tag holding an index of referrers).
//!
//! Trust: an index from a registry is checked against the artifact manifest's digest for it,
//! and must name the layer it is used for (digest and size). It decides which compressed bytes
//! are fetched for a read and what digests they are checked against, so a registry that can
//! forge both the index and the blob's bytes can make reads return wrong data until the layer
//! is complete and its blob digest is checked end to end. Indexes built locally (from the
//! digest-verified blob) carry no such risk. See docs/architecture.md.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_source::manifest::media_type;
use lazylayer_source::registry::Body;
use lazylayer_source::{BlobDescriptor, Digest, Repository, ResolvedImage};
use serde_json::json;

use crate::format::{INDEX_MEDIA_TYPE, LayerIndex};
use crate::{Error, Result};

/// The artifact type of lazylayer's index artifacts.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazylayer.index.v1";
/// Annotation on each index blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "dev.lazylayer.layer.digest";
/// The OCI empty config (`{}`).
const EMPTY_CONFIG_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Largest index blob accepted from a registry.
pub const INDEX_SIZE_LIMIT: u64 = 512 << 20;

/// The index blobs a registry has for an image's layers.
#[derive(Clone, Debug, Default)]
pub struct RemoteIndexes {
    /// Digest of the artifact manifest they came from.
    pub artifact: Option<Digest>,
    /// Index blob per layer digest.
    pub by_layer: HashMap<Digest, BlobDescriptor>,
}

/// The OCI empty config's content.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// The descriptor of the empty config.
pub fn empty_config() -> BlobDescriptor {
    BlobDescriptor {
        digest: Digest::sha256(EMPTY_CONFIG),
        media_type: EMPTY_CONFIG_TYPE.to_string(),
        size: EMPTY_CONFIG.len() as u64,
    }
}

fn index_blob(upload: &IndexUpload) -> BlobDescriptor {
    BlobDescriptor {
        digest: upload.digest.clone(),
        media_type: INDEX_MEDIA_TYPE.to_string(),
        size: upload.size,
    }
}

/// The artifact manifest attaching `indexes` to the image manifest `subject`.
pub fn artifact_manifest(subject: &BlobDescriptor, indexes: &[IndexUpload]) -> Bytes {
    let layers: Vec<serde_json::Value> = indexes
        .iter()
        .map(|upload| {
            let blob = index_blob(upload);
            json!({
                "mediaType": blob.media_type,
                "digest": blob.digest,
                "size": blob.size,
                "annotations": { LAYER_ANNOTATION: upload.layer.digest },
            })
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty_config(),
        "layers": layers,
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
    });
    Bytes::from(serde_json::to_vec(&manifest).expect("JSON"))
}

/// The referrers-tag index: `entries` (other referrers) plus the artifact `digest`.
pub fn referrers_list(mut entries: Vec<serde_json::Value>, digest: &Digest, size: u64) -> Bytes {
    entries.push(json!({
        "mediaType": media_type::OCI_MANIFEST,
        "digest": digest,
        "size": size,
        "artifactType": ARTIFACT_TYPE,
    }));
    let list = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": entries,
    });
    Bytes::from(serde_json::to_vec(&list).expect("JSON"))
}

/// The tag under which registries without the referrers API list a manifest's referrers.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("{}-{}", subject.algorithm().name(), subject.hex())
}

/// One index to push: the layer it indexes, and the index blob.
pub struct IndexUpload {
    /// The layer.
    pub layer: BlobDescriptor,
    /// Digest and size of the encoded index.
    pub digest: Digest,
    /// Size of the encoded index.
    pub size: u64,
    /// Its bytes (a file, streamed).
    pub body: Body,
}

/// Pushes the indexes of `image`'s layers as an artifact referring to the image, and makes it
/// findable (referrers API, else the tag schema). Returns the artifact's digest.
pub async fn push_indexes(
    repository: &Repository,
    image: &ResolvedImage,
    indexes: &[IndexUpload],
) -> Result<Digest> {
    repository
        .push_blob(
            &empty_config(),
            Body::Bytes(Bytes::from_static(EMPTY_CONFIG)),
        )
        .await?;
    for upload in indexes {
        repository
            .push_blob(&index_blob(upload), upload.body.clone())
            .await?;
    }
    let bytes = artifact_manifest(&image.manifest, indexes);
    let digest = Digest::sha256(&bytes);
    repository
        .put_manifest(&digest.to_string(), media_type::OCI_MANIFEST, bytes.clone())
        .await?;
    if repository
        .referrers(&image.manifest.digest, None)
        .await?
        .is_some()
    {
        return Ok(digest); // the registry indexes referrers itself
    }
    // Referrers tag schema: add ours to the index at sha256-<hex>, replacing older ones.
    let tag = referrers_tag(&image.manifest.digest);
    let mut entries: Vec<serde_json::Value> = match repository.get_manifest(&tag).await {
        Ok(existing) => serde_json::from_slice::<serde_json::Value>(&existing.bytes)
            .ok()
            .and_then(|v| v["manifests"].as_array().cloned())
            .unwrap_or_default(),
        Err(lazylayer_source::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    entries.retain(|e| e["artifactType"] != ARTIFACT_TYPE);
    let list = referrers_list(entries, &digest, bytes.len() as u64);
    repository
        .put_manifest(&tag, media_type::OCI_INDEX, list)
        .await?;
    Ok(digest)
}

/// Finds the index artifact of `image` in its repository, if any.
pub async fn find_indexes(repository: &Repository, image: &ResolvedImage) -> Result<RemoteIndexes> {
    let subject = &image.manifest.digest;
    let listing = match repository.referrers(subject, Some(ARTIFACT_TYPE)).await? {
        Some(bytes) => bytes,
        None => match repository.get_manifest(&referrers_tag(subject)).await {
            Ok(fetched) => fetched.bytes,
            Err(lazylayer_source::Error::NotFound { .. }) => return Ok(RemoteIndexes::default()),
            Err(e) => return Err(e.into()),
        },
    };
    let what = format!("referrers of {subject}");
    let listing: serde_json::Value =
        serde_json::from_slice(&listing).map_err(|e| Error::bad_index(&what, e))?;
    let Some(artifact) = listing["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["artifactType"] == ARTIFACT_TYPE)
        .filter_map(|m| m["digest"].as_str()?.parse::<Digest>().ok())
        .next_back()
    else {
        return Ok(RemoteIndexes::default());
    };
    // Fetched by digest: the registry cannot swap the manifest we were pointed at.
    let fetched = repository.get_manifest(&artifact.to_string()).await?;
    let what = format!("index artifact {artifact}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fetched.bytes).map_err(|e| Error::bad_index(&what, e))?;
    if manifest["artifactType"] != ARTIFACT_TYPE {
        return Err(Error::bad_index(&what, "is not a lazylayer index artifact"));
    }
    if manifest["subject"]["digest"].as_str() != Some(&subject.to_string()) {
        return Err(Error::bad_index(&what, "refers to another image"));
    }
    let wanted: HashMap<&Digest, ()> = image.layers.iter().map(|l| (&l.digest, ())).collect();
    let mut by_layer = HashMap::new();
    for blob in manifest["layers"].as_array().into_iter().flatten() {
        let layer: Option<Digest> = blob["annotations"][LAYER_ANNOTATION]
            .as_str()
            .and_then(|d| d.parse().ok());
        let digest: Option<Digest> = blob["digest"].as_str().and_then(|d| d.parse().ok());
        let (Some(layer), Some(digest), Some(size)) = (layer, digest, blob["size"].as_u64()) else {
            return Err(Error::bad_index(&what, "has a malformed index descriptor"));
        };
        if blob["mediaType"] != INDEX_MEDIA_TYPE || !wanted.contains_key(&layer) {
            continue;
        }
        by_layer.insert(
            layer,
            BlobDescriptor {
                digest,
                media_type: INDEX_MEDIA_TYPE.to_string(),
                size,
            },
        );
    }
    Ok(RemoteIndexes {
        artifact: Some(artifact),
        by_layer,
    })
}

/// Fetches an index blob, verified against its descriptor, and checks that it indexes `layer`.
pub async fn fetch_index(
    repository: &Repository,
    descriptor: &BlobDescriptor,
    layer: &BlobDescriptor,
) -> Result<(LayerIndex, Vec<u8>)> {
    let what = format!("index {} of layer {}", descriptor.digest, layer.digest);
    if descriptor.size > INDEX_SIZE_LIMIT {
        return Err(Error::bad_index(&what, "larger than the limit"));
    }
    let mut stream = repository.open_blob(descriptor).await?;
    let mut encoded = Vec::with_capacity(descriptor.size as usize);
    while let Some(chunk) = stream.next().await {
        encoded.extend_from_slice(&chunk?);
    }
    let index = LayerIndex::decode(&what, &encoded)?;
    check_identity(&what, &index, layer)?;
    Ok((index, encoded))
}

/// An index is only used for the layer it was built from.
pub fn check_identity(what: &str, index: &LayerIndex, layer: &BlobDescriptor) -> Result<()> {
    if index.blob_digest != layer.digest || index.blob_size != layer.size {
        return Err(Error::bad_index(
            what,
            format!(
                "indexes {} ({} bytes), not layer {} ({} bytes)",
                index.blob_digest, index.blob_size, layer.digest, layer.size
            ),
        ));
    }
    Ok(())
}
