//! Verified blob streams: a blob's bytes are counted and hashed as they pass, and the stream
//! ends with an error instead of a clean end when the size or digest is wrong.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::manifest::BlobDescriptor;
use crate::{Digest, DigestHasher, Error, Result};

/// A blob's bytes in order. The last item is an error if the blob's size or digest is wrong:
/// a consumer must not commit anything it derived from the bytes before the stream ends `None`.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// Checks a blob's bytes against its descriptor while they stream past.
pub struct BlobVerifier {
    what: String,
    expected_digest: Digest,
    expected_size: u64,
    hasher: DigestHasher,
}

impl BlobVerifier {
    /// A verifier for the blob `descriptor`; `what` names it in errors.
    pub fn new(what: impl Into<String>, descriptor: &BlobDescriptor) -> Self {
        BlobVerifier {
            what: what.into(),
            expected_digest: descriptor.digest.clone(),
            expected_size: descriptor.size,
            hasher: DigestHasher::new(descriptor.digest.algorithm()),
        }
    }

    /// How many bytes have passed.
    pub fn offset(&self) -> u64 {
        self.hasher.len()
    }

    /// The size the descriptor promises.
    pub fn expected_size(&self) -> u64 {
        self.expected_size
    }

    /// Feeds the next bytes; fails as soon as there are more than the descriptor promises.
    pub fn update(&mut self, chunk: &[u8]) -> Result<()> {
        let total = self.hasher.len() + chunk.len() as u64;
        if total > self.expected_size {
            return Err(Error::SizeMismatch {
                what: self.what.clone(),
                expected: self.expected_size,
                actual: total,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Checks the size and digest once every byte has passed.
    pub fn finish(self) -> Result<()> {
        if self.hasher.len() != self.expected_size {
            return Err(Error::SizeMismatch {
                what: self.what,
                expected: self.expected_size,
                actual: self.hasher.len(),
            });
        }
        let actual = self.hasher.finish();
        if actual != self.expected_digest {
            return Err(Error::DigestMismatch {
                what: self.what,
                expected: self.expected_digest,
                actual,
            });
        }
        Ok(())
    }
}

/// Reads a whole verified stream into memory, refusing blobs larger than `limit`.
pub async fn collect_blob(mut stream: BlobStream, what: &str, limit: u64) -> Result<Bytes> {
    let mut buffer = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if buffer.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::TooLarge {
                what: what.to_string(),
                limit,
            });
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Wraps a stream of bytes so that it is checked against `verifier`: the stream ends with the
/// verifier's error instead of a clean end when the size or digest is wrong.
pub fn verified<S>(inner: S, verifier: BlobVerifier) -> BlobStream
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    let state = (Box::pin(inner), Some(verifier));
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut inner, verifier)| async move {
            let mut verifier = verifier?;
            match inner.next().await {
                Some(Ok(chunk)) => match verifier.update(&chunk) {
                    Ok(()) => Some((Ok(chunk), (inner, Some(verifier)))),
                    Err(e) => Some((Err(e), (inner, None))),
                },
                Some(Err(e)) => Some((Err(e), (inner, None))),
                None => match verifier.finish() {
                    Ok(()) => None,
                    Err(e) => Some((Err(e), (inner, None))),
                },
            }
        },
    ))
}
