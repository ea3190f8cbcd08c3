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
