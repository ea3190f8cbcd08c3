//! Checking a whole layer: its blob against its digest, and the index rebuilt from the blob
//! against the index in use. The check reads the span cache in blob order and, when a span is
//! not there yet, waits for it: so it can start when population starts and follow the spans
//! as they arrive, on the second core, instead of decompressing the whole layer again after
//! the last file is filled (a third of the time of a whole-layer population, measured with
//! `lazylayer-bench populate`, docs/benchmarks.md). It never fetches: whoever completes the
//! layer fetches the spans that no file needed.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lazylayer_source::{BlobDescriptor, Digest, DigestHasher};

use super::cache::SpanPresence;
use crate::build::slots::{Mismatch, Sameness};
use crate::format::LayerIndex;
use crate::{Error, Result};

/// How soon a check that waits for a span looks again; the pause doubles while it waits, up to
/// [`MAX_POLL`] (a layer held back by the rate cap can wait for hours).
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(100);

/// A check of the whole layer, running on a blocking thread; it stops when dropped.
pub struct Verification {
    layer: String,
    task: tokio::task::JoinHandle<Result<()>>,
    stop: Arc<AtomicBool>,
}

impl Verification {
    /// Starts checking `index`'s blob from the span cache file at `path`, following the spans
    /// `presence` reports as they arrive.
    pub(super) fn start(
        index: Arc<LayerIndex>,
        path: &std::path::Path,
        presence: SpanPresence,
    ) -> Result<Verification> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let blob = ArrivingBlob {
            file,
            presence,
            index: index.clone(),
            position: 0,
            stop: stop.clone(),
        };
        let layer = index.blob_digest.to_string();
        let task = tokio::task::spawn_blocking(move || check(blob, &index));
        Ok(Verification { layer, task, stop })
    }

    /// Whether the check has ended (passed, failed or stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The result, once every span has arrived (the caller makes sure they do) and the whole
    /// blob has been checked.
    pub async fn finish(mut self) -> Result<()> {
        (&mut self.task).await.map_err(|e| Error::BadLayer {
            layer: self.layer.clone(),
            reason: format!("verification task failed: {e}"),
        })?
    }
}

impl Drop for Verification {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The blob digest, then the index rebuilt from the blob, against `index`: the file table is
/// compared entry by entry as the tar is walked, never rebuilt whole beside the one in use.
fn check(blob: ArrivingBlob, index: &LayerIndex) -> Result<()> {
    let descriptor = BlobDescriptor {
        digest: index.blob_digest.clone(),
        media_type: index.media_type.clone(),
        size: index.blob_size,
    };
    let verifier = BlobDigestCheck::new(blob, &descriptor);
    // An index made from the layer's table of contents places file data in a stream of file
    // data only: its file table says what the tar stream's says, but for where data sits.
    let sameness = if index.from_toc() {
        Sameness::ButDataOffset
    } else {
        Sameness::Whole
    };
    let rebuilt = crate::build::rebuild_comparing(
        verifier,
        &descriptor,
        Some(&index.diff_id),
        crate::BuildOptions {
            spacing: index.spacing,
            continuation: index.continuation,
        },
        &index.entries,
        sameness,
    )?;
    let (what, differs) = if index.from_toc() {
        (
            format!(
                "of layer {} (from its table of contents)",
                index.blob_digest
            ),
            "differs from the tar stream of the verified blob",
        )
    } else {
        (
            format!("of layer {}", index.blob_digest),
            "differs from the index rebuilt from the verified blob",
        )
    };
    if let Err(mismatch) = rebuilt.entries {
        return Err(Error::bad_index(
            what,
            format!("{differs}: {}", describe(&mismatch, sameness)),
        ));
    }
    if index.from_toc() {
        return Ok(());
    }
    // An index from before version 4 has no window digests to compare.
    let same_windows =
        index.window_digests.is_empty() || rebuilt.index.window_digests == index.window_digests;
    if rebuilt.index.spans != index.spans || !same_windows {
        return Err(Error::bad_index(
            what,
            format!("{differs}: its spans differ"),
        ));
    }
    Ok(())
}

/// Where the rebuilt file table first differs from the index's, for the error message.
fn describe(mismatch: &Mismatch, sameness: Sameness) -> String {
    match (&mismatch.found, &mismatch.claimed) {
        (Some(found), Some(claimed)) if found.path != claimed.path => format!(
            "entry {} is {} where the tar stream has {}",
            mismatch.rank,
            claimed.display_path(),
            found.display_path()
        ),
        (Some(found), Some(claimed)) => {
            let mut found = found.clone();
            if sameness == Sameness::ButDataOffset {
                found.data_offset = claimed.data_offset;
            }
            format!(
                "{}: {}",
                claimed.display_path(),
                crate::check::differences(&found, claimed)
            )
        }
        (Some(found), None) => format!(
            "the tar stream has {} past the index's {} entries",
            found.display_path(),
            mismatch.rank
        ),
        (None, Some(claimed)) => format!(
            "the index has {} past the tar stream's {} entries",
            claimed.display_path(),
            mismatch.rank
        ),
        (None, None) => "the file tables differ".to_string(),
    }
}

/// The blob, read from the span cache file in order, each span once it is present.
struct ArrivingBlob {
    file: File,
    presence: SpanPresence,
    index: Arc<LayerIndex>,
    position: u64,
    stop: Arc<AtomicBool>,
}

impl Read for ArrivingBlob {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.index.blob_size;
        if self.position >= size || buf.is_empty() {
            return Ok(0);
        }
        let spans = &self.index.spans;
        let i = spans.partition_point(|s| s.compressed_end <= self.position);
        let end = spans.get(i).map_or(size, |s| s.compressed_end.min(size));
        if i < spans.len() {
            let mut pause = FIRST_POLL;
            while !self.presence.has(i) {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(std::io::Error::other("the check of the layer was stopped"));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_POLL);
            }
        }
        let len = buf.len().min((end - self.position) as usize);
        let read = self.file.read_at(&mut buf[..len], self.position)?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.position += read as u64;
        Ok(read)
    }
}

/// A reader that fails at its end if what passed does not hash to the blob's digest.
struct BlobDigestCheck<R> {
    inner: R,
    hasher: Option<DigestHasher>,
    expected: Digest,
}

impl<R> BlobDigestCheck<R> {
    fn new(inner: R, blob: &BlobDescriptor) -> Self {
        BlobDigestCheck {
            inner,
            hasher: Some(DigestHasher::new(blob.digest.algorithm())),
            expected: blob.digest.clone(),
        }
    }
}

impl<R: std::io::Read> std::io::Read for BlobDigestCheck<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(out)?;
        if n > 0 {
            if let Some(hasher) = self.hasher.as_mut() {
                hasher.update(&out[..n]);
            }
        } else if !out.is_empty()
            && let Some(hasher) = self.hasher.take()
        {
            let actual = hasher.finish();
            if actual != self.expected {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the layer's bytes hash to {actual}, not {}", self.expected),
                ));
            }
        }
        Ok(n)
    }
}
