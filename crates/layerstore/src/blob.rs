//! The `blob` file: the compressed layer, read by ranged requests to the registry and served
//! only once verified. The layer's index splits the blob into spans, each with its sha256;
//! a read fetches the spans it touches (and a few after them: containers/storage reads the
//! blob front to back for `podman push` and `podman save`), checks every span against its
//! digest and answers from the checked bytes. Nothing is cached on disk: a detached layer
//! keeps its tree, not its blob.

use std::ops::Range;

use bytes::Bytes;
use lazylayer_index::Span;
use sha2::{Digest as _, Sha256};

/// Compressed bytes fetched at least per request (read-ahead for sequential readers).
pub const READ_AHEAD: u64 = 8 << 20;
/// The most compressed bytes one read fetches and holds (a span larger than this, as a
/// single-frame zstd layer has, is not served).
pub const MAX_RUN: u64 = 256 << 20;

/// The spans (first and last, inclusive) holding the bytes `range` of the blob, extended
/// forwards to about [`READ_AHEAD`] bytes; `None` for an empty range or one past the end.
pub fn spans_for(spans: &[Span], range: Range<u64>) -> Option<(usize, usize)> {
    if range.is_empty() {
        return None;
    }
    let first = spans.partition_point(|s| s.compressed_end <= range.start);
    if first == spans.len() {
        return None;
    }
    let mut last = first;
    while last + 1 < spans.len()
        && (spans[last].compressed_end < range.end
            || spans[last].compressed_end - spans[first].compressed_start < READ_AHEAD)
    {
        last += 1;
    }
    Some((first, last))
}

/// Checks the fetched bytes of spans `first..=last` (starting at the first span's start)
/// against their digests: the number of the first span that does not match, if one does not.
pub fn check_spans(spans: &[Span], first: usize, last: usize, bytes: &[u8]) -> Result<(), usize> {
    let start = spans[first].compressed_start;
    for (i, span) in spans.iter().enumerate().take(last + 1).skip(first) {
        let from = (span.compressed_start - start) as usize;
        let to = (span.compressed_end - start) as usize;
        let Some(slice) = bytes.get(from..to) else {
            return Err(i);
        };
        if <[u8; 32]>::from(Sha256::digest(slice)) != span.digest {
            return Err(i);
        }
    }
    Ok(())
}

/// A run of verified blob bytes.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The blob offset of the first byte.
    pub start: u64,
    /// The bytes.
    pub bytes: Bytes,
}

impl Verified {
    /// The bytes `range`, if this run holds all of them.
    pub fn slice(&self, range: Range<u64>) -> Option<Bytes> {
        let end = self.start + self.bytes.len() as u64;
        if range.start < self.start || range.end > end || range.is_empty() {
            return None;
        }
        let from = (range.start - self.start) as usize;
        let to = (range.end - self.start) as usize;
        Some(self.bytes.slice(from..to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_index::SpanStart;

    /// Spans of `sizes` bytes over `blob`, with their digests.
    fn spans(blob: &[u8], sizes: &[u64]) -> Vec<Span> {
        let mut start = 0;
        sizes
            .iter()
            .map(|size| {
                let end = start + size;
                let span = Span {
                    compressed_start: start,
                    compressed_end: end,
                    uncompressed_start: 0,
                    digest: Sha256::digest(&blob[start as usize..end as usize]).into(),
                    start: SpanStart::Fresh,
                };
                start = end;
                span
            })
            .collect()
    }

    #[test]
    fn a_read_takes_the_spans_it_touches_and_reads_ahead() {
        let mb = 1 << 20;
        let blob = vec![7u8; (20 * mb) as usize];
        let spans = spans(&blob, &[4 * mb; 5]);
        // Within the first span: read ahead to 8 MiB (two spans).
        assert_eq!(spans_for(&spans, 0..4096), Some((0, 1)));
        // Across a boundary, far from the end.
        assert_eq!(spans_for(&spans, 4 * mb - 1..4 * mb + 1), Some((0, 1)));
        assert_eq!(spans_for(&spans, 17 * mb..20 * mb), Some((4, 4)));
        // Larger than the read-ahead: every span touched.
        assert_eq!(spans_for(&spans, 0..13 * mb), Some((0, 3)));
        assert_eq!(spans_for(&spans, 20 * mb..20 * mb + 5), None);
        assert_eq!(spans_for(&spans, 5..5), None);
    }

    #[test]
    fn only_matching_bytes_pass() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let spans = spans(&blob, &[3000, 3000, 4000]);
        assert_eq!(check_spans(&spans, 0, 2, &blob), Ok(()));
        assert_eq!(check_spans(&spans, 1, 2, &blob[3000..]), Ok(()));
        let mut lying = blob.clone();
        lying[6500] ^= 1;
        assert_eq!(check_spans(&spans, 0, 2, &lying), Err(2));
        // A short answer is a mismatch, not a panic.
        assert_eq!(check_spans(&spans, 0, 2, &blob[..9000]), Err(2));
    }

    #[test]
    fn verified_runs_answer_what_they_hold() {
        let run = Verified {
            start: 100,
            bytes: Bytes::from_static(b"0123456789"),
        };
        assert_eq!(run.slice(102..105).as_deref(), Some(&b"234"[..]));
        assert_eq!(run.slice(108..110).as_deref(), Some(&b"89"[..]));
        assert_eq!(run.slice(108..200), None);
        assert_eq!(run.slice(99..105), None);
        assert_eq!(run.slice(110..120), None);
    }
}
