//! # lazylayer-source: where image bytes come from
//!
//! The first step of lazylayer's data flow: an image reference is parsed
//! ([`reference`]), resolved to one platform's manifest, config and layers ([`manifest`]),
//! and its blobs are read whole (verified against their digests) or by byte range, from a
//! registry ([`registry`]) or an OCI layout on disk ([`layout`]). [`ImageSource`] puts both
//! behind one interface for the steps that follow (index, fetcher).
#![forbid(unsafe_code)]

pub mod blob;
pub mod digest;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod platform;
pub mod reference;
pub mod registry;

use std::ops::Range;

use bytes::Bytes;

pub use blob::BlobStream;
pub use digest::{Digest, DigestAlgorithm, DigestHasher};
pub use error::{Error, Result};
pub use layout::OciLayout;
pub use manifest::{BlobDescriptor, ManifestView, ResolvedImage, ResolvedManifest};
pub use platform::{Platform, PlatformChoice};
pub use reference::{ImageReference, LayoutReference, RegistryReference};
pub use registry::{ClientOptions, RegistryClient, Repository};

/// An image's home: a registry repository or an OCI layout, opened for reading.
#[derive(Clone)]
pub enum ImageSource {
    /// A repository in a registry.
    Registry {
        /// The repository.
        repository: Repository,
        /// The reference within it.
        reference: RegistryReference,
    },
    /// An OCI layout directory.
    Layout {
        /// The layout.
        layout: OciLayout,
        /// The reference within it.
        reference: LayoutReference,
    },
}

impl ImageSource {
    /// Opens the place `reference` names; registries are reached through `client`.
    pub fn open(reference: &ImageReference, client: &RegistryClient) -> Result<Self> {
        match reference {
            ImageReference::Registry(r) => Ok(ImageSource::Registry {
                repository: client.repository_of(r)?,
                reference: r.clone(),
            }),
            ImageReference::Layout(l) => Ok(ImageSource::Layout {
                layout: OciLayout::open(&l.dir)?,
                reference: l.clone(),
            }),
        }
    }

    /// Resolves the reference to one platform's manifest, config and layers.
    pub async fn resolve(&self, choice: &PlatformChoice) -> Result<ResolvedImage> {
        match self {
            ImageSource::Registry {
                repository,
                reference,
            } => repository.resolve(reference, choice).await,
            ImageSource::Layout { layout, reference } => layout.resolve(reference, choice).await,
        }
    }

    /// Resolves the image to one platform's manifest without its config, fetching the
    /// manifests of the companions of `companion_types` (artifacts bound to the image)
    /// alongside the image manifest: a pull looks for those while the config downloads
    /// ([`with_config`](Self::with_config)).
    pub async fn resolve_manifest(
        &self,
        choice: &PlatformChoice,
        companion_types: &[&str],
    ) -> Result<ResolvedManifest> {
        match self {
            ImageSource::Registry {
                repository,
                reference,
            } => {
                repository
                    .resolve_manifest(reference, choice, companion_types)
                    .await
            }
            ImageSource::Layout { layout, reference } => {
                layout
                    .resolve_manifest(reference, choice, companion_types)
                    .await
            }
        }
    }

    /// Fetches the config of `manifest`, which [`resolve_manifest`](Self::resolve_manifest)
    /// gave: the image resolved as [`resolve`](Self::resolve) resolves it.
    pub async fn with_config(
        &self,
        manifest: ResolvedManifest,
        choice: &PlatformChoice,
    ) -> Result<ResolvedImage> {
        match self {
            ImageSource::Registry { repository, .. } => {
                manifest::with_config(repository, manifest, choice).await
            }
            ImageSource::Layout { layout, .. } => {
                manifest::with_config(layout, manifest, choice).await
            }
        }
    }

    /// Streams a whole blob, verified against its descriptor.
    pub async fn open_blob(&self, descriptor: &BlobDescriptor) -> Result<BlobStream> {
        match self {
            ImageSource::Registry { repository, .. } => repository.open_blob(descriptor).await,
            ImageSource::Layout { layout, .. } => layout.open_blob(descriptor).await,
        }
    }

    /// Reads a byte range of a blob (unverified: see [`Repository::read_range`]).
    pub async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes> {
        match self {
            ImageSource::Registry { repository, .. } => repository.read_range(digest, range).await,
            ImageSource::Layout { layout, .. } => layout.read_range(digest, range).await,
        }
    }

    /// Reads a byte range of a blob, handing its bytes to `sink` as they arrive (unverified:
    /// see [`Repository::read_range_progressively`]); a layout's range comes in one piece.
    pub async fn read_range_progressively(
        &self,
        digest: &Digest,
        range: Range<u64>,
        sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
    ) -> Result<()> {
        match self {
            ImageSource::Registry { repository, .. } => {
                repository
                    .read_range_progressively(digest, range, sink)
                    .await
            }
            ImageSource::Layout { layout, .. } => sink(&layout.read_range(digest, range).await?),
        }
    }
}
