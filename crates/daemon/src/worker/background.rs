//! Background population: the scheduler that fills a layer to completion. A layer's profile
//! files first (not held back by the rate cap: a workload is about to need them), then every
//! file in stream order (a few at a time), keeping off the network while readers wait (demand
//! first), under the rate cap unless the layer is urgent, fetching ahead in runs of spans when
//! uncapped, and retrying failures with a growing pause. The check of the whole layer starts
//! with it and follows the spans as they arrive; the layer is detached once both are done.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lazylayer_index::InflatedFor;

use crate::error::LayerError;
use crate::worker::Worker;
use crate::worker::lifecycle::{LayerLife, Managed};

/// How long no reader must have waited before the background fetches (demand first).
pub const DEMAND_QUIET: Duration = Duration::from_millis(1500);

/// Compressed bytes fetched ahead of the current file in one ranged request when uncapped
/// (several checkpoint spans; spans may be as small as continuation spans).
const FETCH_AHEAD: u64 = 8 << 20;

/// Files filled at once in stream order.
const FILLS_AT_ONCE: usize = 4;

/// How often the stream makes what it filled durable (see [`Layer::persist`]): after a crash at
/// most this much filling is done again. The persist runs beside the fills, never in their way.
///
/// [`Layer::persist`]: lazylayer_store::Layer::persist
const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// The first pause after a failed fill; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the background does next for a layer, given the moment's facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Readers are waiting or just were: stay off the network a little longer.
    YieldToReaders,
    /// The rate cap is reached: wait this long.
    Throttle(Duration),
    /// Fill the next file.
    Fill,
}

/// The scheduler's decision: `urgent` layers (detach asked, or a stop) ignore readers and the
/// cap; others wait for [`DEMAND_QUIET`] without readers, then keep `fetched` bytes under
/// `rate` bytes per second since `elapsed`.
pub fn next_step(
    urgent: bool,
    quiet_for: Duration,
    rate: Option<u64>,
    fetched: u64,
    elapsed: Duration,
) -> Step {
    if urgent {
        return Step::Fill;
    }
    if quiet_for < DEMAND_QUIET {
        return Step::YieldToReaders;
    }
    if let Some(rate) = rate {
        let allowed = Duration::from_secs_f64(fetched as f64 / rate.max(1) as f64);
        if let Some(wait) = allowed.checked_sub(elapsed) {
            return Step::Throttle(wait.min(Duration::from_secs(1)));
        }
    }
    Step::Fill
}

/// Why the background stops before the layer is complete.
enum Stop {
    /// A span failed its digest on every fetch: nothing fetches it again, and readers of the
    /// files it holds get EIO at once. The layer fails in this worker only (the network may
    /// have corrupted it).
    Condemned(String),
    /// A file's tar header disagrees with the index: the layer fails for good.
    ProvenWrong(String),
}

impl Worker {
    /// Fills the profile's files first, then every file of the layer in stream order; then
    /// verifies and detaches it.
    pub(super) async fn populate_in_background(
        self: Arc<Self>,
        managed: Arc<Managed>,
        first: Vec<usize>,
    ) {
        // The pull left the tree for this process to sync, off the path to a usable image; a
        // reader never waits for it.
        let layer = managed.layer.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = layer.make_tree_durable() {
                tracing::warn!("layer {}: syncing its tree: {e}", layer.digest);
            }
        });
        // The check of the whole layer follows the spans as they arrive, on another thread.
        let early_check = match managed.layer.reader().start_verification() {
            Ok(check) => Some(check),
            Err(e) => {
                tracing::warn!("layer {}: early check: {e}", managed.layer.digest);
                None
            }
        };
        let prefetch_failed = !self.prefetch_profile(&managed, first).await;
        managed.become_(LayerLife::Streaming);
        match self.stream(&managed, prefetch_failed).await {
            Ok(()) => {}
            Err(Stop::Condemned(reason)) => {
                tracing::error!("layer {}: {reason}", managed.layer.digest);
                managed.become_(LayerLife::Failed(reason));
                return;
            }
            Err(Stop::ProvenWrong(reason)) => {
                self.fail_for_good(&managed, reason).await;
                return;
            }
        }
        managed.become_(LayerLife::Verifying);
        match self.detach(&managed, early_check).await {
            Ok(()) => managed.become_(LayerLife::Detached),
            Err(e @ LayerError::Verify { .. }) => {
                // The index does not match the verified blob: what the tree shows may be a lie.
                tracing::error!("{e}; the layer fails for good");
                self.fail_for_good(&managed, e.to_string()).await;
            }
            Err(e) => {
                tracing::error!("{e}");
                managed.become_(LayerLife::Failed(e.to_string()));
            }
        }
    }

    /// The spans of every profile file in a few ranged requests, then the files; at the first
    /// failure the rest is left to the stream (which retries and reports). Whether all went well.
    async fn prefetch_profile(&self, managed: &Managed, first: Vec<usize>) -> bool {
        let layer = &managed.layer;
        // In the profile's order: what the workload waited for first is fetched first.
        let spans = layer.index.spans_of(&first);
        if let Err(e) = layer.reader().ensure_set(spans).await {
            // An outage, most likely: the stream fills these files in its turn, retrying with
            // growing pauses, and `status` shows the error meanwhile.
            tracing::warn!("layer {}: prefetching profile spans: {e}", layer.digest);
            managed.set_error(&e);
            return false;
        }
        // For the workload about to start: its files' spans are kept as a waiting reader's.
        for i in first {
            match layer.populate(i, InflatedFor::Reader).await {
                Ok(()) => self.demand.populated(layer, i),
                Err(e) => {
                    tracing::warn!("layer {}: prefetching a profile file: {e}", layer.digest);
                    managed.set_error(&e);
                    return false;
                }
            }
        }
        true
    }

    /// Every file not filled yet, in stream order; an error when the layer cannot be
    /// completed (see [`Stop`]). `recovering`: an error is shown that the first fill clears.
    async fn stream(&self, managed: &Managed, mut recovering: bool) -> Result<(), Stop> {
        let layer = &managed.layer;
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut prefetched = 0usize;
        // The first span and the task of a run fetched ahead of the fill.
        let mut ahead: Option<(usize, tokio::task::JoinHandle<bool>)> = None;
        let mut last_persist = Instant::now();
        let mut persisting: Option<tokio::task::JoinHandle<()>> = None;
        let mut queue: VecDeque<usize> = layer.pending_files().into();
        let mut windows_fetched = false;
        while let Some(&i) = queue.front() {
            if let Some(reason) = layer.proven_wrong() {
                return Err(Stop::ProvenWrong(reason));
            }
            let urgent = managed.urgent.load(Ordering::Relaxed);
            let fetched = layer.reader().stats().bytes_fetched;
            match next_step(
                urgent,
                self.demand.quiet_for(),
                self.options.background_rate,
                fetched,
                started.elapsed(),
            ) {
                Step::YieldToReaders => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Step::Throttle(wait) => {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Step::Fill => {}
            }
            if !windows_fetched && (self.options.background_rate.is_none() || urgent) {
                // An index fetched head first: its windows in one request now, rather than
                // one per checkpoint as the fill reaches them (a failure leaves that to do).
                // Capped, the fill fetches only what it needs next, windows included.
                windows_fetched = true;
                if let Err(e) = layer.reader().fetch_missing_windows().await {
                    tracing::warn!("layer {}: fetching the index's windows: {e}", layer.digest);
                }
            }
            // Fetch ahead in runs: one ranged GET covers several spans. Uncapped, about
            // FETCH_AHEAD bytes; capped, to the end of the checkpoint span (continuation spans
            // are small: a GET for each file's own would make the fill request-bound).
            let uncapped = self.options.background_rate.is_none() || urgent;
            let span = layer.index.span_at(layer.index.entries[i].data_offset);
            // A run fetched ahead that failed is fetched again here once the fill reaches it,
            // in the fill's way, with its retries and their pauses.
            if ahead
                .as_ref()
                .is_some_and(|(from, fetch)| span >= *from && fetch.is_finished())
                && let Some((from, fetch)) = ahead.take()
                && !fetch.await.unwrap_or(false)
            {
                prefetched = from;
            }
            if span >= prefetched {
                let last = fetch_run_end(&layer.index, span, uncapped);
                match layer.reader().ensure(span..=last).await {
                    Ok(()) => prefetched = last + 1,
                    // A span that never matches its digest: the fill below stops the layer.
                    Err(_) if layer.reader().condemned_span().is_some() => {}
                    Err(e) => {
                        retry_later(managed, "fetch", &e, &mut backoff).await;
                        continue;
                    }
                }
            }
            // Uncapped, the next run is fetched while this one is filled: once the fill has
            // reached the run fetched ahead and it has arrived (taken in above), the one after
            // it starts.
            if uncapped && prefetched < layer.index.spans.len() && ahead.is_none() {
                let (from, last) = (prefetched, fetch_run_end(&layer.index, prefetched, true));
                let layer = layer.clone();
                let fetch =
                    tokio::spawn(async move { layer.reader().ensure(from..=last).await.is_ok() });
                ahead = Some((from, fetch));
                prefetched = last + 1;
            }
            // Several files at once, on the runtime's threads: a layer of many small files is
            // bound by the system calls of each fill, not by inflating.
            let batch: Vec<usize> = queue.drain(..queue.len().min(FILLS_AT_ONCE)).collect();
            let fills: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let layer = managed.layer.clone();
                    tokio::spawn(async move { layer.populate(i, InflatedFor::Background).await })
                })
                .collect();
            let mut failure = None;
            let mut unfilled = Vec::new();
            for (&i, fill) in batch.iter().zip(fills) {
                let filled = match fill.await {
                    Ok(filled) => filled,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                match filled {
                    Ok(()) => {
                        self.demand.populated(layer, i);
                    }
                    Err(e) => {
                        unfilled.push(i);
                        failure.get_or_insert(e);
                    }
                }
            }
            // What failed is tried again first.
            for &i in unfilled.iter().rev() {
                queue.push_front(i);
            }
            match failure {
                None => {
                    if recovering || backoff > FIRST_BACKOFF {
                        // Recovered: the last error no longer describes the layer.
                        managed.clear_error();
                        recovering = false;
                    }
                    backoff = FIRST_BACKOFF;
                }
                Some(e) => {
                    if let Some(reason) = layer.proven_wrong() {
                        return Err(Stop::ProvenWrong(reason));
                    }
                    if layer.reader().condemned_span().is_some() {
                        return Err(Stop::Condemned(e.to_string()));
                    }
                    retry_later(managed, "fill", &e, &mut backoff).await;
                    continue;
                }
            }
            // A `syncfs` waits for everything written so far: on a thread of its own, so the
            // fills (and the disk's writeback of them) go on meanwhile.
            if last_persist.elapsed() >= PERSIST_EVERY
                && persisting.as_ref().is_none_or(|p| p.is_finished())
            {
                let layer = layer.clone();
                persisting = Some(tokio::task::spawn_blocking(move || {
                    if let Err(e) = layer.persist() {
                        tracing::error!("layer {}: persisting state: {e}", layer.digest);
                    }
                }));
                last_persist = Instant::now();
            }
        }
        if let Some(persist) = persisting {
            let _ = persist.await;
        }
        Ok(())
    }
}

/// The last span of the run one ranged GET fetches from span `first`: to the end of its
/// checkpoint's spans, and `uncapped` on to about [`FETCH_AHEAD`] bytes.
fn fetch_run_end(index: &lazylayer_index::LayerIndex, first: usize, uncapped: bool) -> usize {
    let spans = &index.spans;
    let mut last = index.checkpoint_span_end(first);
    if uncapped {
        let reach = spans[first].compressed_start + FETCH_AHEAD;
        while last + 1 < spans.len() && spans[last + 1].compressed_end <= reach {
            last += 1;
        }
    }
    last
}

/// After a failed background `step`: the error shown by `status` (kept there first: on a full
/// disk the log may not be written), logged, then a pause that doubles each time.
async fn retry_later(
    managed: &Managed,
    step: &str,
    error: &(dyn std::fmt::Display + Sync),
    backoff: &mut Duration,
) {
    managed.set_error(error);
    tracing::warn!(
        "layer {}: background {step}: {error}; retrying in {backoff:?}",
        managed.layer.digest
    );
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_secs(5);

    #[test]
    fn readers_come_first_unless_the_layer_is_urgent() {
        let busy = Duration::from_millis(100);
        assert_eq!(next_step(false, busy, None, 0, QUIET), Step::YieldToReaders);
        assert_eq!(next_step(true, busy, None, 0, QUIET), Step::Fill);
        assert_eq!(next_step(false, QUIET, None, 0, QUIET), Step::Fill);
    }

    #[test]
    fn the_rate_cap_holds_the_background_back_but_not_an_urgent_layer() {
        // 10 MB fetched in 5 s at 1 MB/s: 5 s ahead of the cap, waits at most 1 s at a time.
        let step = next_step(false, QUIET, Some(1_000_000), 10_000_000, QUIET);
        assert_eq!(step, Step::Throttle(Duration::from_secs(1)));
        // 4 MB in 5 s at 1 MB/s is under the cap.
        assert_eq!(
            next_step(false, QUIET, Some(1_000_000), 4_000_000, QUIET),
            Step::Fill
        );
        assert_eq!(next_step(true, QUIET, Some(1), u64::MAX, QUIET), Step::Fill);
        // A cap of 0 is taken as 1 byte per second, not a division by zero.
        assert!(matches!(
            next_step(false, QUIET, Some(0), 100, QUIET),
            Step::Throttle(_)
        ));
    }
}
