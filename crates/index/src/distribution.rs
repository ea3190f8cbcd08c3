//! Lazy indexes travel with the image as an OCI artifact: a manifest whose `subject` is the
//! image manifest, whose layers are the index blobs (annotated with the layer they index), and
//! which is found through the referrers API or, where a registry lacks it (CNCF distribution
//! 2.8), through the referrers tag schema (`sha256-<hex>` tag holding an index of referrers).
//!
//! Binding: `index --push` also re-points the image's tag at an OCI image index that lists
//! the image manifest (unchanged, so its digest and signatures stay valid) and the index
//! artifact (platform `unknown/unknown`, as attestations ride, annotated with the manifest it
//! indexes). The digest of that image index covers the lazy index: such an index is *bound*.
//! A referrer found through the referrers API is *not*: anyone who may push to the repository
//! can attach one to any manifest, even one a user pinned by digest.
//!
//! Trust: an index decides which compressed bytes are fetched for a read, what digests they
//! are checked against, and what the tree looks like (names, modes, owners, link targets). A
//! bound index is as trustworthy as the image reference that names it; an unbound referrer is
//! used only where the user opts in (`--index-trust referrer`), and every index must name the
//! layer it is used for (digest and size). Indexes built locally from the digest-verified blob
//! carry no such risk. See docs/architecture.md, "Distribution and trust".

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_source::manifest::media_type;
use lazylayer_source::registry::Body;
use lazylayer_source::{BlobDescriptor, Digest, ManifestView, Platform, Repository, ResolvedImage};
use serde_json::json;

use crate::format::{INDEX_MEDIA_TYPE, IndexHead, LayerIndex, WindowsSource};
use crate::{Error, Result};

/// The artifact type of lazylayer's index artifacts.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazylayer.index.v1";
/// Annotation on each index blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "dev.lazylayer.layer.digest";
/// The OCI empty config (`{}`).
const EMPTY_CONFIG_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Annotation on a bound index artifact's entry in an image index: the manifest it indexes.
pub const SUBJECT_ANNOTATION: &str = "dev.lazylayer.index.subject";
/// Annotations on an index blob that can be fetched head first (see [`IndexHead`]): the
/// size, in decimal, and the digest of its head.
pub const HEAD_SIZE_ANNOTATION: &str = "dev.lazylayer.index.head.size";
/// See [`HEAD_SIZE_ANNOTATION`].
pub const HEAD_DIGEST_ANNOTATION: &str = "dev.lazylayer.index.head.digest";
/// Largest index blob accepted from a registry.
pub const INDEX_SIZE_LIMIT: u64 = 512 << 20;

/// Where a lazy index came from, which decides whether it may be used lazily.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexOrigin {
    /// Built on this machine from the digest-verified blob.
    Local,
    /// From the registry, named by the image index the image reference resolved through.
    Bound,
    /// From the registry's referrers of the manifest: vouched for by nobody.
    Referrer,
    /// Made here from the layer's own table of contents (eStargz), whose digest the manifest's
    /// layer annotations name.
    Toc,
}

impl IndexOrigin {
    /// The name `inspect` and `status` show.
    pub fn name(self) -> &'static str {
        match self {
            IndexOrigin::Local => "local",
            IndexOrigin::Bound => "bound",
            IndexOrigin::Referrer => "referrer",
            IndexOrigin::Toc => "toc",
        }
    }
}

/// Which registry indexes `pull` may use lazily.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IndexTrust {
    /// Only indexes the image reference covers (bound); others are rebuilt here.
    #[default]
    Bound,
    /// Bound indexes, else unbound referrers (anyone who may push a referrer then decides
    /// what the layer's tree looks like until it is checked at detach).
    Referrer,
}

impl IndexTrust {
    /// Whether an index of `origin` may be used under this policy.
    pub fn accepts(self, origin: IndexOrigin) -> bool {
        match origin {
            IndexOrigin::Local | IndexOrigin::Bound | IndexOrigin::Toc => true,
            IndexOrigin::Referrer => self == IndexTrust::Referrer,
        }
    }
}

/// The index blobs a registry has for an image's layers.
#[derive(Clone, Debug)]
pub struct RemoteIndexes {
    /// Digest of the artifact manifest they came from.
    pub artifact: Option<Digest>,
    /// How it was found: bound, or as a referrer.
    pub origin: IndexOrigin,
    /// Index blob per layer digest.
    pub by_layer: HashMap<Digest, RemoteIndex>,
}

/// An index blob in a registry, as its artifact describes it.
#[derive(Clone, Debug)]
pub struct RemoteIndex {
    /// The blob.
    pub blob: BlobDescriptor,
    /// Its head, if the artifact says it can be fetched head first (the windows when reads
    /// need them).
    pub head: Option<IndexHead>,
}

impl RemoteIndexes {
    fn none(origin: IndexOrigin) -> Self {
        RemoteIndexes {
            artifact: None,
            origin,
            by_layer: HashMap::new(),
        }
    }
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
    artifact_manifest_of(subject, ARTIFACT_TYPE, index_layers(indexes))
}

/// The descriptors of `indexes` as an index artifact lists them.
fn index_layers(indexes: &[IndexUpload]) -> Vec<serde_json::Value> {
    indexes
        .iter()
        .map(|upload| {
            let blob = index_blob(upload);
            let mut annotations = json!({ LAYER_ANNOTATION: upload.layer.digest });
            if let Some(head) = &upload.head {
                annotations[HEAD_SIZE_ANNOTATION] = json!(head.size.to_string());
                annotations[HEAD_DIGEST_ANNOTATION] = json!(head.digest);
            }
            json!({
                "mediaType": blob.media_type,
                "digest": blob.digest,
                "size": blob.size,
                "annotations": annotations,
            })
        })
        .collect()
}

/// An OCI artifact manifest of `artifact_type` referring to `subject`, listing `layers`
/// (descriptors as JSON).
fn artifact_manifest_of(
    subject: &BlobDescriptor,
    artifact_type: &str,
    layers: Vec<serde_json::Value>,
) -> Bytes {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "artifactType": artifact_type,
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

/// Pushes an artifact manifest of `artifact_type` referring to `subject` and listing `layers`
/// (blobs already pushed, as JSON descriptors), with the empty config it needs. Returns its
/// descriptor.
pub async fn push_artifact(
    repository: &Repository,
    subject: &BlobDescriptor,
    artifact_type: &str,
    layers: Vec<serde_json::Value>,
) -> Result<BlobDescriptor> {
    repository
        .push_blob(
            &empty_config(),
            Body::Bytes(Bytes::from_static(EMPTY_CONFIG)),
        )
        .await?;
    let bytes = artifact_manifest_of(subject, artifact_type, layers);
    let digest = Digest::sha256(&bytes);
    repository
        .put_manifest(&digest.to_string(), media_type::OCI_MANIFEST, bytes.clone())
        .await?;
    Ok(BlobDescriptor {
        digest,
        media_type: media_type::OCI_MANIFEST.to_string(),
        size: bytes.len() as u64,
    })
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
    /// Its head, if it can be fetched head first.
    pub head: Option<IndexHead>,
    /// Its bytes (a file, streamed).
    pub body: Body,
}

/// Pushes the indexes of `image`'s layers as an artifact referring to the image, and makes it
/// findable (referrers API, else the tag schema). Returns the artifact manifest's descriptor.
pub async fn push_indexes(
    repository: &Repository,
    image: &ResolvedImage,
    indexes: &[IndexUpload],
) -> Result<BlobDescriptor> {
    for upload in indexes {
        repository
            .push_blob(&index_blob(upload), upload.body.clone())
            .await?;
    }
    let layers = index_layers(indexes);
    let artifact = push_artifact(repository, &image.manifest, ARTIFACT_TYPE, layers).await?;
    let (digest, size) = (artifact.digest.clone(), artifact.size);
    if repository
        .referrers(&image.manifest.digest, None)
        .await?
        .is_some()
    {
        return Ok(artifact); // the registry indexes referrers itself
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
    let list = referrers_list(entries, &digest, size);
    repository
        .put_manifest(&tag, media_type::OCI_INDEX, list)
        .await?;
    Ok(artifact)
}

/// The image index that binds `artifact` (an artifact of `artifact_type`: an index artifact,
/// or a prefetch profile) to the image `manifest` (of `platform`): the index the image was
/// resolved through (`existing`, its bytes) with the artifact added, or a new one listing the
/// manifest and the artifact. Entries binding an older artifact of the same type to the same
/// manifest are replaced; every other entry, and the manifest, stay as they were.
pub fn binding_index(
    existing: Option<&[u8]>,
    manifest: &BlobDescriptor,
    platform: &Platform,
    artifact: &BlobDescriptor,
    artifact_type: &str,
) -> Result<Bytes> {
    let subject = manifest.digest.to_string();
    let entry = json!({
        "mediaType": artifact.media_type,
        "digest": artifact.digest,
        "size": artifact.size,
        "artifactType": artifact_type,
        "platform": { "architecture": "unknown", "os": "unknown" },
        "annotations": { SUBJECT_ANNOTATION: subject },
    });
    let what = format!("the image index listing {subject}");
    let index = match existing {
        Some(bytes) => {
            let mut index: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| Error::bad_index(&what, e))?;
            let Some(manifests) = index["manifests"].as_array_mut() else {
                return Err(Error::bad_index(&what, "has no manifests"));
            };
            if !manifests.iter().any(|m| m["digest"] == subject.as_str()) {
                return Err(Error::bad_index(
                    &what,
                    format!("does not list {subject} itself (nested indexes)"),
                ));
            }
            manifests.retain(|m| {
                !(m["artifactType"] == artifact_type
                    && m["annotations"][SUBJECT_ANNOTATION] == subject.as_str())
            });
            manifests.push(entry);
            // A Docker manifest list has no artifact entries: the list becomes an OCI index.
            index["mediaType"] = json!(media_type::OCI_INDEX);
            index
        }
        None => {
            let mut entry_platform = json!({
                "architecture": platform.architecture,
                "os": platform.os,
            });
            if let Some(variant) = &platform.variant {
                entry_platform["variant"] = json!(variant);
            }
            json!({
                "schemaVersion": 2,
                "mediaType": media_type::OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": manifest.media_type,
                        "digest": manifest.digest,
                        "size": manifest.size,
                        "platform": entry_platform,
                    },
                    entry,
                ],
            })
        }
    };
    Ok(Bytes::from(serde_json::to_vec(&index).expect("JSON")))
}

/// Re-points `tag` at an image index binding `artifact` (of `artifact_type`) to `image` (see
/// [`binding_index`]). Returns the new image index's digest: pulling by it pins the image and
/// what is bound to it.
pub async fn bind_artifact(
    repository: &Repository,
    image: &ResolvedImage,
    tag: &str,
    artifact: &BlobDescriptor,
    artifact_type: &str,
) -> Result<Digest> {
    let existing = match &image.index {
        Some(index) => Some(
            repository
                .get_manifest(&index.digest.to_string())
                .await?
                .bytes,
        ),
        None => None,
    };
    let bytes = binding_index(
        existing.as_deref(),
        &image.manifest,
        &image.platform,
        artifact,
        artifact_type,
    )?;
    Ok(repository
        .put_manifest(tag, media_type::OCI_INDEX, bytes)
        .await?)
}

/// The index artifact bound to `image` by the image index it was resolved through, if any.
pub async fn find_bound_indexes(
    repository: &Repository,
    image: &impl ManifestView,
) -> Result<RemoteIndexes> {
    let Some(bound) = bound_companion(image, ARTIFACT_TYPE) else {
        return Ok(RemoteIndexes::none(IndexOrigin::Bound));
    };
    read_artifact(
        repository,
        image,
        &bound.digest,
        Some(bound.size),
        IndexOrigin::Bound,
    )
    .await
}

/// The artifact of `artifact_type` that the image index `image` was resolved through binds to
/// its manifest, if any (the last, should there be several).
pub fn bound_companion<'a>(
    image: &'a impl ManifestView,
    artifact_type: &str,
) -> Option<&'a BlobDescriptor> {
    let subject = image.manifest().digest.to_string();
    image
        .companions()
        .iter()
        .rev()
        .find(|c| {
            c.artifact_type.as_deref() == Some(artifact_type)
                && c.annotations.get(SUBJECT_ANNOTATION) == Some(&subject)
        })
        .map(|c| &c.descriptor)
}

/// Fetches the artifact manifest `artifact` (by digest, so the registry cannot swap it; of
/// `size` bytes when a descriptor says so) and checks that it is of `artifact_type` and refers
/// to `image`'s manifest.
pub async fn fetch_artifact_manifest(
    repository: &Repository,
    image: &impl ManifestView,
    artifact: &Digest,
    size: Option<u64>,
    artifact_type: &str,
) -> Result<serde_json::Value> {
    // Resolving the image may have fetched it already (by digest: verified).
    let prefetched = image
        .companions()
        .iter()
        .find(|c| c.descriptor.digest == *artifact)
        .and_then(|c| c.manifest.clone());
    let fetched = match prefetched {
        Some(fetched) => fetched,
        None => repository.get_manifest(&artifact.to_string()).await?,
    };
    let what = format!("artifact {artifact}");
    if let Some(size) = size
        && fetched.bytes.len() as u64 != size
    {
        return Err(Error::bad_index(
            &what,
            "is not the size its descriptor says",
        ));
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&fetched.bytes).map_err(|e| Error::bad_index(&what, e))?;
    if manifest["artifactType"] != artifact_type {
        return Err(Error::bad_index(
            &what,
            format!("is not of type {artifact_type}"),
        ));
    }
    if manifest["subject"]["digest"].as_str() != Some(&image.manifest().digest.to_string()) {
        return Err(Error::bad_index(&what, "refers to another image"));
    }
    Ok(manifest)
}

/// Finds an index artifact referring to `image`'s manifest (unbound: see the module docs).
pub async fn find_referrer_indexes(
    repository: &Repository,
    image: &impl ManifestView,
) -> Result<RemoteIndexes> {
    let subject = &image.manifest().digest;
    let listing = match repository.referrers(subject, Some(ARTIFACT_TYPE)).await? {
        Some(bytes) => bytes,
        None => match repository.get_manifest(&referrers_tag(subject)).await {
            Ok(fetched) => fetched.bytes,
            Err(lazylayer_source::Error::NotFound { .. }) => {
                return Ok(RemoteIndexes::none(IndexOrigin::Referrer));
            }
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
        return Ok(RemoteIndexes::none(IndexOrigin::Referrer));
    };
    read_artifact(repository, image, &artifact, None, IndexOrigin::Referrer).await
}

/// Reads the index artifact `artifact` of `image`: the index blob of each of its layers.
async fn read_artifact(
    repository: &Repository,
    image: &impl ManifestView,
    artifact: &Digest,
    size: Option<u64>,
    origin: IndexOrigin,
) -> Result<RemoteIndexes> {
    let manifest =
        fetch_artifact_manifest(repository, image, artifact, size, ARTIFACT_TYPE).await?;
    let what = format!("index artifact {artifact}");
    let wanted: HashMap<&Digest, ()> = image.layers().iter().map(|l| (&l.digest, ())).collect();
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
        // A head the annotations describe badly is not used: the blob is fetched whole.
        let head_size = blob["annotations"][HEAD_SIZE_ANNOTATION]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok());
        let head_digest: Option<Digest> = blob["annotations"][HEAD_DIGEST_ANNOTATION]
            .as_str()
            .and_then(|d| d.parse().ok());
        let head = match (head_size, head_digest) {
            (Some(head_size), Some(digest)) if head_size < size => Some(IndexHead {
                size: head_size,
                digest,
            }),
            _ => None,
        };
        by_layer.insert(
            layer,
            RemoteIndex {
                blob: BlobDescriptor {
                    digest,
                    media_type: INDEX_MEDIA_TYPE.to_string(),
                    size,
                },
                head,
            },
        );
    }
    Ok(RemoteIndexes {
        artifact: Some(artifact.clone()),
        origin,
        by_layer,
    })
}

/// Fetches an index blob and checks that it indexes `layer`: only its head (checked against
/// the head digest of the artifact) when the artifact describes one, the windows then being
/// fetched as reads need them (see [`LayerIndex::windows_source`]); else whole, verified
/// against its descriptor.
pub async fn fetch_index(
    repository: &Repository,
    remote: &RemoteIndex,
    layer: &BlobDescriptor,
) -> Result<LayerIndex> {
    let descriptor = &remote.blob;
    let what = format!("index {} of layer {}", descriptor.digest, layer.digest);
    if descriptor.size > INDEX_SIZE_LIMIT {
        return Err(Error::bad_index(&what, "larger than the limit"));
    }
    let index = match &remote.head {
        Some(head) if head.size < descriptor.size => {
            let bytes = repository
                .read_range(&descriptor.digest, 0..head.size)
                .await?;
            if Digest::sha256(&bytes) != head.digest {
                return Err(Error::bad_index(
                    &what,
                    "its head does not match the digest its artifact gives",
                ));
            }
            let source = WindowsSource {
                blob: descriptor.digest.clone(),
                repository: format!("{}/{}", repository.registry(), repository.name()),
            };
            LayerIndex::decode_head(&what, &bytes, descriptor.size, source)?
        }
        _ => {
            let mut stream = repository.open_blob(descriptor).await?;
            let mut encoded = Vec::with_capacity(descriptor.size as usize);
            while let Some(chunk) = stream.next().await {
                encoded.extend_from_slice(&chunk?);
            }
            LayerIndex::decode(&what, &encoded)?
        }
    };
    check_identity(&what, &index, layer)?;
    if index.from_toc() {
        // Made only here, from a layer's table of contents; never pushed.
        return Err(Error::bad_index(
            &what,
            "has chunk spans, which only an index made from the layer's table of contents has",
        ));
    }
    Ok(index)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(fill: u8, media_type: &str) -> BlobDescriptor {
        BlobDescriptor {
            digest: Digest::sha256(&[fill]),
            media_type: media_type.to_string(),
            size: 100 + fill as u64,
        }
    }

    #[test]
    fn a_binding_index_lists_the_manifest_unchanged_and_the_artifact_as_no_platform() {
        let manifest = descriptor(1, media_type::OCI_MANIFEST);
        let artifact = descriptor(2, media_type::OCI_MANIFEST);
        let platform = Platform::new("linux", "arm", Some("v7"));
        let bytes = binding_index(None, &manifest, &platform, &artifact, ARTIFACT_TYPE).unwrap();
        let index: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(index["mediaType"], media_type::OCI_INDEX);
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries[0]["digest"], manifest.digest.to_string());
        assert_eq!(entries[0]["size"], manifest.size);
        assert_eq!(entries[0]["platform"]["variant"], "v7");
        assert_eq!(entries[1]["artifactType"], ARTIFACT_TYPE);
        assert_eq!(entries[1]["platform"]["os"], "unknown");
        assert_eq!(
            entries[1]["annotations"][SUBJECT_ANNOTATION],
            manifest.digest.to_string()
        );
    }

    #[test]
    fn binding_again_replaces_only_this_manifests_artifact() {
        let amd64 = descriptor(1, media_type::DOCKER_MANIFEST);
        let arm64 = descriptor(3, media_type::DOCKER_MANIFEST);
        let list = json!({
            "schemaVersion": 2,
            "mediaType": media_type::DOCKER_LIST,
            "manifests": [
                {"mediaType": amd64.media_type, "digest": amd64.digest, "size": amd64.size,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": arm64.media_type, "digest": arm64.digest, "size": arm64.size,
                 "platform": {"os": "linux", "architecture": "arm64"}},
            ],
        });
        let platform = Platform::new("linux", "amd64", None);
        let first = descriptor(2, media_type::OCI_MANIFEST);
        let once = binding_index(
            Some(&serde_json::to_vec(&list).unwrap()),
            &amd64,
            &platform,
            &first,
            ARTIFACT_TYPE,
        )
        .unwrap();
        let second = descriptor(4, media_type::OCI_MANIFEST);
        let twice = binding_index(Some(&once), &amd64, &platform, &second, ARTIFACT_TYPE).unwrap();
        let index: serde_json::Value = serde_json::from_slice(&twice).unwrap();
        // A Docker list with an artifact in it is an OCI index; both images stay listed.
        assert_eq!(index["mediaType"], media_type::OCI_INDEX);
        let digests: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap())
            .collect();
        assert_eq!(
            digests,
            [
                amd64.digest.to_string(),
                arm64.digest.to_string(),
                second.digest.to_string()
            ]
        );
        // An index that does not list the manifest itself is not rebound.
        let other = descriptor(5, media_type::OCI_MANIFEST);
        assert!(binding_index(Some(&twice), &other, &platform, &second, ARTIFACT_TYPE).is_err());
    }

    #[test]
    fn artifacts_of_other_types_bound_to_the_same_manifest_stay() {
        let manifest = descriptor(1, media_type::OCI_MANIFEST);
        let platform = Platform::new("linux", "amd64", None);
        let indexes = descriptor(2, media_type::OCI_MANIFEST);
        let profile = descriptor(3, media_type::OCI_MANIFEST);
        let newer_indexes = descriptor(4, media_type::OCI_MANIFEST);
        let other_type = "application/vnd.example.profile";
        let once = binding_index(None, &manifest, &platform, &indexes, ARTIFACT_TYPE).unwrap();
        let twice = binding_index(Some(&once), &manifest, &platform, &profile, other_type).unwrap();
        let thrice = binding_index(
            Some(&twice),
            &manifest,
            &platform,
            &newer_indexes,
            ARTIFACT_TYPE,
        )
        .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&thrice).unwrap();
        let listed: Vec<(&str, &str)> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["digest"].as_str().unwrap(),
                    m["artifactType"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                (manifest.digest.to_string().as_str(), ""),
                (profile.digest.to_string().as_str(), other_type),
                (newer_indexes.digest.to_string().as_str(), ARTIFACT_TYPE),
            ]
        );
    }

    #[test]
    fn only_the_referrer_policy_accepts_referrers() {
        for origin in [IndexOrigin::Local, IndexOrigin::Bound] {
            assert!(IndexTrust::Bound.accepts(origin));
            assert!(IndexTrust::Referrer.accepts(origin));
        }
        assert!(!IndexTrust::Bound.accepts(IndexOrigin::Referrer));
        assert!(IndexTrust::Referrer.accepts(IndexOrigin::Referrer));
    }
}
