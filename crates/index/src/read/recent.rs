//! The recent-span cache: inflated span output kept in memory, so that reads of neighbouring
//! files inflate a span once. How much stays depends on whom a span was inflated for: readers
//! that wait keep more than the background fill, which runs while the worker's memory peaks
//! and needs little but the spans it just inflated.

use std::collections::VecDeque;

use bytes::Bytes;

/// Spans kept at most (a checkpoint span followed by its continuation spans is inflated at
/// once: 16 or more).
const RECENT_SPANS: usize = 64;
/// Bytes kept at most, the newest span excepted (a 384 KiB checkpoint span of text inflates to
/// 1-2 MiB, a few of them at once). 8 MiB for every caller took the worker's peak 6-8 MiB
/// lower, but python's start at 1 Gbit/s looked a tenth slower (`lazylayer-bench populate` and
/// `startup`, docs/benchmarks.md): readers keep 16.
const RECENT_BYTES: usize = 16 << 20;
/// Bytes of the background fill's spans kept at most, its newest excepted: it fills files in
/// stream order. 4 MiB took the worker's peak while populating 10-12 MiB lower than 16 on every
/// image, with population time within the noise (`lazylayer-bench populate`). Only its own
/// spans are trimmed to this: those a reader waited for stay under [`RECENT_BYTES`].
const BACKGROUND_RECENT_BYTES: usize = 4 << 20;

/// Whom a span's output is inflated for: how much recently inflated output stays in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflatedFor {
    /// A reader that waits for it (a demand miss, a profile's files, a read through FUSE or
    /// the CLI).
    Reader,
    /// The background fill of the layer in stream order.
    Background,
}

impl InflatedFor {
    /// The most output of one inflation kept (a checkpoint's continuation spans are inflated
    /// with it up to this).
    pub fn kept_bytes(self) -> usize {
        match self {
            InflatedFor::Reader => RECENT_BYTES,
            InflatedFor::Background => BACKGROUND_RECENT_BYTES,
        }
    }
}

/// Recently inflated spans, oldest first.
#[derive(Default)]
pub struct RecentSpans {
    kept: VecDeque<Kept>,
}

struct Kept {
    span: usize,
    output: Bytes,
    whom: InflatedFor,
}

impl RecentSpans {
    /// Span `i`'s output, if it is kept.
    pub fn output(&self, i: usize) -> Option<Bytes> {
        self.kept
            .iter()
            .find(|k| k.span == i)
            .map(|k| k.output.clone())
    }

    /// The bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes_of(|_| true)
    }

    fn bytes_of(&self, which: impl Fn(&Kept) -> bool) -> usize {
        self.kept
            .iter()
            .filter(|k| which(k))
            .map(|k| k.output.len())
            .sum()
    }

    /// Keeps `outputs` (span, output) inflated for `whom`, then drops the oldest spans past
    /// the bounds: the background's own past [`BACKGROUND_RECENT_BYTES`], then any past
    /// [`RECENT_SPANS`] and [`RECENT_BYTES`].
    pub fn keep(&mut self, outputs: Vec<(usize, Bytes)>, whom: InflatedFor) {
        for (span, output) in outputs {
            if self.output(span).is_none() {
                self.kept.push_back(Kept { span, output, whom });
            }
        }
        // The background's own first, so that its spans never push out a reader's.
        let background = |k: &Kept| k.whom == InflatedFor::Background;
        while self.kept.iter().filter(|k| background(k)).count() > 1
            && self.bytes_of(background) > BACKGROUND_RECENT_BYTES
        {
            let oldest = self.kept.iter().position(background).expect("counted");
            self.kept.remove(oldest);
        }
        while self.kept.len() > RECENT_SPANS || (self.kept.len() > 1 && self.bytes() > RECENT_BYTES)
        {
            self.kept.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(from: usize, count: usize, each: usize) -> Vec<(usize, Bytes)> {
        (from..from + count)
            .map(|i| (i, Bytes::from(vec![0u8; each])))
            .collect()
    }

    #[test]
    fn the_background_keeps_its_own_spans_small_and_never_evicts_a_readers() {
        let mut recent = RecentSpans::default();
        // A reader waited for 12 MiB of spans.
        recent.keep(spans(0, 12, 1 << 20), InflatedFor::Reader);
        // Then the background fills 40 MiB more.
        for i in 100..140 {
            recent.keep(spans(i, 1, 1 << 20), InflatedFor::Background);
        }
        for i in 0..12 {
            assert!(
                recent.output(i).is_some(),
                "a reader's span {i} was dropped"
            );
        }
        assert_eq!(
            recent.bytes(),
            16 << 20,
            "12 MiB of the reader's, 4 of the background's"
        );
        assert!(recent.output(139).is_some() && recent.output(135).is_none());
        // Readers stay under their own bound, the oldest first.
        recent.keep(spans(200, 10, 1 << 20), InflatedFor::Reader);
        assert!(recent.bytes() <= 16 << 20);
        assert!(recent.output(0).is_none() && recent.output(209).is_some());
    }

    #[test]
    fn the_newest_span_is_kept_however_large() {
        let mut recent = RecentSpans::default();
        recent.keep(spans(0, 1, 40 << 20), InflatedFor::Background);
        assert!(recent.output(0).is_some());
        recent.keep(spans(1, 1, 40 << 20), InflatedFor::Reader);
        assert!(recent.output(0).is_none() && recent.output(1).is_some());
    }
}
