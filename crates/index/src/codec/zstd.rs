//! zstd layers: decompression restarts at frame boundaries, so spans are runs of whole
//! frames. A layer compressed as one frame is one span.

use std::io::{self, Read};

use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

use super::{CompressedInput, Indexer, Resume, WindowSpill, corrupt};
use crate::format::Span;

/// Decompresses a zstd layer, cutting spans at frame ends once `spacing` bytes have passed.
pub struct ZstdIndexer<R> {
    input: CompressedInput<R>,
    context: DCtx<'static>,
    spacing: u64,
    out_total: u64,
    /// A frame is open (started and not finished).
    in_frame: bool,
}

fn context() -> io::Result<DCtx<'static>> {
    DCtx::try_create().ok_or_else(|| io::Error::other("cannot create a zstd context"))
}

impl<R: Read> ZstdIndexer<R> {
    pub fn new(blob: R, spacing: u64) -> io::Result<Self> {
        Ok(ZstdIndexer {
            input: CompressedInput::new(blob)?,
            context: context()?,
            spacing: spacing.max(1),
            out_total: 0,
            in_frame: false,
        })
    }
}

impl<R: Read> Read for ZstdIndexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let available = self.input.available()?;
            if available.is_empty() {
                if self.in_frame {
                    return Err(corrupt("zstd stream ends inside a frame"));
                }
                return Ok(0);
            }
            let mut input = InBuffer::around(available);
            let mut output = OutBuffer::around(&mut *out);
            let hint = self
                .context
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| {
                    corrupt(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
                })?;
            let (consumed, produced) = (input.pos(), output.pos());
            self.input.consume(consumed);
            self.out_total += produced as u64;
            self.in_frame = hint != 0;
            if hint == 0 && self.input.span_len() >= self.spacing {
                let at = self.out_total;
                self.input.cut(false, at, Resume::Fresh)?;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if consumed == 0 && hint != 0 {
                // No progress with input available: the decoder needs more than we gave.
                continue;
            }
        }
    }
}

impl<R: Read + Send> Indexer for ZstdIndexer<R> {
    fn finish(self: Box<Self>) -> io::Result<(Vec<Span>, WindowSpill)> {
        Ok(self.input.finish())
    }
}

/// Decompresses whole frames from the start of `compressed`.
pub fn resume(
    compressed: &[u8],
    want: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut context = context()?;
    let mut buffer = vec![0u8; 256 << 10];
    let mut input = InBuffer::around(compressed);
    let mut left = want;
    while left > 0 {
        let before = input.pos();
        let mut output = OutBuffer::around(&mut buffer[..]);
        context
            .decompress_stream(&mut output, &mut input)
            .map_err(|code| corrupt(format!("zstd: {}", zstd::zstd_safe::get_error_name(code))))?;
        let produced = output.pos();
        if produced == 0 && input.pos() == before {
            return Err(corrupt("zstd span ended before its uncompressed length"));
        }
        let take = (produced as u64).min(left) as usize;
        sink(&buffer[..take])?;
        left -= take as u64;
    }
    Ok(())
}
