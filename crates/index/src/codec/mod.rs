//! Compression formats, in two directions:
//! - *indexing*: decompress a whole layer once, in order, and cut it into spans at points
//!   where decompression can restart (checkpoints), hashing each span's compressed bytes;
//! - *resuming*: decompress a run of spans starting at one of those checkpoints.
//!
//! gzip uses the zran technique (bit offset + 32 KiB window), zstd restarts at frame
//! boundaries, and plain tar restarts anywhere.

pub mod gzip;
pub mod inflate;
pub mod plain;
pub mod zstd;

use std::fs::File;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use crate::format::{Compression, RunPlan, Span, SpanStart};

/// Deflate windows as the indexer takes them: compressed at once and spilled to an unnamed
/// temporary file, so building holds no window in memory whatever the layer size.
pub struct WindowSpill {
    file: File,
    len: u64,
}

impl WindowSpill {
    fn new() -> io::Result<Self> {
        Ok(WindowSpill {
            file: tempfile::tempfile()?,
            len: 0,
        })
    }

    /// Stores a window; returns where it is.
    fn append(&mut self, window: &[u8]) -> io::Result<(u64, u32)> {
        let packed = ::zstd::bulk::compress(window, 3)?;
        self.file.write_all(&packed)?;
        let offset = self.len;
        self.len += packed.len() as u64;
        Ok((offset, packed.len() as u32))
    }

    /// The file and its length.
    pub fn into_parts(self) -> (File, u64) {
        (self.file, self.len)
    }
}

/// How decompression resumes at a cut (what the span after it starts with).
pub(crate) enum Resume<'a> {
    /// From nothing: a new gzip member or zstd frame, or any offset of a plain tar.
    Fresh,
    /// Raw deflate from a block boundary: the boundary's `bits` in the last byte, and the
    /// window.
    Deflate { bits: u8, window: &'a [u8] },
    /// Only by going on from the previous span (a [`SpanStart::Continue`] span).
    Continue,
}

/// The compressed side of indexing: buffers input from the blob, tracks how much the
/// decoder consumed, and hashes the consumed bytes into the current span.
pub(crate) struct CompressedInput<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// Bytes consumed by the decoder so far.
    pub consumed: u64,
    last_byte: u8,
    hasher: Sha256,
    span_start: u64,
    span_uncompressed_start: u64,
    /// Where the current span's checkpoint is: its own start, or an earlier span's.
    checkpoint_start: u64,
    span_begin: SpanStart,
    spans: Vec<Span>,
    windows: WindowSpill,
}

impl<R: Read> CompressedInput<R> {
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(CompressedInput {
            inner,
            buf: vec![0; 256 << 10],
            start: 0,
            end: 0,
            eof: false,
            consumed: 0,
            last_byte: 0,
            hasher: Sha256::new(),
            span_start: 0,
            span_uncompressed_start: 0,
            checkpoint_start: 0,
            span_begin: SpanStart::Fresh,
            spans: Vec::new(),
            windows: WindowSpill::new()?,
        })
    }

    /// The unconsumed input, reading more when none is left; empty at the end of the blob.
    pub fn available(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end && !self.eof {
            self.start = 0;
            self.end = 0;
            loop {
                match self.inner.read(&mut self.buf) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => {
                        self.end = n;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(&self.buf[self.start..self.end])
    }

    /// Marks `n` bytes of [`available`](Self::available) as consumed by the decoder.
    pub fn consume(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let bytes = &self.buf[self.start..self.start + n];
        self.hasher.update(bytes);
        self.last_byte = bytes[n - 1];
        self.start += n;
        self.consumed += n as u64;
    }

    /// Compressed bytes in the current span so far.
    pub fn span_len(&self) -> u64 {
        self.consumed - self.span_start
    }

    /// Compressed bytes since the current span's checkpoint (more than
    /// [`span_len`](Self::span_len) after [`Resume::Continue`] cuts).
    pub fn since_checkpoint(&self) -> u64 {
        self.consumed - self.checkpoint_start
    }

    /// Uncompressed offset where the current span starts.
    pub fn span_uncompressed_start(&self) -> u64 {
        self.span_uncompressed_start
    }

    /// Ends the current span at the consumed position and starts the next one there, or one
    /// byte earlier when the next span needs bits of the last consumed byte; `resume` says
    /// how the next span starts.
    pub fn cut(
        &mut self,
        share_last_byte: bool,
        uncompressed_at: u64,
        resume: Resume<'_>,
    ) -> io::Result<()> {
        let checkpoint = !matches!(resume, Resume::Continue);
        let next = match resume {
            Resume::Fresh => SpanStart::Fresh,
            Resume::Continue => SpanStart::Continue,
            Resume::Deflate { bits, window } => {
                let (window_offset, window_len) = self.windows.append(window)?;
                SpanStart::Deflate {
                    bits,
                    window_offset,
                    window_len,
                }
            }
        };
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let begin = std::mem::replace(&mut self.span_begin, next);
        self.spans.push(Span {
            compressed_start: self.span_start,
            compressed_end: self.consumed,
            uncompressed_start: self.span_uncompressed_start,
            digest,
            start: begin,
        });
        self.span_start = if share_last_byte {
            self.hasher.update([self.last_byte]);
            self.consumed - 1
        } else {
            self.consumed
        };
        self.span_uncompressed_start = uncompressed_at;
        if checkpoint {
            self.checkpoint_start = self.span_start;
        }
        Ok(())
    }

    /// Closes the last span at the end of the blob; returns every span and the windows. A cut
    /// right at the end leaves nothing for a last span, so none is added.
    pub fn finish(mut self) -> (Vec<Span>, WindowSpill) {
        if self.consumed > self.span_start || self.spans.is_empty() {
            let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
            self.spans.push(Span {
                compressed_start: self.span_start,
                compressed_end: self.consumed,
                uncompressed_start: self.span_uncompressed_start,
                digest,
                start: self.span_begin,
            });
        }
        (self.spans, self.windows)
    }
}

/// A decompressing reader that cuts spans as it goes.
pub trait Indexer: Read + Send {
    /// The spans and windows, once the reader has returned end of stream.
    fn finish(self: Box<Self>) -> io::Result<(Vec<Span>, WindowSpill)>;
}

/// The indexing decoder for a layer's compression: checkpoints every `spacing` compressed
/// bytes, and between them [`SpanStart::Continue`] spans every `continuation` bytes (0: none;
/// gzip only).
pub fn indexer<R: Read + Send + 'static>(
    compression: Compression,
    blob: R,
    spacing: u64,
    continuation: u64,
) -> io::Result<Box<dyn Indexer>> {
    Ok(match compression {
        Compression::Gzip => Box::new(gzip::GzipIndexer::new(blob, spacing, continuation)?),
        Compression::Zstd => Box::new(zstd::ZstdIndexer::new(blob, spacing)?),
        Compression::None => Box::new(plain::PlainIndexer::new(blob, spacing)?),
    })
}

/// Decompresses `compressed` (the bytes of a run of spans, starting at the first span's
/// `compressed_start`) from the first span's checkpoint, passing exactly `want` uncompressed
/// bytes to `sink` in order.
pub fn resume(
    compression: Compression,
    start: &SpanStart,
    window: &[u8],
    compressed: &[u8],
    want: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    match compression {
        Compression::Gzip => gzip::resume(start, window, compressed, want, sink),
        Compression::Zstd => zstd::resume(compressed, want, sink),
        Compression::None => plain::resume(compressed, want, sink),
    }
}

/// Decompresses a run of spans as `plan` says (see [`crate::format::LayerIndex::run_plan`]),
/// passing exactly `want` bytes of the uncompressed stream to `sink` in order.
pub fn resume_run(
    compression: Compression,
    plan: &RunPlan,
    compressed: &[u8],
    want: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    match plan {
        RunPlan::Stream { start, window } => {
            resume(compression, start, window, compressed, want, sink)
        }
        RunPlan::Pieces(pieces) => {
            let mut left = want;
            for (range, len) in pieces {
                let take = (*len).min(left);
                if take == 0 {
                    continue;
                }
                let bytes = compressed
                    .get(range.clone())
                    .ok_or_else(|| corrupt("a chunk lies outside the fetched bytes"))?;
                resume(compression, &SpanStart::Fresh, &[], bytes, take, sink)?;
                left -= take;
            }
            if left > 0 {
                return Err(corrupt("the chunks end before the bytes wanted"));
            }
            Ok(())
        }
    }
}

pub(crate) fn corrupt(reason: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.into())
}
