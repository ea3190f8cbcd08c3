//! gzip layers, indexed by the zran technique (zlib's examples/zran.c): inflate stops at
//! deflate block boundaries; where enough compressed bytes have passed, a checkpoint records
//! the bit position and the last 32 KiB of output, from which raw inflate can resume.
//! Multi-member gzip (pigz, concatenated streams) is followed member by member.

use std::io::{self, Read};

use super::inflate::{Inflater, Wrapper};
use super::{CompressedInput, Indexer, Resume, WindowSpill, corrupt};
pub use crate::format::WINDOW;
use crate::format::{Span, SpanStart};

/// The last [`WINDOW`] bytes of output, to copy into checkpoints.
struct Ring {
    buf: Vec<u8>,
    pos: usize,
    filled: bool,
}

impl Ring {
    fn new() -> Self {
        Ring {
            buf: vec![0; WINDOW],
            pos: 0,
            filled: false,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= WINDOW {
            data = &data[data.len() - WINDOW..];
        }
        let first = data.len().min(WINDOW - self.pos);
        self.buf[self.pos..self.pos + first].copy_from_slice(&data[..first]);
        let rest = &data[first..];
        self.buf[..rest.len()].copy_from_slice(rest);
        let new_pos = self.pos + data.len();
        if new_pos >= WINDOW {
            self.filled = true;
        }
        self.pos = new_pos % WINDOW;
    }

    /// The last `len` bytes (at most WINDOW), oldest first.
    fn last(&self, len: usize) -> Vec<u8> {
        let len = len.min(WINDOW);
        let mut out = Vec::with_capacity(len);
        if self.pos >= len {
            out.extend_from_slice(&self.buf[self.pos - len..self.pos]);
        } else {
            let from_end = len - self.pos;
            out.extend_from_slice(&self.buf[WINDOW - from_end..]);
            out.extend_from_slice(&self.buf[..self.pos]);
        }
        out
    }
}

/// Decompresses a gzip layer and cuts spans at deflate block boundaries: a checkpoint (with
/// its window) once `spacing` compressed bytes have passed since the last one, and a
/// continuation span (no window) once `continuation` bytes have passed since the last cut.
pub struct GzipIndexer<R> {
    input: CompressedInput<R>,
    inflater: Inflater,
    ring: Ring,
    spacing: u64,
    /// 0: no continuation spans.
    continuation: u64,
    out_total: u64,
    member_out_start: u64,
    finished: bool,
}

impl<R: Read> GzipIndexer<R> {
    pub fn new(blob: R, spacing: u64, continuation: u64) -> io::Result<Self> {
        Ok(GzipIndexer {
            input: CompressedInput::new(blob)?,
            inflater: Inflater::new(Wrapper::Gzip).map_err(corrupt)?,
            ring: Ring::new(),
            spacing: spacing.max(1),
            continuation,
            out_total: 0,
            member_out_start: 0,
            finished: false,
        })
    }

    /// After a member's end: another member, zero padding, or the end of the blob.
    fn next_member(&mut self) -> io::Result<()> {
        loop {
            let available = self.input.available()?;
            if available.is_empty() {
                self.finished = true;
                return Ok(());
            }
            if available[0] == 0 {
                // Zero padding after the last member (some tools add it): only zeros may follow.
                let zeros = available.iter().take_while(|b| **b == 0).count();
                let all = zeros == available.len();
                self.input.consume(zeros);
                if !all {
                    return Err(corrupt(
                        "data after zero padding at the end of the gzip stream",
                    ));
                }
                continue;
            }
            if available.len() >= 2 && available[..2] != [0x1f, 0x8b] {
                return Err(corrupt(
                    "data after the end of the gzip stream is not a gzip member",
                ));
            }
            self.inflater.reset(Wrapper::Gzip).map_err(corrupt)?;
            self.member_out_start = self.out_total;
            // A member boundary needs no window: a fresh span is as cheap as a continuation.
            let cut_every = match self.continuation {
                0 => self.spacing,
                continuation => continuation.min(self.spacing),
            };
            if self.input.span_len() >= cut_every
                && self.out_total > self.input.span_uncompressed_start()
            {
                let at = self.out_total;
                self.input.cut(false, at, Resume::Fresh)?;
            }
            return Ok(());
        }
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.finished {
                return Ok(0);
            }
            let available = self.input.available()?;
            if available.is_empty() {
                return Err(corrupt("gzip stream is truncated"));
            }
            let step = self
                .inflater
                .inflate(available, out, true)
                .map_err(corrupt)?;
            self.input.consume(step.consumed);
            self.ring.push(&out[..step.produced]);
            self.out_total += step.produced as u64;
            if step.stream_end {
                self.next_member()?;
            } else if step.data_type & 128 != 0
                && step.data_type & 64 == 0
                && self.out_total > self.member_out_start
                && self.out_total > self.input.span_uncompressed_start()
            {
                let bits = (step.data_type & 7) as u8;
                let at = self.out_total;
                if self.input.since_checkpoint() >= self.spacing {
                    let window_len =
                        (self.out_total - self.member_out_start).min(WINDOW as u64) as usize;
                    let window = self.ring.last(window_len);
                    let resume = Resume::Deflate {
                        bits,
                        window: &window,
                    };
                    self.input.cut(bits > 0, at, resume)?;
                } else if self.continuation > 0 && self.input.span_len() >= self.continuation {
                    self.input.cut(bits > 0, at, Resume::Continue)?;
                }
            }
            if step.produced > 0 {
                return Ok(step.produced);
            }
            if step.consumed == 0 && !step.stream_end && step.data_type & 128 == 0 {
                // No progress although input and room were available.
                return Err(corrupt("gzip: inflate made no progress"));
            }
        }
    }
}

impl<R: Read + Send> Indexer for GzipIndexer<R> {
    fn finish(self: Box<Self>) -> io::Result<(Vec<Span>, WindowSpill)> {
        if !self.finished {
            return Err(corrupt("gzip stream not read to its end"));
        }
        Ok(self.input.finish())
    }
}

/// Inflates a run of spans from the first span's checkpoint.
pub fn resume(
    start: &SpanStart,
    window: &[u8],
    compressed: &[u8],
    want: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let (mut inflater, mut wrapper, mut input) = match start {
        SpanStart::Fresh | SpanStart::Chunk { .. } => (
            Inflater::new(Wrapper::Gzip).map_err(corrupt)?,
            Wrapper::Gzip,
            compressed,
        ),
        SpanStart::Deflate { bits, .. } => {
            let mut inflater = Inflater::new(Wrapper::Raw).map_err(corrupt)?;
            let mut input = compressed;
            if *bits > 0 {
                let first = *input.first().ok_or_else(|| corrupt("empty gzip span"))?;
                inflater
                    .prime(*bits, first >> (8 - bits))
                    .map_err(corrupt)?;
                input = &input[1..];
            }
            inflater.set_dictionary(window).map_err(corrupt)?;
            (inflater, Wrapper::Raw, input)
        }
        SpanStart::Continue => return Err(corrupt("a continuation span has no checkpoint")),
    };
    let mut buffer = vec![0u8; 256 << 10];
    let mut left = want;
    while left > 0 {
        let room = (left.min(buffer.len() as u64)) as usize;
        let step = inflater
            .inflate(input, &mut buffer[..room], false)
            .map_err(corrupt)?;
        input = &input[step.consumed..];
        if step.produced > 0 {
            sink(&buffer[..step.produced])?;
            left -= step.produced as u64;
        }
        if step.stream_end && left > 0 {
            if wrapper == Wrapper::Raw {
                // Raw inflate stops before the member's trailer (CRC32 and size).
                if input.len() < 8 {
                    return Err(corrupt("gzip span ends inside a member trailer"));
                }
                input = &input[8..];
            }
            wrapper = Wrapper::Gzip;
            inflater.reset(Wrapper::Gzip).map_err(corrupt)?;
            continue;
        }
        if step.produced == 0 && step.consumed == 0 {
            return Err(corrupt("gzip span ended before its uncompressed length"));
        }
    }
    Ok(())
}

/// Decompresses the one gzip member `compressed` holds (trailing bytes are refused), up to
/// `limit` output bytes.
pub fn inflate_member(compressed: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    let mut inflater = Inflater::new(Wrapper::Gzip).map_err(corrupt)?;
    let mut input = compressed;
    let mut output = Vec::new();
    let mut buffer = vec![0u8; 256 << 10];
    loop {
        let step = inflater
            .inflate(input, &mut buffer, false)
            .map_err(corrupt)?;
        input = &input[step.consumed..];
        output.extend_from_slice(&buffer[..step.produced]);
        if output.len() > limit {
            return Err(corrupt(format!(
                "a gzip member inflates past {limit} bytes"
            )));
        }
        if step.stream_end {
            break;
        }
        if step.produced == 0 && step.consumed == 0 {
            return Err(corrupt("a gzip member ends early"));
        }
    }
    if !input.is_empty() {
        return Err(corrupt("bytes follow the gzip member"));
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_bytes_in_order() {
        let mut ring = Ring::new();
        ring.push(b"abc");
        assert_eq!(ring.last(2), b"bc");
        let big: Vec<u8> = (0..(WINDOW + 100)).map(|i| (i % 251) as u8).collect();
        ring.push(&big);
        assert_eq!(ring.last(WINDOW), big[100..]);
        ring.push(b"xyz");
        let last = ring.last(5);
        assert_eq!(&last[2..], b"xyz");
        assert_eq!(last[..2], big[big.len() - 2..]);
    }
}
