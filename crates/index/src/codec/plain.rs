//! Uncompressed tar layers: spans are fixed-size runs of bytes.

use std::io::{self, Read};

use super::{CompressedInput, Indexer, Resume, WindowSpill, corrupt};
use crate::format::Span;

/// Passes the tar through, cutting a span every `spacing` bytes.
pub struct PlainIndexer<R> {
    input: CompressedInput<R>,
    spacing: u64,
}

impl<R: Read> PlainIndexer<R> {
    pub fn new(blob: R, spacing: u64) -> io::Result<Self> {
        Ok(PlainIndexer {
            input: CompressedInput::new(blob)?,
            spacing: spacing.max(1),
        })
    }
}

impl<R: Read> Read for PlainIndexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.input.span_len() >= self.spacing {
            let at = self.input.consumed;
            self.input.cut(false, at, Resume::Fresh)?;
        }
        let room = (self.spacing - self.input.span_len()).min(out.len() as u64) as usize;
        let available = self.input.available()?;
        let n = available.len().min(room);
        out[..n].copy_from_slice(&available[..n]);
        self.input.consume(n);
        Ok(n)
    }
}

impl<R: Read + Send> Indexer for PlainIndexer<R> {
    fn finish(self: Box<Self>) -> io::Result<(Vec<Span>, WindowSpill)> {
        Ok(self.input.finish())
    }
}

/// The uncompressed bytes are the span bytes.
pub fn resume(
    compressed: &[u8],
    want: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    if (compressed.len() as u64) < want {
        return Err(corrupt("plain span shorter than its uncompressed length"));
    }
    sink(&compressed[..want as usize])
}
