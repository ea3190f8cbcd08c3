//! Errors of the layer store.

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on the store failed.
    #[error("{context}: {errno}")]
    Sys {
        context: String,
        errno: rustix::io::Errno,
    },
    /// A file operation failed.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    /// The index or the source failed.
    #[error(transparent)]
    Index(#[from] lazylayer_index::Error),
    /// State on disk that does not make sense.
    #[error("{0}")]
    Corrupt(String),
    /// The layer's index proved wrong while it was being populated: it fails for good.
    #[error("the index does not match the layer: {0}")]
    IndexProvenWrong(String),
    /// A layer of the image failed: its index proved wrong, so it is not used again.
    #[error(
        "layer {layer} of {image} failed: {reason}. Its tree may not show what the image \
         holds, so it is not used again: `lazylayer rmi {image}` (then `lazylayer gc`) and pull \
         again, which builds the index here or uses one bound to the image"
    )]
    LayerFailed {
        image: String,
        layer: lazylayer_source::Digest,
        reason: String,
    },
    /// The image is held by a service that uses its layers (see [`crate::Store::hold_image`]).
    #[error(
        "{image} is in use by {holder}: remove it there (for containerd: `ctr image rm`, or \
         kubelet's image garbage collection), which releases it"
    )]
    Held { image: String, holder: String },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed system call, with what was being done.
    pub fn sys(context: impl Into<String>, errno: rustix::io::Errno) -> Error {
        Error::Sys {
            context: context.into(),
            errno,
        }
    }

    /// A failed file operation, with what was being done.
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            cause,
        }
    }
}
