//! Indexes kept on this machine, under `ROOT/indexes/<algorithm>/<layer hex>`: built here or
//! fetched and verified once, keyed by the layer they index (layers are shared between images).

use std::path::{Path, PathBuf};

use lazylayer_source::BlobDescriptor;

use crate::distribution::check_identity;
use crate::format::LayerIndex;
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
        let index = LayerIndex::open(&path)?;
        check_identity(&path.display().to_string(), &index, layer)?;
        Ok(Some(index))
    }

    /// The encoded bytes of the stored index of `layer`, if any.
    pub fn get_encoded(&self, layer: &BlobDescriptor) -> Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(layer)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(
                format!("reading {}", self.path(layer).display()),
                e,
            )),
        }
    }

    /// Stores an encoded index of `layer` (atomically: written aside, then renamed).
    pub fn put(&self, layer: &BlobDescriptor, encoded: &[u8]) -> Result<PathBuf> {
        let path = self.path(layer);
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, encoded)
            .and_then(|_| std::fs::File::open(&temporary)?.sync_all())
            .and_then(|_| std::fs::rename(&temporary, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }
}
