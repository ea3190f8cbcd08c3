//! A layer whose index proved wrong (it does not match the blob verified end to end): recorded
//! `failed` on disk, so that it is never served or mounted again, and in fanotify mode every
//! one of its regular files is marked again and denied, filled or not, so readers of mounts
//! made before get EIO instead of what the index claimed (while a daemon runs: a worker that
//! starts denies the files of every failed layer it finds).

use std::sync::Arc;

use lazylayer_store::{FrontendMode, Layer};

use crate::worker::Worker;
use crate::worker::lifecycle::{LayerLife, Managed};

impl Worker {
    /// Fails `managed` for good, for `reason`: no longer served, only denied.
    pub(super) async fn fail_for_good(&self, managed: &Arc<Managed>, reason: String) {
        let layer = &managed.layer;
        if let Err(e) = layer.fail(&reason) {
            tracing::error!("layer {}: recording its failure: {e}", layer.digest);
        }
        self.deny_every_file(layer).await;
        managed.become_(LayerLife::Failed(reason));
        // `status` shows it as recorded from now on; a later pull may make it anew.
        self.layers.lock().expect("layers").remove(&layer.digest);
        self.changed.notify_waiters();
    }

    /// Marks every regular file of a failed layer, so that each read is asked about and
    /// denied. FUSE layers are not re-marked: a FUSE file opened before reads through
    /// passthrough, which no daemon sees (new mounts of a failed layer are refused).
    pub(super) async fn deny_every_file(&self, layer: &Arc<Layer>) {
        self.denied
            .lock()
            .expect("denied")
            .insert(layer.digest.clone());
        let mode = layer.mode().unwrap_or_default();
        if mode != FrontendMode::Fanotify {
            return;
        }
        let files = match self.demand.condemn(layer, mode) {
            Ok(files) => files,
            Err(e) => {
                tracing::error!("layer {}: finding its files to deny: {e}", layer.digest);
                return;
            }
        };
        if let Err(e) = self
            .demand
            .frontends()
            .of(mode)
            .take_up(layer, &files)
            .await
        {
            tracing::error!("layer {}: marking its files to deny: {e}", layer.digest);
        }
    }
}
