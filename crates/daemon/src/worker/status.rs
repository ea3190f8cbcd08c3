//! What `status` shows: every layer of the pulled images, live for the layers this worker
//! serves, as persisted for the others; the FUSE counters come from the holder.

use std::collections::HashSet;

use lazylayer_index::EntryKind;
use lazylayer_source::Digest;
use lazylayer_store::{Layer, Phase};

use crate::protocol::{DaemonStatus, LayerState, LayerStatus};
use crate::relay::{ToHolder, ToWorker};
use crate::worker::Worker;
use crate::worker::lifecycle::{LayerLife, Managed};

impl Worker {
    /// The daemon and every layer; a store that cannot be read is an error, not an empty list.
    pub(super) async fn status(&self) -> Result<DaemonStatus, String> {
        let managed = self.layers.lock().expect("layers").clone();
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        for image in self.store.images().map_err(|e| e.to_string())? {
            for blob in &image.layers {
                if !seen.insert(blob.digest.clone()) {
                    continue;
                }
                let phase = self
                    .store
                    .phase(&blob.digest)
                    .map_err(|e| e.to_string())?
                    .unwrap_or(Phase::Creating);
                let status = match managed.get(&blob.digest) {
                    Some(m) => live_status(m, phase),
                    None => {
                        let progress = self
                            .store
                            .persisted_progress(blob)
                            .map_err(|e| e.to_string())?
                            .unwrap_or_default();
                        let mode = self.store.mode(&blob.digest).map_err(|e| e.to_string())?;
                        let failure = self
                            .store
                            .failure(&blob.digest)
                            .map_err(|e| e.to_string())?;
                        LayerStatus::persisted(blob.digest.clone(), phase, mode, progress, failure)
                    }
                };
                layers.push(status);
            }
        }
        // Layers still being filled for images forgotten since (garbage collection keeps them).
        for (digest, m) in &managed {
            if seen.insert(digest.clone()) {
                layers.push(live_status(m, Phase::Lazy));
            }
        }
        let (fuse_reads, fuse_mounts) = self.fuse_state().await;
        Ok(DaemonStatus {
            fuse_mounts,
            fuse_reads,
            pid: self.holder_pid,
            worker_pid: std::process::id(),
            marked_files: self.demand.unfilled(),
            demanded_files: self.demand.demanded_since(0).1,
            layers,
        })
    }

    /// The holder's FUSE counters and mounts; with no holder to ask, what the kernel shows.
    async fn fuse_state(&self) -> (u64, Vec<Digest>) {
        match self
            .link
            .request(|request| ToHolder::QueryFuse { request })
            .await
        {
            Ok(ToWorker::FuseState { reads, mounted, .. }) => {
                let mounted = mounted.iter().filter_map(|d| d.parse().ok()).collect();
                (reads, mounted)
            }
            Ok(other) => {
                tracing::warn!("the holder answered a FUSE query with {other:?}");
                (0, self.fuse_mounted())
            }
            Err(e) => {
                tracing::debug!("asking the holder about FUSE: {e}");
                (0, self.fuse_mounted())
            }
        }
    }
}

/// A layer this worker serves: counted from its population state in memory.
fn live_status(managed: &Managed, phase: Phase) -> LayerStatus {
    let layer: &Layer = &managed.layer;
    let mut files = 0;
    let mut files_populated = 0;
    let mut bytes = 0;
    let mut bytes_populated = 0;
    for (i, entry) in layer.index.entries.iter().enumerate() {
        if entry.kind != EntryKind::File || entry.stored_size() == 0 {
            continue;
        }
        files += 1;
        bytes += entry.stored_size();
        if layer.is_populated(i) {
            files_populated += 1;
            bytes_populated += entry.stored_size();
        }
    }
    LayerStatus {
        digest: layer.digest.clone(),
        phase,
        mode: layer.mode().unwrap_or_default().name().into(),
        files,
        files_populated,
        bytes,
        bytes_populated,
        bytes_fetched: layer.reader().stats().bytes_fetched,
        error: managed.error(),
        failed: matches!(managed.life(), LayerLife::Failed(_)),
        state: LayerState::served(phase),
    }
}
