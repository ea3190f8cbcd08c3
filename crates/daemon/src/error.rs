//! Errors that stop the daemon, or that a layer of it reports.

use lazylayer_source::Digest;

/// Errors that stop the daemon (the holder, or a worker starting up).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another daemon answers on the socket.
    #[error("a lazylayer daemon already serves {0}")]
    AlreadyRunning(String),
    /// The first worker said it cannot start.
    #[error("the worker could not start (its error is in the lines above)")]
    WorkerCannotStart,
    /// `--worker-fds` does not name descriptors a holder handed down.
    #[error("--worker-fds {arg}: {reason} (this option is for lazylayer serve's own use)")]
    BadWorkerFds {
        /// The option's value.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Taking up a layer failed.
    #[error(transparent)]
    Layer(Box<LayerError>),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] lazylayer_store::Error),
    /// A system call or file operation, with what was being done.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        cause: std::io::Error,
    },
}

impl From<LayerError> for ServeError {
    fn from(error: LayerError) -> ServeError {
        ServeError::Layer(Box::new(error))
    }
}

impl ServeError {
    /// A failed system call or file operation, with what was being done.
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> ServeError {
        ServeError::Io {
            context: context.into(),
            cause,
        }
    }
}

/// Why a layer cannot be taken up, filled or detached.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The store says the layer is lazy, but its index is gone.
    #[error("layer {0} is lazy but has no index")]
    NoIndex(Digest),
    /// The image the layer comes from cannot be reached as recorded.
    #[error("layer {layer}: its image {image}: {cause}")]
    Source {
        /// The layer.
        layer: Digest,
        /// The image reference recorded at pull.
        image: String,
        /// Why.
        cause: lazylayer_source::Error,
    },
    /// The store failed for this layer.
    #[error("layer {layer}: {cause}")]
    Store {
        /// The layer.
        layer: Digest,
        /// Why.
        cause: lazylayer_store::Error,
    },
    /// The layer's fanotify marks could not be placed.
    #[error("marking layer {layer}: {cause}")]
    Marks {
        /// The layer.
        layer: Digest,
        /// Why.
        cause: std::io::Error,
    },
    /// The holder did not mount the layer with FUSE.
    #[error("layer {layer}: the holder did not mount it with FUSE: {reason}")]
    FuseMount {
        /// The layer.
        layer: Digest,
        /// Why.
        reason: String,
    },
    /// The complete layer does not match its blob digest or its index.
    #[error("layer {layer} cannot be detached: {cause}")]
    Verify {
        /// The layer.
        layer: Digest,
        /// Why.
        cause: lazylayer_index::Error,
    },
}
