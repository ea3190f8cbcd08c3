//! Indexes kept on this machine, under `ROOT/indexes/<algorithm>/<layer hex>`: built here or
//! fetched and verified once, keyed by the layer they index (layers are shared between images),
//! each with its origin beside it (`<hex>.origin`), which decides whether `pull` may use it.
//! An index fetched head first is stored with its windows section as a hole, and beside it
//! where they are fetched from (`<hex>.windows`: the registry's index blob and its
//! repository): each window is written into the hole when a read first needs it (see
//! [`LayerIndex::put_window`]).

use std::path::{Path, PathBuf};

use lazylayer_source::{BlobDescriptor, Digest, DigestAlgorithm, DigestHasher};

use crate::distribution::{IndexOrigin, IndexTrust, check_identity};
use crate::format::{IndexHead, LayerIndex, WindowsSource};
use crate::{Error, Result};

/// The local index store.
#[derive(Clone, Debug)]
pub struct IndexStore {
    dir: PathBuf,
}

impl IndexStore {
    /// The store under lazylayer's root directory.
    pub fn new(root: &Path) -> Self {
        IndexStore {
            dir: root.join("indexes"),
        }
    }

    fn path(&self, layer: &BlobDescriptor) -> PathBuf {
        self.dir
            .join(layer.digest.algorithm().name())
            .join(layer.digest.hex())
    }

    /// The stored index of `layer`, if there is one; a damaged or foreign file is an error.
    pub fn get(&self, layer: &BlobDescriptor) -> Result<Option<LayerIndex>> {
        let path = self.path(layer);
        if !path.exists() {
            return Ok(None);
        }
        let mut index = LayerIndex::open(&path)?;
        check_identity(&path.display().to_string(), &index, layer)?;
        let windows_path = self.windows_path(layer);
        match std::fs::read(&windows_path) {
            Ok(bytes) => {
                let source: WindowsSource = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::bad_index(windows_path.display().to_string(), e.to_string())
                })?;
                index.set_windows_source(Some(source));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("reading {}", windows_path.display()), e)),
        }
        Ok(Some(index))
    }

    /// Where the stored index of `layer` is, with its digest and size, if there is one.
    pub fn stored(&self, layer: &BlobDescriptor) -> Result<Option<StoredIndex>> {
        let path = self.path(layer);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let mut hashing = HashingWriter::new(std::io::sink());
        std::io::copy(&mut file, &mut hashing)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let (digest, size) = hashing.finish();
        let head = IndexHead::of_file(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(Some(StoredIndex {
            path,
            digest,
            size,
            head,
        }))
    }

    fn origin_path(&self, layer: &BlobDescriptor) -> PathBuf {
        self.path(layer).with_extension("origin")
    }

    fn windows_path(&self, layer: &BlobDescriptor) -> PathBuf {
        self.path(layer).with_extension("windows")
    }

    /// Where the stored index of `layer` came from. An index whose origin was never recorded
    /// (a store older than origins, or a crash between the two writes) counts as an unbound
    /// referrer: nothing vouches for it.
    pub fn origin(&self, layer: &BlobDescriptor) -> Result<IndexOrigin> {
        let path = self.origin_path(layer);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or(IndexOrigin::Referrer)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IndexOrigin::Referrer),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The stored index of `layer` if there is one and `trust` accepts where it came from.
    pub fn get_trusted(
        &self,
        layer: &BlobDescriptor,
        trust: IndexTrust,
    ) -> Result<Option<(LayerIndex, IndexOrigin)>> {
        let Some(index) = self.get(layer)? else {
            return Ok(None);
        };
        let origin = self.origin(layer)?;
        Ok(trust.accepts(origin).then_some((index, origin)))
    }

    /// Stores the index of `layer`, which came from `origin` (replaced whole: concurrent pulls
    /// of one layer each write a complete file of their own, see `lazylayer_durable`).
    pub fn put(
        &self,
        layer: &BlobDescriptor,
        index: &LayerIndex,
        origin: IndexOrigin,
    ) -> Result<StoredIndex> {
        let path = self.path(layer);
        // The old origin goes first: a crash before the new one is written leaves the index
        // untrusted, never a referrer's index passing as a local one.
        let origin_path = self.origin_path(layer);
        match std::fs::remove_file(&origin_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", origin_path.display()), e)),
        }
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let windows_path = self.windows_path(layer);
        let (digest, size, head) = match index.windows_source() {
            // Fetched head first: the head, a hole for the windows, and where they come from
            // (written first, so that no stored index lacks windows without saying where).
            Some(source) => {
                let head = index.encode_head()?;
                // Window ranges in the blob are relative to its head: this one must be it.
                if index.head_len() != Some(head.len() as u64) {
                    return Err(Error::bad_index(
                        path.display().to_string(),
                        "its head changed since it was fetched: its windows would not fit",
                    ));
                }
                lazylayer_durable::write(
                    &windows_path,
                    &serde_json::to_vec(source).expect("a windows source serialises"),
                )
                .map_err(|e| Error::io(format!("writing {}", windows_path.display()), e))?;
                let size = head.len() as u64 + index.windows_len();
                lazylayer_durable::write_sized(&path, &head, size)
                    .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                let head = IndexHead {
                    size: head.len() as u64,
                    digest: Digest::sha256(&head),
                };
                (source.blob.clone(), size, Some(head))
            }
            None => {
                let mut encoded = HashingWriter::new(Vec::new());
                index.encode_to(&mut encoded)?;
                let bytes = std::mem::take(&mut encoded.inner);
                let (digest, size) = encoded.finish();
                lazylayer_durable::write(&path, &bytes)
                    .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                let head = IndexHead::of(&bytes);
                match std::fs::remove_file(&windows_path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::io(format!("removing {}", windows_path.display()), e));
                    }
                }
                (digest, size, head)
            }
        };
        lazylayer_durable::write(
            &origin_path,
            &serde_json::to_vec(&origin).expect("an origin serialises"),
        )
        .map_err(|e| Error::io(format!("writing {}", origin_path.display()), e))?;
        Ok(StoredIndex {
            path,
            digest,
            size,
            head,
        })
    }
}

/// An index file in the store.
#[derive(Clone, Debug)]
pub struct StoredIndex {
    /// The file.
    pub path: PathBuf,
    /// Its digest (what a registry names it by).
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its head, if it can be fetched head first (see [`IndexHead`]).
    pub head: Option<IndexHead>,
}

/// Counts and hashes what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: DigestHasher,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: DigestHasher::new(DigestAlgorithm::Sha256),
        }
    }

    fn finish(self) -> (Digest, u64) {
        let len = self.hasher.len();
        (self.hasher.finish(), len)
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
