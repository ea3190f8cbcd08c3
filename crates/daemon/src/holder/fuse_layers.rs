//! The holder's FUSE mounts. Lazy layers in FUSE mode are mounted and served by the holder, not
//! the worker: a FUSE connection ends when the process serving it dies, so it lives in the
//! process that must not die. Names and attributes come from the index; an open of a file whose
//! data is not local is relayed to the worker as a fill request, like a fanotify event, so it
//! waits across worker restarts and is handed to the next worker. The worker asks for a layer's
//! mount ([`crate::relay::ToHolder::MountFuse`]) when it takes the layer up. A layer's mount is
//! taken down once the layer is detached and no overlay uses it (new overlays take the layer
//! directory).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lazylayer_fuse::{Errno, FuseMount, FuseStats, LayerContent, LayerFs};
use lazylayer_index::{EntryKind, LayerIndex};
use lazylayer_source::Digest;
use lazylayer_store::{FrontendMode, LayerTree, Phase, Store};

use crate::holder::pending::Relay;
use crate::relay::Verdict;

/// The FUSE filesystem of the magic number `statfs` reports.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Whether a FUSE filesystem is mounted at `path`.
pub fn is_fuse_mount(path: &std::path::Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC)
}

/// A layer as the holder serves it: index, directory, and fills relayed to the worker.
struct RelayedContent {
    store: Store,
    digest: Digest,
    index: LayerIndex,
    tree: LayerTree,
    relay: Arc<Relay>,
    detached: AtomicBool,
}

impl LayerContent for RelayedContent {
    fn index(&self) -> &LayerIndex {
        &self.index
    }

    fn tree(&self) -> &LayerTree {
        &self.tree
    }

    fn fill(&self, i: usize) -> Result<(), Errno> {
        let entry = &self.index.entries[i];
        if entry.kind != EntryKind::File || entry.stored_size() == 0 {
            return Ok(());
        }
        if self.detached.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.store.phase(&self.digest).ok().flatten() == Some(Phase::Detached) {
            self.detached.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let inode = self.tree.inode(&entry.path).map_err(|e| {
            tracing::warn!("{}: {e}", self.tree.path_of(&entry.path).display());
            Errno::EIO
        })?;
        match self.relay.request_fill(inode) {
            Verdict::Allow => Ok(()),
            Verdict::Deny(_) => Err(Errno::EIO),
        }
    }
}

/// The FUSE mounts the holder serves.
pub struct FuseLayers {
    store: Store,
    relay: Arc<Relay>,
    mounts: Mutex<HashMap<Digest, FuseMount>>,
    /// Held while a layer is being mounted: two requests for one layer mount it once.
    mounting: Mutex<()>,
}

impl FuseLayers {
    /// No mounts yet.
    pub fn new(store: Store, relay: Arc<Relay>) -> FuseLayers {
        FuseLayers {
            store,
            relay,
            mounts: Mutex::new(HashMap::new()),
            mounting: Mutex::new(()),
        }
    }

    /// Serves the lazy FUSE layer `digest` unless it is served already.
    pub fn ensure_mounted(&self, digest: &str) -> Result<(), String> {
        let _mounting = self.mounting.lock().expect("mounting");
        let digest: Digest = digest.parse().map_err(|e| format!("{digest}: {e}"))?;
        if self.mounts.lock().expect("mounts").contains_key(&digest) {
            return Ok(());
        }
        match self.store.phase(&digest).map_err(|e| e.to_string())? {
            Some(Phase::Lazy) => {}
            other => return Err(format!("layer {digest} is not lazy ({other:?})")),
        }
        if self.store.mode(&digest).map_err(|e| e.to_string())? != FrontendMode::Fuse {
            return Err(format!("layer {digest} is not served with FUSE"));
        }
        let images = self.store.images().map_err(|e| e.to_string())?;
        let blob = images
            .iter()
            .flat_map(|i| &i.layers)
            .find(|l| l.digest == digest)
            .ok_or_else(|| format!("layer {digest} belongs to no pulled image"))?;
        self.mount(blob)
    }

    /// Takes down the mounts of detached layers no overlay uses.
    pub fn scan(&self) {
        let done: Vec<Digest> = self
            .mounts
            .lock()
            .expect("mounts")
            .keys()
            // Only layers known to be detached (or gone): one whose record cannot be read keeps it.
            .filter(|d| matches!(self.store.phase(d), Ok(Some(Phase::Detached) | None)))
            .cloned()
            .collect();
        if !done.is_empty()
            && let Ok(tables) = lazylayer_overlay::MountTables::scan()
        {
            for digest in done {
                if !tables.overlay_uses(&self.store.fuse_mountpoint(&digest)) {
                    tracing::info!("layer {digest}: no overlay uses its FUSE mount; unmounting it");
                    self.mounts.lock().expect("mounts").remove(&digest);
                }
            }
        }
    }

    /// Takes every mount down (the holder is stopping: their connections would die with it
    /// and leave dead mounts behind). A mount an overlay still uses goes once that overlay
    /// does.
    pub fn unmount_all(&self) {
        let mounts: Vec<(Digest, FuseMount)> =
            self.mounts.lock().expect("mounts").drain().collect();
        for (digest, mount) in mounts {
            tracing::info!("layer {digest}: taking its FUSE mount down");
            drop(mount);
        }
    }

    /// READ requests that reached the mounts (zero while every open is passed through).
    pub fn reads(&self) -> u64 {
        self.mounts
            .lock()
            .expect("mounts")
            .values()
            .map(|m| m.stats().reads.load(Ordering::Relaxed))
            .sum()
    }

    /// The layers served now.
    pub fn mounted(&self) -> Vec<Digest> {
        let mut mounted: Vec<Digest> = self
            .mounts
            .lock()
            .expect("mounts")
            .keys()
            .cloned()
            .collect();
        mounted.sort_by_key(|d| d.to_string());
        mounted
    }

    fn mount(&self, blob: &lazylayer_source::BlobDescriptor) -> Result<(), String> {
        let index = self
            .store
            .indexes()
            .get(blob)
            .map_err(|e| e.to_string())?
            .ok_or("lazy but without an index")?;
        let tree =
            LayerTree::open(&self.store.layer_fs(&blob.digest)).map_err(|e| e.to_string())?;
        let content = Arc::new(RelayedContent {
            store: self.store.clone(),
            digest: blob.digest.clone(),
            index,
            tree,
            relay: self.relay.clone(),
            detached: AtomicBool::new(false),
        });
        let stats = Arc::new(FuseStats::default());
        let mountpoint = self.store.fuse_mountpoint(&blob.digest);
        let mount = FuseMount::mount(LayerFs::new(content, stats.clone()), stats, &mountpoint)
            .map_err(|e| format!("mounting with FUSE at {}: {e}", mountpoint.display()))?;
        tracing::info!(
            "layer {}: served with FUSE at {}",
            blob.digest,
            mountpoint.display()
        );
        self.mounts
            .lock()
            .expect("mounts")
            .insert(blob.digest.clone(), mount);
        Ok(())
    }
}
