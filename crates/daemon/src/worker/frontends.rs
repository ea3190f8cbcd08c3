//! The two frontends behind one small trait: how the readers of a lazy layer's unfilled files
//! are made to wait for them. In fanotify mode each such file carries an inode mark in the
//! shared group (the holder reads the events); in FUSE mode the holder serves the layer as a
//! FUSE mount and relays its opens. Either way the waiting readers end up in
//! [`Demand`](super::demand::Demand), over the shared layer store.

use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;

use lazylayer_fanotify::Group;
use lazylayer_store::{FrontendMode, LastParent, Layer, LayerTree};

use crate::error::LayerError;
use crate::relay::{ToHolder, ToWorker};
use crate::worker::holder_link::HolderLink;

/// A future a frontend returns (boxed: the trait is used as a trait object).
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the worker asks of a frontend for each lazy layer it serves.
pub trait LayerFrontend: Send + Sync {
    /// Makes the readers of the layer's unfilled files `files` wait for them; resolves once
    /// they do (the layer may be mounted from then on).
    fn take_up<'a>(
        &'a self,
        layer: &'a Arc<Layer>,
        files: &'a [usize],
    ) -> Pending<'a, Result<(), LayerError>>;
    /// File `i` of `layer` holds its data: its readers need not wait any more.
    fn populated(&self, layer: &Layer, i: usize);
    /// The layer is complete (`unfilled` lists files still waiting, normally none): nothing
    /// of it waits any more.
    fn detach(&self, layer: &Layer, unfilled: &[usize]);
}

/// The frontends of a worker, one per mode.
pub struct Frontends {
    /// fanotify marks in the shared group.
    pub fanotify: FanotifyMarks,
    /// FUSE mounts served by the holder.
    pub fuse: FuseThroughHolder,
}

impl Frontends {
    /// The frontend of layers served in `mode`.
    pub fn of(&self, mode: FrontendMode) -> &dyn LayerFrontend {
        match mode {
            FrontendMode::Fanotify => &self.fanotify,
            FrontendMode::Fuse => &self.fuse,
        }
    }
}

/// fanotify mode: an inode mark on each unfilled file, removed once it is filled.
pub struct FanotifyMarks {
    group: Arc<Group>,
}

impl FanotifyMarks {
    /// Marks in `group` (the one the holder shares).
    pub fn new(group: Arc<Group>) -> FanotifyMarks {
        FanotifyMarks { group }
    }

    /// The group (the worker reads it itself once the holder is gone).
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    fn mark(&self, tree: &LayerTree, path: &[u8], last: &mut LastParent) -> std::io::Result<()> {
        let (dir, name) = tree
            .parent_after(path, last)
            .map_err(std::io::Error::other)?;
        let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
        self.group.add_mark(dir.as_fd(), name)
    }

    fn unmark(&self, tree: &LayerTree, path: &[u8]) {
        let Ok((dir, name)) = tree.parent(path) else {
            return;
        };
        let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
        if let Err(e) = self.group.remove_mark(dir.as_fd(), name) {
            tracing::warn!("removing the mark of {}: {e}", tree.path_of(path).display());
        }
    }
}

impl LayerFrontend for FanotifyMarks {
    fn take_up<'a>(
        &'a self,
        layer: &'a Arc<Layer>,
        files: &'a [usize],
    ) -> Pending<'a, Result<(), LayerError>> {
        Box::pin(async move {
            let mut last = LastParent::default();
            for &i in files {
                self.mark(&layer.tree, &layer.index.entries[i].path, &mut last)
                    .map_err(|cause| LayerError::Marks {
                        layer: layer.digest.clone(),
                        cause,
                    })?;
            }
            tracing::info!("layer {}: {} files marked", layer.digest, files.len());
            Ok(())
        })
    }

    fn populated(&self, layer: &Layer, i: usize) {
        self.unmark(&layer.tree, &layer.index.entries[i].path);
    }

    fn detach(&self, layer: &Layer, unfilled: &[usize]) {
        for &i in unfilled {
            self.unmark(&layer.tree, &layer.index.entries[i].path);
        }
    }
}

/// FUSE mode: the holder mounts the layer and relays each open of an unfilled file.
pub struct FuseThroughHolder {
    link: Arc<HolderLink>,
}

impl FuseThroughHolder {
    /// Mounts asked of the holder at the other end of `link`.
    pub fn new(link: Arc<HolderLink>) -> FuseThroughHolder {
        FuseThroughHolder { link }
    }
}

impl LayerFrontend for FuseThroughHolder {
    fn take_up<'a>(
        &'a self,
        layer: &'a Arc<Layer>,
        files: &'a [usize],
    ) -> Pending<'a, Result<(), LayerError>> {
        Box::pin(async move {
            let failed = |reason: String| LayerError::FuseMount {
                layer: layer.digest.clone(),
                reason,
            };
            let answer = self
                .link
                .request(|request| ToHolder::MountFuse {
                    request,
                    layer: layer.digest.to_string(),
                })
                .await
                .map_err(failed)?;
            match answer {
                ToWorker::FuseMounted { error: None, .. } => {}
                ToWorker::FuseMounted {
                    error: Some(error), ..
                } => return Err(failed(error)),
                other => return Err(failed(format!("unexpected answer {other:?}"))),
            }
            tracing::info!(
                "layer {}: {} files to fill through FUSE",
                layer.digest,
                files.len()
            );
            Ok(())
        })
    }

    fn populated(&self, _layer: &Layer, _i: usize) {}

    fn detach(&self, _layer: &Layer, _unfilled: &[usize]) {}
}
