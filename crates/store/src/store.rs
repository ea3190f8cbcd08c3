//! The store under `--root`: where each layer's directory, record and population state live,
//! the span cache, the indexes, image records and mounts.
//!
//! ```text
//! ROOT/layers/sha256/<hex>/fs          the layer directory (an overlay lower)
//! ROOT/layers/sha256/<hex>/record      phase (creating | lazy | detached)
//! ROOT/layers/sha256/<hex>/populated   one byte per index entry: data durable
//! ROOT/layers/sha256/<hex>/lock        held by the pull setting the layer up
//! ROOT/spans/                          verified compressed spans (until detach)
//! ROOT/indexes/sha256/<hex>            lazy indexes
//! ROOT/images/<manifest hex>.json      image records (reference, layers)
//! ROOT/mounts/<name>/{upper,work}      writable layers of mounts
//! ROOT/run/<id>/                       containers of `lazylayer run`
//! ROOT/fuse/<hex>                      FUSE mounts of lazy layers in FUSE mode
//! ROOT/keepers/<pid>.sock              processes holding the fanotify group for the next daemon
//! ROOT/lazylayer.sock, serve.lock, serve.log   the daemon's socket, lock and log
//! ```

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazylayer_index::distribution::IndexOrigin;
use lazylayer_index::{IndexStore, LayerIndex};
use lazylayer_source::{BlobDescriptor, Digest, ImageSource};
use serde::{Deserialize, Serialize};

use crate::layer::Layer;
use crate::state::{FrontendMode, LayerRecord, Phase};
use crate::tree::LayerTree;
use crate::{Error, Result};

/// A layer's population: regular files with data, and bytes of it, in all and in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Regular files with data.
    pub files: usize,
    /// Of those, how many hold their data.
    pub files_populated: usize,
    /// Bytes of file data.
    pub bytes: u64,
    /// Of those, how many are in place.
    pub bytes_populated: u64,
    /// Compressed bytes fetched, as recorded with the layer's last phase change.
    pub bytes_fetched: u64,
}

/// What the store remembers about a pulled image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was pulled as.
    pub reference: String,
    /// The image manifest digest.
    pub manifest: Digest,
    /// The layers, bottom first.
    pub layers: Vec<BlobDescriptor>,
    /// The image config (for running it).
    pub config: serde_json::Value,
}

/// The directories under the root, each private to root (see [`Store::make_private`]).
const PRIVATE_DIRS: [&str; 12] = [
    "layers",
    "spans",
    "indexes",
    "images",
    "profiles",
    "mounts",
    "run",
    "fuse",
    "trash",
    "keepers",
    "snapshotter",
    "layerstore",
];

/// The right to set up one layer, from [`Store::lock_layer`].
#[derive(Debug)]
pub struct LayerLock {
    _file: std::fs::File,
}

/// The layer store.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// The root through a private clone of its mount, once [`fill_through`](Self::fill_through)
    /// gave one: layers opened for population are reached through it.
    private_root: Option<Arc<OwnedFd>>,
}

impl Store {
    /// The store under `root`.
    pub fn new(root: &Path) -> Self {
        Store {
            root: root.to_path_buf(),
            private_root: None,
        }
    }

    /// The root, opened on a private clone of the mount it is on (`open_tree` with
    /// `OPEN_TREE_CLONE`): a mount that only the holder of this descriptor reaches. The
    /// daemon fills placeholders through it, with a fanotify ignore mark on it, so that its
    /// own writes raise no event (`Group::ignore_mount`).
    pub fn private_mount(&self) -> Result<OwnedFd> {
        use rustix::mount::OpenTreeFlags;
        let clone = rustix::mount::open_tree(
            rustix::fs::CWD,
            &self.root,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .map_err(|e| Error::sys(format!("cloning the mount of {}", self.root.display()), e))?;
        // The clone's descriptor is O_PATH, which a mark cannot take: its root opened as a
        // directory (which keeps the clone alive after `clone` is closed).
        rustix::fs::openat(
            &clone,
            ".",
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::sys(format!("opening the clone of {}", self.root.display()), e))
    }

    /// Layers opened for population from now on ([`open_layer`](Self::open_layer)) are
    /// reached through `root`, from [`private_mount`](Self::private_mount).
    pub fn fill_through(&mut self, root: OwnedFd) {
        self.private_root = Some(Arc::new(root));
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root (mode 0711, as containerd keeps its own) and the directories under it
    /// (mode 0700), or gives existing ones these modes: what the store holds (file lists,
    /// image configs, span caches with every byte of the layers) is for root only, whatever
    /// the umask of the command that made it.
    pub fn make_private(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let set = |dir: &Path, mode: u32| -> Result<()> {
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
        };
        set(&self.root, 0o711)?;
        for dir in PRIVATE_DIRS {
            set(&self.root.join(dir), 0o700)?;
        }
        Ok(())
    }

    fn layer_dir(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("layers")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// The directory of a layer (the overlay lower).
    pub fn layer_fs(&self, digest: &Digest) -> PathBuf {
        self.layer_dir(digest).join("fs")
    }

    /// The span cache directory.
    pub fn span_dir(&self) -> PathBuf {
        self.root.join("spans")
    }

    /// The index store.
    pub fn indexes(&self) -> IndexStore {
        IndexStore::new(&self.root)
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("lazylayer.sock")
    }

    /// Where the prefetch profile of an image (by manifest digest) is kept.
    pub fn profile_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("profiles")
            .join(format!("{}.json", manifest.hex()))
    }

    /// Where mounts keep their writable layers.
    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mounts")
    }

    /// Where `lazylayer run` keeps each container's run directory.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Where keepers of the fanotify group offer it to the next daemon.
    pub fn keepers_dir(&self) -> PathBuf {
        self.root.join("keepers")
    }

    /// The daemon's lock: one daemon per store.
    pub fn serve_lock(&self) -> PathBuf {
        self.root.join("serve.lock")
    }

    /// The log of a daemon started on demand.
    pub fn serve_log(&self) -> PathBuf {
        self.root.join("serve.log")
    }

    /// Where lazy FUSE layers are mounted.
    pub fn fuse_dir(&self) -> PathBuf {
        self.root.join("fuse")
    }

    /// Where a layer served through FUSE is mounted while lazy.
    pub fn fuse_mountpoint(&self, digest: &Digest) -> PathBuf {
        self.fuse_dir().join(digest.hex())
    }

    /// How a layer is served while lazy (fanotify for a layer the store does not have).
    pub fn mode(&self, digest: &Digest) -> Result<FrontendMode> {
        Ok(LayerRecord::load(&self.layer_dir(digest).join("record"))?
            .map(|r| r.mode)
            .unwrap_or_default())
    }

    /// The directory a new overlay mount takes as this layer's lower: the FUSE mount of a lazy
    /// FUSE layer, else the layer directory itself (a detached layer never needs the daemon).
    pub fn lower_dir(&self, digest: &Digest) -> Result<PathBuf> {
        let record = LayerRecord::load(&self.layer_dir(digest).join("record"))?;
        Ok(match record {
            Some(r) if r.phase == Phase::Lazy && r.mode == FrontendMode::Fuse => {
                self.fuse_mountpoint(digest)
            }
            _ => self.layer_fs(digest),
        })
    }

    /// The overlay lower directories of `image`, top layer first (see [`Store::lower_dir`]).
    pub fn overlay_lowers(&self, image: &ImageRecord) -> Result<Vec<PathBuf>> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| self.lower_dir(&l.digest))
            .collect()
    }

    /// The phase of a layer, if the store has it.
    pub fn phase(&self, digest: &Digest) -> Result<Option<Phase>> {
        Ok(LayerRecord::load(&self.layer_dir(digest).join("record"))?.map(|r| r.phase))
    }

    /// Why a layer failed, if it did ([`Phase::Failed`]).
    pub fn failure(&self, digest: &Digest) -> Result<Option<String>> {
        Ok(
            LayerRecord::load(&self.layer_dir(digest).join("record"))?.and_then(|r| {
                (r.phase == Phase::Failed)
                    .then(|| r.failure.unwrap_or_else(|| "no reason recorded".into()))
            }),
        )
    }

    /// Refuses an image any of whose layers failed, saying which and what to do.
    pub fn check_not_failed(&self, image: &ImageRecord) -> Result<()> {
        for layer in &image.layers {
            if let Some(reason) = self.failure(&layer.digest)? {
                return Err(Error::LayerFailed {
                    image: image.reference.clone(),
                    layer: layer.digest.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Waits for, then holds, the right to set up the layer `digest` (fetch or build its index,
    /// create its tree): concurrent pulls of images sharing a layer take turns, and the later
    /// ones find it ready instead of making it again. Released when dropped (or by the kernel
    /// when the holder dies, so a crash never leaves it locked).
    pub fn lock_layer(&self, digest: &Digest) -> Result<LayerLock> {
        let dir = self.layer_dir(digest);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let file = lock_file(&dir.join("lock"), rustix::fs::FlockOperation::LockExclusive)?;
        Ok(LayerLock { _file: file })
    }

    /// Creates the layer's directory from its index, unless it exists already: placeholders
    /// for every entry, directory times last, then the record says `lazy`. A tree left
    /// half-made by a crash is removed and made again. The tree is not synced here (the
    /// daemon does it when it takes the layer up): until then the record names this boot,
    /// and after a machine crash the tree counts as half-made (see
    /// [`LayerRecord::unsynced_in_boot`]).
    pub fn prepare_layer(&self, index: &LayerIndex, mode: FrontendMode) -> Result<Phase> {
        let dir = self.layer_dir(&index.blob_digest);
        let record_path = dir.join("record");
        match LayerRecord::load(&record_path)? {
            Some(record) if record.phase != Phase::Creating => return Ok(record.phase),
            Some(_) => {
                std::fs::remove_dir_all(dir.join("fs"))
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| Error::io(format!("removing a half-made {}", dir.display()), e))?;
                let _ = std::fs::remove_file(dir.join("populated"));
            }
            None => {}
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let record = |phase, unsynced_in_boot: Option<&str>| LayerRecord {
            phase,
            entries: index.entries.len(),
            mode,
            bytes_fetched: 0,
            failure: None,
            unsynced_in_boot: unsynced_in_boot.map(str::to_string),
        };
        record(Phase::Creating, None).save(&record_path)?;
        let tree = LayerTree::open(&dir.join("fs"))?;
        tree.create_all(&index.entries)?;
        tree.set_dir_times(index.entries.iter())?;
        match crate::state::current_boot() {
            Some(boot) => record(Phase::Lazy, Some(boot)).save(&record_path)?,
            None => {
                // No way to tell a later boot from this one: durable first.
                tree.sync()?;
                record(Phase::Lazy, None).save(&record_path)?;
            }
        }
        Ok(Phase::Lazy)
    }

    /// Adds `bytes` to the bytes fetched for the prepared layer `digest` (what a pull fetched
    /// to index it: `status` counts every byte the registry served).
    pub fn count_fetched(&self, digest: &Digest, bytes: u64) -> Result<()> {
        let path = self.layer_dir(digest).join("record");
        let Some(mut record) = LayerRecord::load(&path)? else {
            return Err(Error::Corrupt(format!("{} has no record", path.display())));
        };
        record.bytes_fetched += bytes;
        record.save(&path)
    }

    /// Opens a prepared layer for population, reading from `source`.
    /// A layer whose index nobody vouches for (an unbound referrer) has each file's tar
    /// headers checked against its entry before the file's data is written.
    pub fn open_layer(&self, index: Arc<LayerIndex>, source: ImageSource) -> Result<Layer> {
        let dir = self.layer_dir(&index.blob_digest);
        let fs = dir.join("fs");
        let private = match &self.private_root {
            Some(root) => LayerTree::open_through(root, &self.root, &fs).unwrap_or_else(|e| {
                tracing::debug!("{e}: filling {} through its path", fs.display());
                None
            }),
            None => None,
        };
        let tree = match private {
            Some(tree) => tree,
            None => LayerTree::open(&fs)?,
        };
        let blob = BlobDescriptor {
            digest: index.blob_digest.clone(),
            media_type: index.media_type.clone(),
            size: index.blob_size,
        };
        let unvouched = self.indexes().origin(&blob)? == IndexOrigin::Referrer;
        Layer::new(
            index.blob_digest.clone(),
            index.clone(),
            tree,
            &dir.join("populated"),
            &dir.join("record"),
            source,
            &self.span_dir(),
            unvouched,
        )
    }

    /// How far a layer's population got, as persisted on disk (what survives the daemon: files
    /// filled since its last persist are not counted). `None` for a layer without an index.
    pub fn persisted_progress(&self, blob: &BlobDescriptor) -> Result<Option<Progress>> {
        let Some(index) = self.indexes().get(blob)? else {
            return Ok(None);
        };
        let record = LayerRecord::load(&self.layer_dir(&blob.digest).join("record"))?;
        let detached = record.as_ref().is_some_and(|r| r.phase == Phase::Detached);
        let populated = std::fs::read(self.layer_dir(&blob.digest).join("populated"))
            .ok()
            .filter(|bytes| bytes.len() == index.entries.len())
            .unwrap_or_default();
        let mut progress = Progress {
            bytes_fetched: record.map_or(0, |r| r.bytes_fetched),
            ..Progress::default()
        };
        for (i, entry) in index.entries.iter().enumerate() {
            if entry.kind != lazylayer_index::EntryKind::File || entry.stored_size() == 0 {
                continue;
            }
            progress.files += 1;
            progress.bytes += entry.stored_size();
            if detached || populated.get(i) == Some(&1) {
                progress.files_populated += 1;
                progress.bytes_populated += entry.stored_size();
            }
        }
        Ok(Some(progress))
    }

    /// Removes a layer's span cache (after detach: the data is in the layer directory).
    pub fn drop_spans(&self, digest: &Digest) {
        for suffix in ["spans", "present"] {
            let _ =
                std::fs::remove_file(self.span_dir().join(format!("{}.{suffix}", digest.hex())));
        }
    }

    /// Saves an image record.
    pub fn save_image(&self, image: &ImageRecord) -> Result<()> {
        let dir = self.root.join("images");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(format!("{}.json", image.manifest.hex()));
        let bytes = serde_json::to_vec_pretty(image).expect("image record serialises");
        lazylayer_durable::write(&path, &bytes)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// The lazy layers of the pulled images (what a daemon is needed for), each once.
    pub fn lazy_image_layers(&self) -> Result<Vec<Digest>> {
        let mut lazy = Vec::new();
        for image in self.images()? {
            for layer in image.layers {
                if !lazy.contains(&layer.digest) && self.phase(&layer.digest)? == Some(Phase::Lazy)
                {
                    lazy.push(layer.digest);
                }
            }
        }
        Ok(lazy)
    }

    /// The record of the image `manifest`, if the store has it.
    pub fn image(&self, manifest: &Digest) -> Result<Option<ImageRecord>> {
        let path = self
            .root
            .join("images")
            .join(format!("{}.json", manifest.hex()));
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
    }

    /// Every image record.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("images");
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut images = Vec::new();
        for item in listing {
            let path = item.map_err(|e| Error::io("listing images", e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = std::fs::read(&path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                images.push(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?,
                );
            }
        }
        images.sort_by(|a: &ImageRecord, b| a.reference.cmp(&b.reference));
        Ok(images)
    }
}

/// Opens (creating it) the lock file at `path` and locks it as `operation` says, waiting.
pub(crate) fn lock_file(
    path: &Path,
    operation: rustix::fs::FlockOperation,
) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    rustix::fs::flock(&file, operation)
        .map_err(|e| Error::sys(format!("locking {}", path.display()), e))?;
    Ok(file)
}
