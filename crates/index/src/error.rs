//! Errors of building, decoding and reading lazy indexes.

use lazylayer_source::Digest;

/// What can go wrong with a lazy index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer's bytes break the compression format or the tar format.
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },

    /// A layer entry that lazylayer refuses (escaping paths, unsupported kinds).
    #[error("layer {layer}: entry {path:?}: {reason}")]
    BadEntry {
        layer: String,
        path: String,
        reason: String,
    },

    /// The uncompressed layer does not hash to the diff_id in the image config.
    #[error("layer {layer}: uncompressed content is {actual}, the image config says {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: Digest,
        actual: Digest,
    },

    /// An index that does not decode or breaks its own invariants.
    #[error("lazy index {what}: {reason}")]
    BadIndex { what: String, reason: String },

    /// Fetched bytes of a span do not hash to the span's digest: not used.
    #[error("layer {layer}: span {span} (bytes {start}..{end}) does not match its digest")]
    SpanMismatch {
        layer: String,
        span: usize,
        start: u64,
        end: u64,
    },

    /// A span failed its digest on every one of `attempts` fetches: it is not fetched again.
    #[error(
        "layer {layer}: span {span} (bytes {start}..{end}) did not match its digest in {attempts} \
         fetches: the registry or the index is wrong about it, and the layer cannot be completed"
    )]
    SpanCondemned {
        layer: String,
        span: usize,
        start: u64,
        end: u64,
        attempts: u32,
    },

    /// A read needs a deflate window that is not local yet (an index fetched head first):
    /// it is fetched from the index blob first.
    #[error("layer {layer}: the window of span {span} is not local yet")]
    WindowMissing { layer: String, span: usize },

    /// A read outside a file, or of a file without data.
    #[error("{0}")]
    BadRead(String),

    /// The image source failed (registry, layout).
    #[error(transparent)]
    Source(#[from] lazylayer_source::Error),

    /// A local file (cache, index file) failed.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            cause,
        }
    }

    pub(crate) fn bad_index(what: impl Into<String>, reason: impl ToString) -> Error {
        Error::BadIndex {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
