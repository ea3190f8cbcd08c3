//! A served layer's life, as an explicit state machine:
//!
//! ```text
//! Prefetching -> Streaming -> Verifying -> Detached
//!      \______________\____________\_____> Failed
//! ```
//!
//! Prefetching fills the files the image's prefetch profiles list; Streaming fills every other
//! file in stream order (fills for waiting readers run beside both); Verifying checks the
//! complete layer against its blob digest and index; Detached means no mark and no daemon is
//! needed any more. Failed is final for this worker: the reason is shown by `status`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use lazylayer_store::Layer;

/// Where a served layer is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerLife {
    /// Filling the files the image's prefetch profiles list, first.
    Prefetching,
    /// Filling every other file in stream order.
    Streaming,
    /// Every file holds its data: checking the whole blob and the index.
    Verifying,
    /// Complete and verified; nothing of it is lazy any more.
    Detached,
    /// Cannot go on, for the reason given.
    Failed(String),
}

impl LayerLife {
    /// Whether the machine may go from `self` to `next`.
    pub fn may_become(&self, next: &LayerLife) -> bool {
        use LayerLife::*;
        matches!(
            (self, next),
            (Prefetching, Streaming)
                | (Streaming, Verifying)
                | (Prefetching | Streaming | Verifying, Failed(_))
                | (Verifying, Detached)
        )
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            LayerLife::Prefetching => "prefetching",
            LayerLife::Streaming => "streaming",
            LayerLife::Verifying => "verifying",
            LayerLife::Detached => "detached",
            LayerLife::Failed(_) => "failed",
        }
    }
}

/// A layer the worker serves: the layer, where it is in its life, and what went wrong last.
pub struct Managed {
    /// The layer.
    pub layer: Arc<Layer>,
    /// Fill it at full speed now (`detach`, or a stop with mounts in use).
    pub urgent: AtomicBool,
    life: Mutex<LayerLife>,
    /// The last error of a step that is being retried (cleared once it succeeds).
    last_error: Mutex<Option<String>>,
}

impl Managed {
    /// A layer just taken up.
    pub fn new(layer: Arc<Layer>) -> Managed {
        Managed {
            layer,
            urgent: AtomicBool::new(false),
            life: Mutex::new(LayerLife::Prefetching),
            last_error: Mutex::new(None),
        }
    }

    /// Where it is.
    pub fn life(&self) -> LayerLife {
        self.life.lock().expect("layer life").clone()
    }

    /// Moves it on to `next`; a move the machine does not allow is logged and not made.
    pub fn become_(&self, next: LayerLife) {
        let mut life = self.life.lock().expect("layer life");
        if life.may_become(&next) {
            tracing::debug!(
                "layer {}: {} -> {}",
                self.layer.digest,
                life.name(),
                next.name()
            );
            *life = next;
        } else {
            tracing::error!(
                "layer {}: {} cannot become {}",
                self.layer.digest,
                life.name(),
                next.name()
            );
        }
    }

    /// Records the error of a step being retried.
    pub fn set_error(&self, error: impl std::fmt::Display) {
        *self.last_error.lock().expect("error") = Some(error.to_string());
    }

    /// The step succeeded after all.
    pub fn clear_error(&self) {
        *self.last_error.lock().expect("error") = None;
    }

    /// What `status` shows as the layer's error: why it failed, else the last retried error.
    pub fn error(&self) -> Option<String> {
        match self.life() {
            LayerLife::Failed(reason) => Some(reason),
            _ => self.last_error.lock().expect("error").clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LayerLife::*;

    #[test]
    fn a_layer_goes_forward_only_and_failure_is_final() {
        assert!(Prefetching.may_become(&Streaming));
        assert!(Streaming.may_become(&Verifying));
        assert!(Verifying.may_become(&Detached));
        assert!(Streaming.may_become(&Failed("bad span".into())));
        assert!(
            !Streaming.may_become(&Detached),
            "never detached unverified"
        );
        assert!(!Prefetching.may_become(&Verifying));
        assert!(!Detached.may_become(&Streaming));
        assert!(!Failed("x".into()).may_become(&Streaming));
        assert!(!Detached.may_become(&Failed("x".into())));
    }
}
