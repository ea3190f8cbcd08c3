//! Reading and writing manifests: size-limited, digest-checked, and resolved to one platform.

use bytes::{Bytes, BytesMut};
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE};

use super::Repository;
use super::auth::Access;
use super::retry::Attempts;
use super::transport::{Body, Request};
use crate::blob::collect_blob;
use crate::error::error_chain;
use crate::manifest::{
    BlobDescriptor, FetchedManifest, MANIFEST_SIZE_LIMIT, ManifestRef, ManifestSource,
    ResolvedImage, ResolvedManifest, media_type, resolve_manifest, with_config,
};
use crate::platform::PlatformChoice;
use crate::reference::RegistryReference;
use crate::{Digest, DigestAlgorithm, Error, Result};

/// The header in which registries state a manifest's digest.
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

impl Repository {
    /// Resolves `reference` (which must name this repository) to one platform's image.
    pub async fn resolve(
        &self,
        reference: &RegistryReference,
        choice: &PlatformChoice,
    ) -> Result<ResolvedImage> {
        let manifest = self.resolve_manifest(reference, choice, &[]).await?;
        with_config(self, manifest, choice).await
    }

    /// Resolves `reference` to one platform's manifest, fetching the manifests of its
    /// companions of `companion_types` alongside (see [`ResolvedManifest`]).
    pub async fn resolve_manifest(
        &self,
        reference: &RegistryReference,
        choice: &PlatformChoice,
        companion_types: &[&str],
    ) -> Result<ResolvedManifest> {
        let display = reference.to_string();
        let top = match (&reference.digest, &reference.tag) {
            (Some(digest), _) => ManifestRef::Digest(digest),
            (None, tag) => ManifestRef::Tag(Some(tag.as_deref().unwrap_or("latest"))),
        };
        resolve_manifest(self, &display, top, choice, companion_types).await
    }

    /// Fetches a manifest by tag or digest, checking its size and, when asked by digest, its
    /// digest.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let expected: Option<Digest> = reference
            .contains(':')
            .then(|| reference.parse())
            .transpose()?;
        let what = format!("GET manifest {}/{}:{reference}", self.registry, self.name);
        let request = Request::new(
            Method::GET,
            self.url("manifests", reference)?,
            Access::Pull,
            what.clone(),
        )
        .header(ACCEPT, media_type::MANIFEST_ACCEPT);
        let mut attempts = Attempts::new(self.client.retry_policy());
        loop {
            let response = self.send(&request, &mut attempts).await?;
            if response
                .content_length()
                .is_some_and(|len| len > MANIFEST_SIZE_LIMIT)
            {
                return Err(Error::TooLarge {
                    what: format!("manifest {}/{}:{reference}", self.registry, self.name),
                    limit: MANIFEST_SIZE_LIMIT,
                });
            }
            let media_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let stated: Option<Digest> = response
                .headers()
                .get(DOCKER_CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let bytes = match read_limited(response, MANIFEST_SIZE_LIMIT).await {
                Ok(bytes) => bytes,
                Err(ReadError::TooLarge) => {
                    return Err(Error::TooLarge {
                        what: format!("manifest {}/{}:{reference}", self.registry, self.name),
                        limit: MANIFEST_SIZE_LIMIT,
                    });
                }
                Err(ReadError::Transport(e)) => {
                    let wait = attempts.failed(&what, e, None)?;
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let algorithm = expected
                .as_ref()
                .map_or(DigestAlgorithm::Sha256, Digest::algorithm);
            let digest = Digest::compute(algorithm, &bytes);
            for claimed in expected
                .iter()
                .chain(stated.iter().filter(|d| d.algorithm() == algorithm))
            {
                if claimed != &digest {
                    return Err(Error::DigestMismatch {
                        what: format!("manifest {}/{}:{reference}", self.registry, self.name),
                        expected: claimed.clone(),
                        actual: digest,
                    });
                }
            }
            return Ok(FetchedManifest {
                bytes,
                media_type,
                digest,
            });
        }
    }

    /// The referrers of a manifest from the OCI 1.1 referrers API (an image index), or `None`
    /// when the registry does not offer the API (then the `sha256-<hex>` tag schema applies).
    pub async fn referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<Bytes>> {
        let mut url = self.url("referrers", &subject.to_string())?;
        if let Some(artifact_type) = artifact_type {
            url.query_pairs_mut()
                .append_pair("artifactType", artifact_type);
        }
        let what = format!(
            "GET referrers of {subject} in {}/{}",
            self.registry, self.name
        );
        let request = Request::new(Method::GET, url, Access::Pull, what.clone())
            .header(ACCEPT, media_type::OCI_INDEX);
        let mut attempts = Attempts::new(self.client.retry_policy());
        let response = match self.send(&request, &mut attempts).await {
            Ok(response) => response,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let is_index = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(media_type::OCI_INDEX));
        if !is_index {
            // Some registries answer unknown routes with 200 and a web page.
            return Ok(None);
        }
        match read_limited(response, MANIFEST_SIZE_LIMIT).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(ReadError::TooLarge) => Err(Error::TooLarge {
                what,
                limit: MANIFEST_SIZE_LIMIT,
            }),
            Err(ReadError::Transport(detail)) => Err(Error::Transport {
                request: what,
                detail,
            }),
        }
    }

    /// Uploads a manifest under `reference` (a tag or its digest) and returns its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        let digest = Digest::sha256(&bytes);
        let what = format!("PUT manifest {}/{}:{reference}", self.registry, self.name);
        let mut request = Request::new(
            Method::PUT,
            self.url("manifests", reference)?,
            Access::Push,
            what.clone(),
        )
        .header(CONTENT_TYPE, media_type);
        request.body = Some(Body::Bytes(bytes));
        let mut attempts = Attempts::new(self.client.retry_policy());
        let response = self.send(&request, &mut attempts).await?;
        if let Some(stated) = response
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            && stated != digest.to_string()
        {
            return Err(Error::Protocol {
                request: what,
                detail: format!("the registry stored it as {stated}, not {digest}"),
            });
        }
        Ok(digest)
    }
}

pub(crate) enum ReadError {
    TooLarge,
    Transport(String),
}

/// Reads a response body into memory, refusing more than `limit` bytes.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: u64,
) -> Result<Bytes, ReadError> {
    let mut buffer = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buffer.len() as u64 + chunk.len() as u64 > limit {
                    return Err(ReadError::TooLarge);
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buffer.freeze()),
            Err(e) => return Err(ReadError::Transport(error_chain(&e))),
        }
    }
}

impl ManifestSource for Repository {
    async fn fetch_manifest(&self, reference: ManifestRef<'_>) -> Result<FetchedManifest> {
        match reference {
            ManifestRef::Digest(digest) => self.get_manifest(&digest.to_string()).await,
            ManifestRef::Tag(tag) => self.get_manifest(tag.unwrap_or("latest")).await,
        }
    }

    async fn fetch_small_blob(&self, descriptor: &BlobDescriptor, limit: u64) -> Result<Bytes> {
        let what = format!(
            "blob {} of {}/{}",
            descriptor.digest, self.registry, self.name
        );
        if descriptor.size > limit {
            return Err(Error::TooLarge { what, limit });
        }
        collect_blob(self.open_blob(descriptor).await?, &what, limit).await
    }
}
