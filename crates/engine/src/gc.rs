//! Garbage collection over the store: what no image references and nothing uses goes (see
//! `lazylayer_store::gc`); this decides what is in use, from the mount tables and the daemon.

use lazylayer_daemon::{Request, client};
use lazylayer_overlay::MountTables;
use lazylayer_store::{GcReport, InUse, Phase, Store};

use crate::{Engine, Error, Result};

impl Engine {
    /// Removes the layers, indexes, span caches, profiles and mount directories that no image
    /// record references and no mount (in any mount namespace) or lazy daemon layer uses;
    /// with `dry_run`, only reports them.
    pub async fn collect_garbage(&self, dry_run: bool) -> Result<GcReport> {
        let store = &self.store;
        let lock = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.lock_for_gc())
                .await
                .map_err(|e| Error::io("locking the store", std::io::Error::other(e)))??
        };
        crate::clean_stale_runs(store);
        let in_use = in_use(store).await?;
        let report = store.collect_garbage(&in_use, dry_run)?;
        drop(lock);
        Ok(report)
    }
}

/// What a collection must keep although no image references it.
async fn in_use(store: &Store) -> Result<InUse> {
    let tables =
        MountTables::scan().map_err(|e| Error::io("reading the mount tables under /proc", e))?;
    let mut in_use = InUse::default();
    for digest in store.layer_digests()? {
        if tables.uses(&store.layer_fs(&digest)) || tables.uses(&store.fuse_mountpoint(&digest)) {
            in_use
                .layers
                .insert(digest, "an overlay mount still uses it".to_string());
        }
    }
    if let Ok(listing) = std::fs::read_dir(store.mounts_dir()) {
        for dir in listing.flatten().map(|e| e.path()) {
            if tables.uses(&dir.join("upper")) {
                in_use.mount_dirs.insert(dir);
            }
        }
    }
    if let Ok(response) = client::request(&store.socket(), &Request::Status).await
        && let Some(status) = response.status
    {
        for layer in status.layers.into_iter().filter(|l| l.phase == Phase::Lazy) {
            in_use.layers.entry(layer.digest).or_insert_with(|| {
                "the daemon is still filling it (collect again once it has detached)".to_string()
            });
        }
    }
    Ok(in_use)
}
