//! Prefetch profiles that travel with the image: `run --record --push` pushes the store's
//! profile of an image as an OCI artifact (one JSON blob referring to the image manifest) and
//! binds it to the image as `index --push` binds lazy indexes: the tag is re-pointed at an
//! image index listing the unchanged manifest and the artifact. A pull on another machine that
//! has no profile of its own for the image then fetches it with the indexes, and fills the files
//! it lists first: the first node records, every other node starts as fast as a profiled run.
//!
//! Trust: only a profile the image reference binds is used (never an unbound referrer). A
//! profile orders fetches and decides nothing about what a file holds, but it is still input
//! from the registry: it must be small, name this image and only its layers, and list plain
//! relative paths, or the pull goes on without it and says why.

use std::collections::HashSet;

use bytes::Bytes;
use lazylayer_index::distribution::{
    bind_artifact, bound_companion, fetch_artifact_manifest, push_artifact,
};
use lazylayer_source::blob::collect_blob;
use lazylayer_source::registry::Body;
use lazylayer_source::{
    BlobDescriptor, Digest, ImageReference, ImageSource, ManifestView, PlatformChoice, Repository,
};
use lazylayer_store::Profile;
use serde_json::json;

use crate::{Engine, Error, Result};

/// The artifact type of a prefetch profile bound to an image.
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.lazylayer.profile.v1";
/// The media type of the profile blob (the store's profile JSON).
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.lazylayer.profile.v1+json";
/// Largest profile accepted from a registry (a profile of 50,000 files is about 5 MiB).
pub const PROFILE_SIZE_LIMIT: u64 = 8 << 20;
/// Longest path a profile entry may name (Linux's `PATH_MAX`).
const PATH_LIMIT: usize = 4096;

/// A profile pushed to the registry and bound to its image.
#[derive(Clone, Debug)]
pub struct PushedProfile {
    /// How many files it lists.
    pub files: usize,
    /// The profile artifact's manifest digest.
    pub artifact: Digest,
    /// The image index the tag now names (pin it to pull the image with its profile).
    pub image_index: Digest,
}

impl Engine {
    /// Pushes the store's prefetch profile of `image` (a registry image named by tag) as an
    /// artifact and binds it to the image (see the module docs).
    pub async fn push_profile(&self, image: &str, platform: Option<&str>) -> Result<PushedProfile> {
        let reference: ImageReference = image.parse()?;
        let tag = match &reference {
            ImageReference::Registry(named) if named.digest.is_none() => named.tag.clone(),
            _ => None,
        };
        let Some(tag) = tag else {
            return Err(Error::Refused(format!(
                "pushing a profile re-points the image's tag at an image index that binds it: \
                 name the image by tag (HOST/NAME:TAG), not {image}"
            )));
        };
        let choice = PlatformChoice::from_flag(platform)?;
        let client = self.registry_client()?;
        let source = ImageSource::open(&reference, &client)?;
        let ImageSource::Registry { repository, .. } = &source else {
            unreachable!("a registry reference opens a registry source");
        };
        let resolved = source.resolve(&choice).await?;
        let path = self.store.profile_path(&resolved.manifest.digest);
        let Some(profile) = Profile::load(&path)? else {
            return Err(Error::Refused(format!(
                "no prefetch profile of {image} (manifest {}) in this store: record one with \
                 `lazylayer run --record {image}` on a store where it is not local yet",
                resolved.manifest.digest
            )));
        };
        // What a pull elsewhere would refuse is not pushed.
        let profile = checked(profile, &resolved.manifest.digest, &resolved.layers)
            .map_err(|reason| Error::Refused(format!("{}: {reason}", path.display())))?;
        let bytes = Bytes::from(serde_json::to_vec(&profile).expect("a profile serialises"));
        let blob = BlobDescriptor {
            digest: Digest::sha256(&bytes),
            media_type: PROFILE_MEDIA_TYPE.to_string(),
            size: bytes.len() as u64,
        };
        repository.push_blob(&blob, Body::Bytes(bytes)).await?;
        let layers = vec![json!({
            "mediaType": blob.media_type,
            "digest": blob.digest,
            "size": blob.size,
        })];
        let artifact = push_artifact(
            repository,
            &resolved.manifest,
            PROFILE_ARTIFACT_TYPE,
            layers,
        )
        .await?;
        let image_index = bind_artifact(
            repository,
            &resolved,
            &tag,
            &artifact,
            PROFILE_ARTIFACT_TYPE,
        )
        .await?;
        Ok(PushedProfile {
            files: profile.files.len(),
            artifact: artifact.digest,
            image_index,
        })
    }
}

/// The prefetch profile bound to `image`, fetched and checked, if it has one.
pub async fn fetch_bound_profile(
    repository: &Repository,
    image: &impl ManifestView,
) -> Result<Option<Profile>> {
    let Some(artifact) = bound_companion(image, PROFILE_ARTIFACT_TYPE) else {
        return Ok(None);
    };
    let manifest = fetch_artifact_manifest(
        repository,
        image,
        &artifact.digest,
        Some(artifact.size),
        PROFILE_ARTIFACT_TYPE,
    )
    .await?;
    let what = format!("the prefetch profile {}", artifact.digest);
    let refused = |reason: String| Error::Refused(format!("{what}: {reason}"));
    let blobs: Vec<&serde_json::Value> = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["mediaType"] == PROFILE_MEDIA_TYPE)
        .collect();
    let [blob] = blobs.as_slice() else {
        return Err(refused(format!(
            "lists {} profile blobs, not one",
            blobs.len()
        )));
    };
    let (Some(digest), Some(size)) = (
        blob["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok()),
        blob["size"].as_u64(),
    ) else {
        return Err(refused("has a malformed blob descriptor".into()));
    };
    if size > PROFILE_SIZE_LIMIT {
        return Err(refused(format!(
            "is {size} bytes, more than the {PROFILE_SIZE_LIMIT} accepted"
        )));
    }
    let descriptor = BlobDescriptor {
        digest,
        media_type: PROFILE_MEDIA_TYPE.to_string(),
        size,
    };
    let stream = repository.open_blob(&descriptor).await?;
    let bytes = collect_blob(stream, &what, PROFILE_SIZE_LIMIT).await?;
    let profile: Profile =
        serde_json::from_slice(&bytes).map_err(|e| refused(format!("is not a profile: {e}")))?;
    checked(profile, &image.manifest().digest, image.layers())
        .map(Some)
        .map_err(refused)
}

/// `profile` if it is a profile of the image of `manifest` that lists only plain relative paths
/// in its `layers`, each once (the first time kept); else why not.
pub fn checked(
    profile: Profile,
    manifest: &Digest,
    layers: &[BlobDescriptor],
) -> std::result::Result<Profile, String> {
    if let Some(named) = &profile.manifest
        && named != manifest
    {
        return Err(format!(
            "is the profile of manifest {named}, not of {manifest}"
        ));
    }
    let layers: HashSet<&Digest> = layers.iter().map(|l| &l.digest).collect();
    let mut seen = HashSet::new();
    let mut files = Vec::with_capacity(profile.files.len());
    for file in profile.files {
        if !layers.contains(&file.layer) {
            return Err(format!(
                "names layer {}, which is not a layer of the image",
                file.layer
            ));
        }
        if !plain_relative_path(&file.path) {
            return Err(format!(
                "names {:?}, which is not a plain relative path",
                file.path
            ));
        }
        if seen.insert((file.layer.clone(), file.path.clone())) {
            files.push(file);
        }
    }
    Ok(Profile {
        manifest: Some(manifest.clone()),
        files,
    })
}

/// A path as a layer's file table names its entries: relative, without `.` or `..` or empty
/// components, without NUL, at most [`PATH_LIMIT`] bytes.
fn plain_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= PATH_LIMIT
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_store::ProfileEntry;

    fn image() -> (Digest, Vec<BlobDescriptor>) {
        let layer = BlobDescriptor {
            digest: Digest::sha256(b"layer"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size: 3,
        };
        (Digest::sha256(b"manifest"), vec![layer])
    }

    fn entry(layer: &Digest, path: &str) -> ProfileEntry {
        ProfileEntry {
            layer: layer.clone(),
            path: path.to_string(),
        }
    }

    #[test]
    fn a_profile_of_the_image_is_kept_each_file_once() {
        let (manifest, layers) = image();
        let layer = layers[0].digest.clone();
        let profile = Profile {
            manifest: None,
            files: vec![
                entry(&layer, "usr/bin/perl"),
                entry(&layer, "etc/passwd"),
                entry(&layer, "usr/bin/perl"),
            ],
        };
        let kept = checked(profile, &manifest, &layers).unwrap();
        assert_eq!(kept.manifest.as_ref(), Some(&manifest));
        let paths: Vec<&str> = kept.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["usr/bin/perl", "etc/passwd"]);
    }

    #[test]
    fn a_profile_claiming_another_image_or_layer_or_path_is_refused() {
        let (manifest, layers) = image();
        let layer = layers[0].digest.clone();
        let other = Digest::sha256(b"another");
        let of_other_image = Profile {
            manifest: Some(other.clone()),
            files: vec![entry(&layer, "etc/passwd")],
        };
        assert!(
            checked(of_other_image, &manifest, &layers)
                .unwrap_err()
                .contains("manifest")
        );
        let foreign_layer = Profile {
            manifest: None,
            files: vec![entry(&other, "etc/passwd")],
        };
        assert!(
            checked(foreign_layer, &manifest, &layers)
                .unwrap_err()
                .contains("not a layer")
        );
        for path in [
            "",
            "/etc/passwd",
            "etc/../../x",
            "etc//passwd",
            "./etc",
            "a\0b",
        ] {
            let bad_path = Profile {
                manifest: None,
                files: vec![entry(&layer, path)],
            };
            assert!(
                checked(bad_path, &manifest, &layers)
                    .unwrap_err()
                    .contains("plain relative"),
                "{path:?}"
            );
        }
        let long = "a/".repeat(PATH_LIMIT / 2) + "b";
        assert!(!plain_relative_path(&long));
    }
}
