//! What can go wrong in the pipeline.

/// An error of the pipeline: from a lower layer of the data flow, or of its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry, the image reference or the manifest.
    #[error(transparent)]
    Source(#[from] lazylayer_source::Error),
    /// Building, fetching or checking a lazy index.
    #[error(transparent)]
    Index(#[from] lazylayer_index::Error),
    /// The layer store.
    #[error(transparent)]
    Store(#[from] lazylayer_store::Error),
    /// Mounting or unmounting an overlay.
    #[error(transparent)]
    Mount(#[from] lazylayer_overlay::MountError),
    /// A file or process operation, with what was being done.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        cause: std::io::Error,
    },
    /// The daemon could not be started or refused a request.
    #[error("{0}")]
    Daemon(String),
    /// A lazy-only pull found a layer with no usable lazy index.
    #[error("layer {layer} of {image} has no usable lazy index")]
    NoLazyIndex {
        /// The image.
        image: String,
        /// The layer.
        layer: lazylayer_source::Digest,
    },
    /// A request that cannot be carried out as asked (the message says what to do instead).
    #[error("{0}")]
    Refused(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed file or process operation, with what was being done.
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            cause,
        }
    }
}
