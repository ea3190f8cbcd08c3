//! OCI image layouts on disk (`oci:DIR[:tag]`): `oci-layout`, `index.json` and
//! `blobs/<algorithm>/<hex>`, as written by umoci, skopeo and buildah.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::ImageIndex;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::blob::{BlobStream, BlobVerifier, collect_blob, verified};
use crate::manifest::{
    BlobDescriptor, FetchedManifest, MANIFEST_SIZE_LIMIT, ManifestRef, ManifestSource,
    ResolvedImage, ResolvedManifest, resolve_manifest, with_config,
};
use crate::platform::PlatformChoice;
use crate::reference::LayoutReference;
use crate::{Digest, Error, Result};

/// The annotation that names an image in a layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory, opened for reading.
#[derive(Clone, Debug)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens `dir`, checking that it is an OCI layout.
    pub fn open(dir: &Path) -> Result<Self> {
        let marker = dir.join("oci-layout");
        let text = std::fs::read(&marker).map_err(|e| {
            Error::io(
                format!(
                    "{} is not an OCI image layout (no oci-layout file)",
                    dir.display()
                ),
                e,
            )
        })?;
        #[derive(serde::Deserialize)]
        struct Marker {
            #[serde(rename = "imageLayoutVersion")]
            version: String,
        }
        let marker: Marker = serde_json::from_slice(&text)
            .map_err(|e| Error::malformed(marker.display().to_string(), e))?;
        if !marker.version.starts_with("1.") {
            return Err(Error::malformed(
                dir.join("oci-layout").display().to_string(),
                format!("unsupported imageLayoutVersion {}", marker.version),
            ));
        }
        Ok(OciLayout {
            dir: dir.to_path_buf(),
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob. Digests are validated hex, so this cannot leave `blobs/`.
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn read_index(&self) -> Result<ImageIndex> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
        if bytes.len() as u64 > MANIFEST_SIZE_LIMIT {
            return Err(Error::TooLarge {
                what: path.display().to_string(),
                limit: MANIFEST_SIZE_LIMIT,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::malformed(path.display().to_string(), e))
    }

    /// The tags of the images in the layout.
    pub fn tags(&self) -> Result<Vec<String>> {
        let index = self.read_index()?;
        Ok(index
            .manifests()
            .iter()
            .filter_map(|m| m.annotations().as_ref()?.get(REF_NAME_ANNOTATION).cloned())
            .collect())
    }

    /// Resolves the image `reference` names to one platform's manifest, config and layers.
    pub async fn resolve(
        &self,
        reference: &LayoutReference,
        choice: &PlatformChoice,
    ) -> Result<ResolvedImage> {
        let manifest = self.resolve_manifest(reference, choice, &[]).await?;
        with_config(self, manifest, choice).await
    }

    /// Resolves `reference` to one platform's manifest, fetching the manifests of its
    /// companions of `companion_types` alongside (see [`ResolvedManifest`]).
    pub async fn resolve_manifest(
        &self,
        reference: &LayoutReference,
        choice: &PlatformChoice,
        companion_types: &[&str],
    ) -> Result<ResolvedManifest> {
        let display = reference.to_string();
        let top = match &reference.digest {
            Some(digest) => ManifestRef::Digest(digest),
            None => ManifestRef::Tag(reference.tag.as_deref()),
        };
        resolve_manifest(self, &display, top, choice, companion_types).await
    }

    /// Streams a blob, verified against its descriptor.
    pub async fn open_blob(&self, descriptor: &BlobDescriptor) -> Result<BlobStream> {
        let path = self.blob_path(&descriptor.digest);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| blob_open_error(&path, &descriptor.digest, e))?;
        let what = path.display().to_string();
        let chunks = ReaderStream::with_capacity(file, 256 << 10)
            .map(move |chunk| chunk.map_err(|e| Error::io(what.clone(), e)));
        let verifier = BlobVerifier::new(
            format!("blob {} in {}", descriptor.digest, self.dir.display()),
            descriptor,
        );
        Ok(verified(chunks, verifier))
    }

    /// Reads bytes `range` of a blob. Not verified here: callers check them against span
    /// digests from a lazy index.
    pub async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes> {
        let path = self.blob_path(digest);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| blob_open_error(&path, digest, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Error::io(path.display().to_string(), e))?
            .len();
        if range.end > size || range.start > range.end {
            return Err(Error::Protocol {
                request: format!("read {}..{} of {}", range.start, range.end, path.display()),
                detail: format!("outside the blob ({size} bytes)"),
            });
        }
        file.seek(SeekFrom::Start(range.start))
            .await
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        let mut buffer = vec![0; (range.end - range.start) as usize];
        file.read_exact(&mut buffer)
            .await
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok(Bytes::from(buffer))
    }
}

fn blob_open_error(path: &Path, digest: &Digest, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound {
            what: format!("blob {digest} ({})", path.display()),
        }
    } else {
        Error::io(path.display().to_string(), e)
    }
}

impl ManifestSource for OciLayout {
    async fn fetch_manifest(&self, reference: ManifestRef<'_>) -> Result<FetchedManifest> {
        let descriptor = match reference {
            ManifestRef::Digest(digest) => {
                let path = self.blob_path(digest);
                let size = std::fs::metadata(&path)
                    .map_err(|e| blob_open_error(&path, digest, e))?
                    .len();
                BlobDescriptor {
                    digest: digest.clone(),
                    media_type: String::new(),
                    size,
                }
            }
            ManifestRef::Tag(tag) => self.descriptor_for_tag(tag)?,
        };
        if descriptor.size > MANIFEST_SIZE_LIMIT {
            return Err(Error::TooLarge {
                what: format!("manifest {}", descriptor.digest),
                limit: MANIFEST_SIZE_LIMIT,
            });
        }
        let what = format!("manifest {} in {}", descriptor.digest, self.dir.display());
        let bytes = collect_blob(
            self.open_blob(&descriptor).await?,
            &what,
            MANIFEST_SIZE_LIMIT,
        )
        .await?;
        Ok(FetchedManifest {
            bytes,
            media_type: descriptor.media_type,
            digest: descriptor.digest,
        })
    }

    async fn fetch_small_blob(&self, descriptor: &BlobDescriptor, limit: u64) -> Result<Bytes> {
        let what = format!("blob {} in {}", descriptor.digest, self.dir.display());
        if descriptor.size > limit {
            return Err(Error::TooLarge { what, limit });
        }
        collect_blob(self.open_blob(descriptor).await?, &what, limit).await
    }
}

impl OciLayout {
    /// The `index.json` entry for `tag`, or the only entry when no tag is given.
    fn descriptor_for_tag(&self, tag: Option<&str>) -> Result<BlobDescriptor> {
        let index = self.read_index()?;
        let what = format!("{}/index.json", self.dir.display());
        let tag_of = |m: &oci_spec::image::Descriptor| {
            m.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION).cloned())
        };
        let tags: Vec<String> = index.manifests().iter().filter_map(tag_of).collect();
        let entry = match tag {
            Some(tag) => index
                .manifests()
                .iter()
                .find(|m| tag_of(m).as_deref() == Some(tag))
                .ok_or_else(|| Error::NotFound {
                    what: format!(
                        "tag {tag:?} in OCI layout {} (tags: {})",
                        self.dir.display(),
                        if tags.is_empty() {
                            "none".to_string()
                        } else {
                            tags.join(", ")
                        }
                    ),
                })?,
            None => match index.manifests().as_slice() {
                [only] => only,
                [] => {
                    return Err(Error::NotFound {
                        what: format!("any image in OCI layout {}", self.dir.display()),
                    });
                }
                _ => {
                    return Err(Error::InvalidReference {
                        input: format!("oci:{}", self.dir.display()),
                        reason: format!(
                            "the layout holds {} images; name one as oci:DIR:TAG (tags: {})",
                            index.manifests().len(),
                            tags.join(", ")
                        ),
                    });
                }
            },
        };
        let digest: Digest = entry
            .digest()
            .to_string()
            .parse()
            .map_err(|e: Error| Error::malformed(what.clone(), e))?;
        Ok(BlobDescriptor {
            digest,
            media_type: entry.media_type().to_string(),
            size: entry.size(),
        })
    }
}
