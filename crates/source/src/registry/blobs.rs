//! Reading blobs: whole blobs as verified streams that resume where a broken transfer stopped,
//! and ranged reads (`Range: bytes=a-b`), the primitive lazy loading rests on.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{Method, Response, StatusCode};

use super::Repository;
use super::auth::Access;
use super::retry::Attempts;
use super::transport::Request;
use crate::blob::{BlobStream, BlobVerifier};
use crate::error::error_chain;
use crate::manifest::BlobDescriptor;
use crate::{Digest, Error, Result};

impl Repository {
    fn blob_request(&self, method: Method, digest: &Digest) -> Result<Request> {
        let what = format!("{method} blob {digest} of {}/{}", self.registry, self.name);
        Ok(Request::new(
            method,
            self.url("blobs", &digest.to_string())?,
            Access::Pull,
            what,
        ))
    }

    /// The size of a blob, or `None` when the repository does not have it.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let request = self.blob_request(Method::HEAD, digest)?;
        let mut attempts = Attempts::new(self.client.retry_policy());
        match self.send(&request, &mut attempts).await {
            Ok(response) => Ok(Some(
                response
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Streams a whole blob, verified against `descriptor`. A transfer that breaks is resumed
    /// from where it stopped (with a Range request) within the retry budget; the stream ends
    /// with an error, never a clean end, if the bytes do not match the digest.
    pub async fn open_blob(&self, descriptor: &BlobDescriptor) -> Result<BlobStream> {
        let mut download = Download {
            repository: self.clone(),
            request: self.blob_request(Method::GET, &descriptor.digest)?,
            verifier: Some(BlobVerifier::new(
                format!(
                    "blob {} of {}/{}",
                    descriptor.digest, self.registry, self.name
                ),
                descriptor,
            )),
            attempts: Attempts::new(self.client.retry_policy()),
            response: None,
            skip: 0,
        };
        // The first request is made now, so that "not found" or "denied" surface here.
        download.connect().await?;
        Ok(Box::pin(futures_util::stream::unfold(
            download,
            |mut d| async move {
                match d.next_chunk().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), d)),
                    Ok(None) => None,
                    Err(e) => {
                        d.verifier = None; // ends the stream after the error
                        Some((Err(e), d))
                    }
                }
            },
        )))
    }

    /// Reads bytes `range` of a blob with a ranged GET. A registry that ignores the Range
    /// header and answers 200 with the whole blob is handled. The bytes are not verified here:
    /// a partial read cannot be checked against the blob digest, so callers check them against
    /// the span digests of a lazy index.
    pub async fn read_range(&self, digest: &Digest, range: Range<u64>) -> Result<Bytes> {
        let len = range.end.saturating_sub(range.start) as usize;
        let mut out = BytesMut::with_capacity(len.min(8 << 20));
        self.read_range_progressively(digest, range, &mut |bytes| {
            out.extend_from_slice(bytes);
            Ok(())
        })
        .await?;
        Ok(out.freeze())
    }

    /// Like [`read_range`](Self::read_range), but hands each piece of the range to `sink` as
    /// it arrives, in order and each byte once (a retried transfer resumes where it stopped),
    /// so that a caller can use the first bytes of a long range before the last have come.
    /// An error from `sink` ends the transfer with that error.
    pub async fn read_range_progressively(
        &self,
        digest: &Digest,
        range: Range<u64>,
        sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
    ) -> Result<()> {
        if range.start >= range.end {
            return Ok(());
        }
        let len = range.end - range.start;
        let mut received = 0u64;
        let mut attempts = Attempts::new(self.client.retry_policy());
        loop {
            let start = range.start + received;
            let request = self
                .blob_request(Method::GET, digest)?
                .header(RANGE, &format!("bytes={}-{}", start, range.end - 1));
            let mut response = self.send(&request, &mut attempts).await?;
            let mut skip = match response.status() {
                StatusCode::PARTIAL_CONTENT => {
                    check_content_range(&request.what, &response, start, range.end)?;
                    0
                }
                StatusCode::OK => {
                    tracing::debug!("{}: the registry ignored the Range header", request.what);
                    if let Some(total) = response.content_length()
                        && total < range.end
                    {
                        return Err(out_of_range(&request.what, range.end, total));
                    }
                    start
                }
                other => {
                    return Err(Error::Protocol {
                        request: request.what.clone(),
                        detail: format!("unexpected HTTP {other} to a range request"),
                    });
                }
            };
            let failure = loop {
                match response.chunk().await {
                    Ok(Some(mut chunk)) => {
                        if skip > 0 {
                            let drop = skip.min(chunk.len() as u64) as usize;
                            skip -= drop as u64;
                            let _ = chunk.split_to(drop);
                        }
                        let take = chunk.len().min((len - received) as usize);
                        if take > 0 {
                            sink(&chunk[..take])?;
                            received += take as u64;
                        }
                        if received == len {
                            return Ok(());
                        }
                    }
                    Ok(None) => break "the body ended early".to_string(),
                    Err(e) => break error_chain(&e),
                }
            };
            let wait = attempts.failed(&request.what, failure, None)?;
            tokio::time::sleep(wait).await;
        }
    }
}

fn out_of_range(what: &str, end: u64, total: u64) -> Error {
    Error::Protocol {
        request: what.to_string(),
        detail: format!("range ends at {end}, past the end of the {total}-byte blob"),
    }
}

/// Checks that a 206 answer covers exactly `start..end`.
fn check_content_range(what: &str, response: &Response, start: u64, end: u64) -> Result<()> {
    let header = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parsed = header
        .strip_prefix("bytes ")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(span, total)| {
            let (a, b) = span.split_once('-')?;
            Some((
                a.parse::<u64>().ok()?,
                b.parse::<u64>().ok()?,
                total.parse::<u64>().ok(),
            ))
        });
    match parsed {
        Some((a, b, _)) if a == start && b == end - 1 => Ok(()),
        Some((a, b, Some(total))) if a == start && b + 1 == total && total < end => {
            Err(out_of_range(what, end, total))
        }
        _ => Err(Error::Protocol {
            request: what.to_string(),
            detail: format!(
                "asked for bytes {start}-{}, the registry sent Content-Range {header:?}",
                end - 1
            ),
        }),
    }
}

/// A whole-blob transfer that survives broken connections.
struct Download {
    repository: Repository,
    request: Request,
    /// `None` once the stream has ended (cleanly or with an error).
    verifier: Option<BlobVerifier>,
    attempts: Attempts,
    response: Option<Response>,
    /// Bytes to drop from the front of the response (a 200 answer to a resume).
    skip: u64,
}

impl Download {
    /// (Re)opens the transfer at the current offset.
    async fn connect(&mut self) -> Result<()> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        let offset = verifier.offset();
        let mut request = self.request.clone();
        if offset > 0 {
            request = request.header(RANGE, &format!("bytes={offset}-"));
        }
        let response = self.repository.send(&request, &mut self.attempts).await?;
        self.skip = 0;
        if offset > 0 {
            if response.status() == StatusCode::PARTIAL_CONTENT {
                let end = verifier.expected_size();
                check_content_range(&request.what, &response, offset, end)?;
            } else {
                self.skip = offset;
            }
        }
        self.response = Some(response);
        Ok(())
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            let Some(verifier) = self.verifier.as_mut() else {
                return Ok(None);
            };
            let Some(response) = self.response.as_mut() else {
                self.connect().await?;
                continue;
            };
            let failure = match response.chunk().await {
                Ok(Some(mut chunk)) => {
                    if self.skip > 0 {
                        let drop = self.skip.min(chunk.len() as u64) as usize;
                        self.skip -= drop as u64;
                        let _ = chunk.split_to(drop);
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    verifier.update(&chunk)?;
                    return Ok(Some(chunk));
                }
                Ok(None) if verifier.offset() >= verifier.expected_size() => {
                    let verifier = self.verifier.take().expect("checked above");
                    verifier.finish()?;
                    return Ok(None);
                }
                Ok(None) => "the body ended early".to_string(),
                Err(e) => error_chain(&e),
            };
            self.response = None;
            let wait = self.attempts.failed(&self.request.what, failure, None)?;
            tokio::time::sleep(wait).await;
        }
    }
}
