//! Manifests: the media types lazylayer reads, parsing them, and resolving an image reference
//! to one platform's manifest, config and layers. The same resolution runs for registries and
//! OCI layouts; each supplies only "fetch this manifest" and "fetch this small blob".
//!
//! Why one file of this size: one resolution algorithm, and a fifth of it is tests.

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::platform::{Platform, PlatformChoice};
use crate::{Digest, Error, Result};

/// Media types of manifests, indexes and configs.
pub mod media_type {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index (multi-platform).
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker image manifest v2, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list (multi-platform).
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker schema 1 manifests, which lazylayer refuses (deprecated, unsigned digests).
    pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Signed Docker schema 1.
    pub const DOCKER_SCHEMA1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// The `Accept` header for manifest requests: every manifest kind lazylayer reads.
    pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
        application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.docker.distribution.manifest.v2+json";
}

/// Largest manifest accepted (the limit CNCF distribution enforces on push).
pub const MANIFEST_SIZE_LIMIT: u64 = 4 << 20;
/// Largest image config accepted.
pub const CONFIG_SIZE_LIMIT: u64 = 8 << 20;
/// How deep indexes may nest (an index listing indexes).
const MAX_INDEX_DEPTH: usize = 4;

/// A manifest's bytes as fetched, with their digest and the media type they were served as.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The exact bytes: the digest is over these.
    pub bytes: Bytes,
    /// Media type from the Content-Type header or the layout descriptor (may be empty).
    pub media_type: String,
    /// Digest of `bytes`.
    pub digest: Digest,
}

/// A content descriptor with a validated digest: what a manifest says about a blob.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlobDescriptor {
    /// Content digest.
    pub digest: Digest,
    /// Media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
    /// Size in bytes.
    pub size: u64,
}

impl BlobDescriptor {
    fn from_oci(what: &str, descriptor: &Descriptor) -> Result<Self> {
        let digest: Digest = descriptor
            .digest()
            .to_string()
            .parse()
            .map_err(|e: Error| Error::malformed(what, e))?;
        Ok(BlobDescriptor {
            digest,
            media_type: descriptor.media_type().to_string(),
            size: descriptor.size(),
        })
    }
}

/// A parsed manifest: one platform's image, or a list of them.
#[derive(Debug)]
pub enum ParsedManifest {
    /// OCI image manifest or Docker schema 2 manifest.
    Image(Box<ImageManifest>),
    /// OCI image index or Docker manifest list.
    Index(Box<ImageIndex>),
}

/// Which kind of document a manifest is, from its media type, else its `mediaType` field, else
/// its shape.
fn manifest_kind(what: &str, fetched: &FetchedManifest) -> Result<(bool, String)> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let header_type = fetched
        .media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let probe: Probe =
        serde_json::from_slice(&fetched.bytes).map_err(|e| Error::malformed(what, e))?;
    let media_type = match header_type.as_str() {
        media_type::OCI_MANIFEST
        | media_type::OCI_INDEX
        | media_type::DOCKER_MANIFEST
        | media_type::DOCKER_LIST
        | media_type::DOCKER_SCHEMA1
        | media_type::DOCKER_SCHEMA1_SIGNED => header_type,
        _ => match (probe.media_type.clone(), &probe.manifests, &probe.layers) {
            (Some(t), _, _) => t,
            (None, Some(_), _) => media_type::OCI_INDEX.to_string(),
            (None, None, Some(_)) => media_type::OCI_MANIFEST.to_string(),
            (None, None, None) => header_type,
        },
    };
    if probe.schema_version == Some(1)
        || media_type == media_type::DOCKER_SCHEMA1
        || media_type == media_type::DOCKER_SCHEMA1_SIGNED
    {
        return Err(Error::UnsupportedMediaType {
            what: what.to_string(),
            media_type,
            hint: " (Docker schema 1 is deprecated; re-push the image with a current tool)",
        });
    }
    // A document may not claim one kind in its header and another in its body.
    if let Some(body_type) = &probe.media_type
        && body_type != &media_type
    {
        return Err(Error::malformed(
            what,
            format!("served as {media_type} but its mediaType field says {body_type}"),
        ));
    }
    match media_type.as_str() {
        media_type::OCI_INDEX | media_type::DOCKER_LIST => Ok((true, media_type)),
        media_type::OCI_MANIFEST | media_type::DOCKER_MANIFEST => Ok((false, media_type)),
        _ => Err(Error::UnsupportedMediaType {
            what: what.to_string(),
            media_type,
            hint: " (not an image: lazylayer reads OCI and Docker v2 manifests and indexes)",
        }),
    }
}

/// Parses manifest bytes as an image manifest or an index.
pub fn parse_manifest(what: &str, fetched: &FetchedManifest) -> Result<(ParsedManifest, String)> {
    let (is_index, media_type) = manifest_kind(what, fetched)?;
    let parsed = if is_index {
        ParsedManifest::Index(Box::new(
            serde_json::from_slice(&fetched.bytes).map_err(|e| Error::malformed(what, e))?,
        ))
    } else {
        ParsedManifest::Image(Box::new(
            serde_json::from_slice(&fetched.bytes).map_err(|e| Error::malformed(what, e))?,
        ))
    };
    Ok((parsed, media_type))
}

/// The parts of an image config lazylayer needs now; unknown fields are ignored.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct ImageConfigSummary {
    /// OS the image was built for.
    #[serde(default)]
    pub os: String,
    /// Architecture the image was built for.
    #[serde(default)]
    pub architecture: String,
    /// CPU variant.
    #[serde(default)]
    pub variant: Option<String>,
    /// The uncompressed digests of the layers, in order.
    #[serde(default)]
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct RootFs {
    /// Digest of each layer's uncompressed tar (the "diff_id").
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// One platform's image, resolved from a reference: what `inspect` prints and what pulling needs.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The reference as the user gave it, normalised.
    pub reference: String,
    /// The image manifest (after platform selection).
    pub manifest: BlobDescriptor,
    /// The index or manifest list the manifest was chosen from, if any.
    pub index: Option<BlobDescriptor>,
    /// The platform of the image.
    pub platform: Platform,
    /// The config blob's descriptor.
    pub config: BlobDescriptor,
    /// The config as fetched and verified.
    pub config_bytes: Bytes,
    /// The config's fields lazylayer uses.
    pub config_summary: ImageConfigSummary,
    /// The layers, bottom first.
    pub layers: Vec<BlobDescriptor>,
    /// The image manifest bytes, verified against `manifest.digest`.
    pub manifest_bytes: Bytes,
    /// The entries of the index the manifest was chosen from that are not images (attestations,
    /// lazylayer index artifacts): the digest that names that index covers them too.
    pub companions: Vec<Companion>,
}

/// One platform's image manifest, resolved from a reference before its config is fetched:
/// enough to look for what travels with the image (indexes, profiles) while the config
/// downloads. [`ImageSource::with_config`](crate::ImageSource::with_config) completes it.
#[derive(Clone, Debug)]
pub struct ResolvedManifest {
    /// The reference as the user gave it, normalised.
    pub reference: String,
    /// The image manifest (after platform selection).
    pub manifest: BlobDescriptor,
    /// The index or manifest list the manifest was chosen from, if any.
    pub index: Option<BlobDescriptor>,
    /// The platform the index lists the manifest for (a bare manifest's is in its config).
    pub platform: Option<Platform>,
    /// The config blob's descriptor.
    pub config: BlobDescriptor,
    /// The layers, bottom first.
    pub layers: Vec<BlobDescriptor>,
    /// The image manifest bytes, verified against `manifest.digest`.
    pub manifest_bytes: Bytes,
    /// The entries of the index the manifest was chosen from that are not images.
    pub companions: Vec<Companion>,
}

/// What [`ResolvedManifest`] and [`ResolvedImage`] share: what those looking for the artifacts
/// bound to an image need.
pub trait ManifestView {
    /// The image manifest.
    fn manifest(&self) -> &BlobDescriptor;
    /// The layers, bottom first.
    fn layers(&self) -> &[BlobDescriptor];
    /// The non-image entries of the index the manifest was chosen from.
    fn companions(&self) -> &[Companion];
}

impl ManifestView for ResolvedManifest {
    fn manifest(&self) -> &BlobDescriptor {
        &self.manifest
    }
    fn layers(&self) -> &[BlobDescriptor] {
        &self.layers
    }
    fn companions(&self) -> &[Companion] {
        &self.companions
    }
}

impl ManifestView for ResolvedImage {
    fn manifest(&self) -> &BlobDescriptor {
        &self.manifest
    }
    fn layers(&self) -> &[BlobDescriptor] {
        &self.layers
    }
    fn companions(&self) -> &[Companion] {
        &self.companions
    }
}

/// An entry of an image index that is not an image for any platform (its platform is
/// `unknown/unknown`, or it has none), as attestations and lazylayer's bound indexes are.
#[derive(Clone, Debug)]
pub struct Companion {
    /// What the entry points at.
    pub descriptor: BlobDescriptor,
    /// Its `artifactType`, if it has one.
    pub artifact_type: Option<String>,
    /// Its annotations.
    pub annotations: std::collections::HashMap<String, String>,
    /// Its manifest, verified against `descriptor`'s digest, when the resolution was asked to
    /// fetch it alongside the image manifest (saving its reader a round trip).
    pub manifest: Option<FetchedManifest>,
}

/// The companions among the entries of `index` (entries with malformed digests are left out:
/// they cannot be fetched by digest, so they vouch for nothing).
fn companions_of(what: &str, index: &ImageIndex) -> Vec<Companion> {
    index
        .manifests()
        .iter()
        .filter(|entry| {
            entry
                .platform()
                .as_ref()
                .is_none_or(|p| p.os().to_string() == "unknown")
        })
        .filter_map(|entry| {
            Some(Companion {
                descriptor: BlobDescriptor::from_oci(what, entry).ok()?,
                artifact_type: entry.artifact_type().as_ref().map(|t| t.to_string()),
                annotations: entry.annotations().clone().unwrap_or_default(),
                manifest: None,
            })
        })
        .collect()
}

/// Names the manifest to fetch: by tag (or the layout's only image) or by digest.
#[derive(Clone, Copy, Debug)]
pub enum ManifestRef<'a> {
    /// A tag; `None` means the layout's single image.
    Tag(Option<&'a str>),
    /// A digest: the fetched bytes must hash to it.
    Digest(&'a Digest),
}

/// What a source of images must offer for [`resolve_manifest`] to work on it.
pub(crate) trait ManifestSource {
    /// Fetches a manifest. When asked by digest, the source checks the bytes against it.
    async fn fetch_manifest(&self, reference: ManifestRef<'_>) -> Result<FetchedManifest>;
    /// Fetches a small blob (a config) whole, verified against its descriptor.
    async fn fetch_small_blob(&self, descriptor: &BlobDescriptor, limit: u64) -> Result<Bytes>;
}

/// Resolves a reference to one platform's image manifest and layers, without its config; the
/// manifests of the index's companions of `companion_types` bound to that manifest (an
/// annotation names it) are fetched alongside the image manifest (see [`Companion::manifest`]).
pub(crate) async fn resolve_manifest<S: ManifestSource>(
    source: &S,
    display: &str,
    top: ManifestRef<'_>,
    choice: &PlatformChoice,
    companion_types: &[&str],
) -> Result<ResolvedManifest> {
    let mut fetched = source.fetch_manifest(top).await?;
    if let ManifestRef::Digest(expected) = top
        && &fetched.digest != expected
    {
        return Err(Error::DigestMismatch {
            what: format!("manifest of {display}"),
            expected: expected.clone(),
            actual: fetched.digest.clone(),
        });
    }
    let mut index = None;
    let mut companions = Vec::new();
    let mut selected_platform = None;
    for _depth in 0..MAX_INDEX_DEPTH {
        let what = format!("manifest {} of {display}", fetched.digest);
        let (parsed, media_type) = parse_manifest(&what, &fetched)?;
        match parsed {
            ParsedManifest::Index(list) => {
                let (child, platform) = select_platform(display, &list, choice)?;
                companions = companions_of(&what, &list);
                index.get_or_insert(BlobDescriptor {
                    digest: fetched.digest.clone(),
                    media_type,
                    size: fetched.bytes.len() as u64,
                });
                selected_platform = Some(platform);
                let (child_fetched, ()) = futures_util::future::join(
                    source.fetch_manifest(ManifestRef::Digest(&child.digest)),
                    fetch_companions(source, &mut companions, companion_types, &child.digest),
                )
                .await;
                let child_fetched = child_fetched?;
                if child_fetched.bytes.len() as u64 != child.size {
                    return Err(Error::SizeMismatch {
                        what: format!("manifest {} of {display}", child.digest),
                        expected: child.size,
                        actual: child_fetched.bytes.len() as u64,
                    });
                }
                fetched = FetchedManifest {
                    media_type: if child_fetched.media_type.is_empty() {
                        child.media_type
                    } else {
                        child_fetched.media_type
                    },
                    ..child_fetched
                };
            }
            ParsedManifest::Image(manifest) => {
                let config = BlobDescriptor::from_oci(&what, manifest.config())?;
                let layers = manifest
                    .layers()
                    .iter()
                    .map(|layer| BlobDescriptor::from_oci(&what, layer))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(ResolvedManifest {
                    reference: display.to_string(),
                    manifest: BlobDescriptor {
                        digest: fetched.digest.clone(),
                        media_type,
                        size: fetched.bytes.len() as u64,
                    },
                    index,
                    platform: selected_platform,
                    config,
                    layers,
                    manifest_bytes: fetched.bytes,
                    companions,
                });
            }
        }
    }
    Err(Error::malformed(display, "indexes nested too deeply"))
}

/// The most companion manifests fetched alongside an image manifest.
const COMPANIONS_FETCHED: usize = 8;

/// Fetches the manifests of the `companions` of `types` that name the chosen manifest `subject`
/// in an annotation (by digest: verified), a few at most: a registry's index cannot make a pull
/// fetch more. One that cannot be fetched is left unfetched: its reader fetches it again and
/// says why it fails, as it would without this.
async fn fetch_companions<S: ManifestSource>(
    source: &S,
    companions: &mut [Companion],
    types: &[&str],
    subject: &Digest,
) {
    let subject = subject.to_string();
    let wanted = companions
        .iter_mut()
        .filter(|c| {
            c.artifact_type
                .as_deref()
                .is_some_and(|t| types.contains(&t))
                && c.annotations.values().any(|v| *v == subject)
        })
        .take(COMPANIONS_FETCHED);
    futures_util::future::join_all(wanted.map(|companion| async move {
        let digest = &companion.descriptor.digest;
        match source.fetch_manifest(ManifestRef::Digest(digest)).await {
            Ok(fetched) if &fetched.digest == digest => companion.manifest = Some(fetched),
            Ok(_) => {}
            Err(e) => tracing::debug!("companion {digest}: {e}"),
        }
    }))
    .await;
}

/// Fetches the config of the resolved `manifest`: the image resolved whole.
pub(crate) async fn with_config<S: ManifestSource>(
    source: &S,
    manifest: ResolvedManifest,
    choice: &PlatformChoice,
) -> Result<ResolvedImage> {
    let display = &manifest.reference;
    let config = &manifest.config;
    let layers = &manifest.layers;
    let config_bytes = source.fetch_small_blob(config, CONFIG_SIZE_LIMIT).await?;
    let config_summary: ImageConfigSummary = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::malformed(format!("config {} of {display}", config.digest), e))?;
    if !config_summary.rootfs.diff_ids.is_empty()
        && config_summary.rootfs.diff_ids.len() != layers.len()
    {
        return Err(Error::malformed(
            format!("config {} of {display}", config.digest),
            format!(
                "{} diff_ids for {} layers",
                config_summary.rootfs.diff_ids.len(),
                layers.len()
            ),
        ));
    }
    let platform = match &manifest.platform {
        Some(platform) => platform.clone(),
        None => {
            let platform = Platform::new(
                &config_summary.os,
                &config_summary.architecture,
                config_summary.variant.as_deref(),
            );
            if !choice.platform.accepts(&platform) {
                if choice.explicit {
                    return Err(Error::NoMatchingPlatform {
                        image: display.to_string(),
                        wanted: choice.platform.to_string(),
                        available: platform.to_string(),
                    });
                }
                let wanted = &choice.platform;
                let image = display.to_string();
                tracing::warn!("{image} is built for {platform}, not for this machine ({wanted})");
            }
            platform
        }
    };
    Ok(ResolvedImage {
        reference: manifest.reference,
        manifest: manifest.manifest,
        index: manifest.index,
        platform,
        config: manifest.config,
        config_bytes,
        config_summary,
        layers: manifest.layers,
        manifest_bytes: manifest.manifest_bytes,
        companions: manifest.companions,
    })
}

/// Picks the entry of an index that matches the wanted platform, preferring an exact variant.
fn select_platform(
    display: &str,
    index: &ImageIndex,
    choice: &PlatformChoice,
) -> Result<(BlobDescriptor, Platform)> {
    let what = format!("index of {display}");
    let mut candidates = Vec::new();
    for entry in index.manifests() {
        let Some(platform) = entry.platform() else {
            continue;
        };
        let platform = Platform::new(
            &platform.os().to_string(),
            &platform.architecture().to_string(),
            platform.variant().as_deref(),
        );
        // Attestations and other non-image entries ride along as "unknown/unknown".
        if platform.os == "unknown" {
            continue;
        }
        candidates.push((BlobDescriptor::from_oci(&what, entry)?, platform));
    }
    let wanted = &choice.platform;
    let exact = candidates
        .iter()
        .position(|(_, p)| p == wanted)
        .or_else(|| candidates.iter().position(|(_, p)| wanted.accepts(p)));
    match exact {
        Some(i) => Ok(candidates.swap_remove(i)),
        None => {
            let mut available: Vec<String> =
                candidates.iter().map(|(_, p)| p.to_string()).collect();
            available.dedup();
            Err(Error::NoMatchingPlatform {
                image: display.to_string(),
                wanted: wanted.to_string(),
                available: if available.is_empty() {
                    "none".to_string()
                } else {
                    available.join(", ")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(media_type: &str, json: &str) -> FetchedManifest {
        FetchedManifest {
            bytes: Bytes::copy_from_slice(json.as_bytes()),
            media_type: media_type.to_string(),
            digest: Digest::sha256(json.as_bytes()),
        }
    }

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn kinds_from_header_field_or_shape() {
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[]}}"#,
            media_type::DOCKER_LIST
        );
        let (parsed, mt) = parse_manifest("m", &fetched("", &list)).unwrap();
        assert!(matches!(parsed, ParsedManifest::Index(_)));
        assert_eq!(mt, media_type::DOCKER_LIST);
        let bare = r#"{"schemaVersion":2,"manifests":[]}"#;
        let (parsed, _) = parse_manifest("m", &fetched("application/json", bare)).unwrap();
        assert!(matches!(parsed, ParsedManifest::Index(_)));
    }

    #[test]
    fn schema1_and_foreign_types_are_refused() {
        let s1 = r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let err = parse_manifest("m", &fetched(media_type::DOCKER_SCHEMA1_SIGNED, s1)).unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");
        let helm = r#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#;
        assert!(parse_manifest("m", &fetched("", helm)).is_err());
    }

    #[test]
    fn header_and_body_must_agree() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[]}}"#,
            media_type::OCI_INDEX
        );
        let err = parse_manifest("m", &fetched(media_type::OCI_MANIFEST, &body)).unwrap_err();
        assert!(err.to_string().contains("mediaType"), "{err}");
    }

    #[test]
    fn platform_selection_prefers_exact_variant_and_lists_choices() {
        let index_json = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{m}","digest":"{a}","size":1,"platform":{{"os":"linux","architecture":"arm","variant":"v6"}}}},
              {{"mediaType":"{m}","digest":"{b}","size":2,"platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}},
              {{"mediaType":"{m}","digest":"{a}","size":3,"platform":{{"os":"unknown","architecture":"unknown"}}}}
            ]}}"#,
            m = media_type::OCI_MANIFEST,
            a = DIGEST_A,
            b = DIGEST_B
        );
        let index: ImageIndex = serde_json::from_str(&index_json).unwrap();
        let choose = |p: &str| PlatformChoice {
            platform: p.parse().unwrap(),
            explicit: true,
        };
        let (d, p) = select_platform("img", &index, &choose("linux/arm/v7")).unwrap();
        assert_eq!((d.size, p.to_string().as_str()), (2, "linux/arm/v7"));
        let (d, _) = select_platform("img", &index, &choose("linux/arm")).unwrap();
        assert_eq!(d.size, 1);
        let err = select_platform("img", &index, &choose("linux/amd64")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "img has no image for platform linux/amd64 (available: linux/arm/v6, linux/arm/v7)"
        );
    }
}
