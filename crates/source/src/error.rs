//! The errors of fetching images: each says what was being done and why it failed, in words a
//! user can act on, and none ever contains a credential or token.

use std::time::Duration;

use crate::Digest;

/// Everything that can go wrong between an image reference and verified bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference does not parse.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: String },

    /// A digest string does not parse.
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: String },

    /// A `--platform` value does not parse.
    #[error("invalid platform {input:?}: {reason} (expected OS/ARCH[/VARIANT], e.g. linux/arm64)")]
    InvalidPlatform { input: String, reason: String },

    /// The registry or layout has no such manifest, tag or blob.
    #[error("{what} not found")]
    NotFound { what: String },

    /// Content did not hash to the digest it is named by: the bytes are not handed on.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    /// Content did not have the size its descriptor promised.
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    /// A manifest or config is larger than lazylayer accepts.
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge { what: String, limit: u64 },

    /// A manifest whose media type lazylayer does not read.
    #[error("{what}: unsupported media type {media_type:?}{hint}")]
    UnsupportedMediaType {
        what: String,
        media_type: String,
        hint: &'static str,
    },

    /// A manifest, config or index that does not parse or breaks the spec.
    #[error("{what} is malformed: {reason}")]
    Malformed { what: String, reason: String },

    /// A multi-platform image has no entry for the wanted platform.
    #[error("{image} has no image for platform {wanted} (available: {available})")]
    NoMatchingPlatform {
        image: String,
        wanted: String,
        available: String,
    },

    /// The registry wants credentials that lazylayer does not have or that it rejected.
    #[error("{registry}: authentication failed: {detail}")]
    Unauthorized { registry: String, detail: String },

    /// The registry refused access with the credentials given.
    #[error("{registry}: access denied: {detail}")]
    Denied { registry: String, detail: String },

    /// A request kept failing with transient errors until the retry budget ran out.
    #[error("{request}: gave up after {attempts} attempts in {elapsed:.1?}: {last}")]
    RetriesExhausted {
        request: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },

    /// The registry answered with an error status that retrying cannot fix.
    #[error("{request}: HTTP {status}: {detail}")]
    Http {
        request: String,
        status: u16,
        detail: String,
    },

    /// The registry answered something that breaks the protocol (e.g. a wrong Content-Range).
    #[error("{request}: {detail}")]
    Protocol { request: String, detail: String },

    /// A transport failure that is not worth retrying (e.g. a TLS certificate error).
    #[error("{request}: {detail}")]
    Transport { request: String, detail: String },

    /// A local file could not be read (OCI layouts, credential files).
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

    /// A malformed-input error.
    pub fn malformed(what: impl Into<String>, reason: impl ToString) -> Error {
        Error::Malformed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// Flattens an error and its causes into one line ("a: b: c"), so that messages such as
/// reqwest's "error sending request" carry their real cause ("connection refused").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = inner.source();
    }
    text
}
