//! Random access into a layer through its index: the spans a read needs are fetched with one
//! ranged GET per run of missing spans (several runs in flight), each span is checked against
//! its digest before anything is decompressed from it, and decompression starts at the first
//! span's checkpoint. Fetched spans stay in the [`cache::SpanCache`], so nothing is fetched twice,
//! and a run's whole output is available to callers that populate every file it covers.
//!
//! Why one file of this size: fetching, verifying and decompressing spans share the per-span locks,
//! the condemned spans and the recent-span cache.

pub mod cache;
mod keyed_locks;
mod recent;
mod verification;

use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::{StreamExt, TryStreamExt};
use lazylayer_source::ImageSource;

use self::cache::SpanCache;
pub use self::keyed_locks::{KeyedGuard, KeyedLocks};
pub use self::recent::InflatedFor;
use self::recent::RecentSpans;
pub use self::verification::Verification;
use crate::codec;
use crate::entry::{Entry, EntryKind, Piece};
use crate::format::{LayerIndex, SpanStart};
use crate::{Error, Result};

/// Compressed bytes a fetch of spans of an index from a table of contents reaches (see
/// [`LayerReader::read_ahead`]).
const READ_AHEAD: u64 = 1 << 20;
/// Ranged requests in flight at once for one read.
const MAX_IN_FLIGHT: usize = 4;
/// A span whose output is larger than this is never held in memory whole (a decompression
/// bomb): its bytes are streamed instead, from its checkpoint for each read. Below it, a large
/// span (a single-frame zstd layer) is decompressed once and kept, so that filling its files
/// one by one does not decompress it again and again.
pub const LARGE_SPAN_OUTPUT: u64 = 256 << 20;
/// Chunks of a streamed span in flight between the decompressor and the consumer.
const STREAM_CHUNKS: usize = 4;
/// Fetches of a span that did not match its digest before the span is given up on: the
/// registry (or the index) is wrong about it, and fetching it again would only repeat that.
pub const SPAN_ATTEMPTS: u32 = 3;

/// Counters of what a reader fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Compressed bytes fetched from the source.
    pub bytes_fetched: u64,
    /// Ranged requests made.
    pub requests: u64,
    /// Spans fetched.
    pub spans_fetched: u64,
}

/// Reads files of one layer lazily.
pub struct LayerReader {
    index: Arc<LayerIndex>,
    source: ImageSource,
    cache: SpanCache,
    bytes_fetched: AtomicU64,
    requests: AtomicU64,
    spans_fetched: AtomicU64,
    recent: Mutex<RecentSpans>,
    /// Spans whose output is larger are streamed (see [`LARGE_SPAN_OUTPUT`]).
    large_span_output: AtomicU64,
    /// One lock per span being fetched, so that concurrent reads needing the same span fetch
    /// it once (taken in ascending order: overlapping runs cannot deadlock).
    fetching: KeyedLocks<usize>,
    /// One lock per checkpoint whose spans are being inflated into [`Self::recent`], for the
    /// same reason (keyed by the checkpoint span).
    inflating: KeyedLocks<usize>,
    /// How many fetches of each span did not match its digest (see [`SPAN_ATTEMPTS`]).
    mismatches: Mutex<std::collections::HashMap<usize, u32>>,
    /// One lock per deflate window being fetched (keyed by its span), for the same reason as
    /// [`Self::fetching`].
    fetching_windows: KeyedLocks<usize>,
}

impl LayerReader {
    /// A reader of `index`'s layer from `source`, caching spans under `cache_dir`.
    pub fn new(index: Arc<LayerIndex>, source: ImageSource, cache_dir: &Path) -> Result<Self> {
        let cache = SpanCache::open(cache_dir, &index)?;
        Ok(LayerReader {
            index,
            source,
            cache,
            bytes_fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            spans_fetched: AtomicU64::new(0),
            recent: Mutex::new(RecentSpans::default()),
            large_span_output: AtomicU64::new(LARGE_SPAN_OUTPUT),
            fetching: KeyedLocks::default(),
            inflating: KeyedLocks::default(),
            mismatches: Mutex::new(std::collections::HashMap::new()),
            fetching_windows: KeyedLocks::default(),
        })
    }

    /// The first span given up on (it failed its digest [`SPAN_ATTEMPTS`] times), if any: the
    /// layer cannot be completed from this source.
    pub fn condemned_span(&self) -> Option<usize> {
        self.mismatches
            .lock()
            .expect("mismatches")
            .iter()
            .filter(|(_, n)| **n >= SPAN_ATTEMPTS)
            .map(|(i, _)| *i)
            .min()
    }

    fn is_condemned(&self, i: usize) -> bool {
        self.mismatches
            .lock()
            .expect("mismatches")
            .get(&i)
            .is_some_and(|n| *n >= SPAN_ATTEMPTS)
    }

    fn condemned(&self, i: usize) -> Error {
        let span = &self.index.spans[i];
        Error::SpanCondemned {
            layer: self.index.blob_digest.to_string(),
            span: i,
            start: span.compressed_start,
            end: span.compressed_end,
            attempts: SPAN_ATTEMPTS,
        }
    }

    /// The index.
    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// Counts `bytes` fetched for this layer before this reader existed (by the pull that
    /// indexed it, or an earlier daemon), so that [`stats`](Self::stats) covers every byte the
    /// registry served for the layer.
    pub fn count_earlier_fetches(&self, bytes: u64) {
        self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    /// What has been fetched so far.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            spans_fetched: self.spans_fetched.load(Ordering::Relaxed),
        }
    }

    /// How many spans are local.
    pub fn spans_present(&self) -> usize {
        self.cache.count()
    }

    /// Reads `len` bytes at `offset` of a regular file (short at the end of the file).
    pub async fn read(&self, entry: &Entry, offset: u64, len: u64) -> Result<Vec<u8>> {
        if entry.kind != EntryKind::File {
            return Err(Error::BadRead(format!(
                "{} is not a regular file",
                entry.display_path()
            )));
        }
        let pieces = entry.pieces(offset, len);
        let stored: Vec<Range<u64>> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Stored { stream_offset, len } => Some(*stream_offset..stream_offset + len),
                Piece::Zeros { .. } => None,
            })
            .collect();
        let mut out = Vec::with_capacity(pieces.iter().map(|p| piece_len(p) as usize).sum());
        let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
            out.resize(out.capacity(), 0);
            return Ok(out);
        };
        let span_range = (first.start, last.end);
        let data = self.read_uncompressed(span_range.0..span_range.1).await?;
        for piece in pieces {
            match piece {
                Piece::Stored { stream_offset, len } => {
                    let at = (stream_offset - span_range.0) as usize;
                    out.extend_from_slice(&data[at..at + len as usize]);
                }
                Piece::Zeros { len } => out.resize(out.len() + len as usize, 0),
            }
        }
        Ok(out)
    }

    /// Reads `range` of the uncompressed layer stream.
    pub async fn read_uncompressed(&self, range: Range<u64>) -> Result<Vec<u8>> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        if range.end > self.index.uncompressed_size {
            return Err(Error::BadRead(format!(
                "bytes {}..{} are past the end of the {}-byte layer",
                range.start, range.end, self.index.uncompressed_size
            )));
        }
        let first = self.index.span_at(range.start);
        let last = self.index.span_at(range.end - 1);
        self.ensure(first..=last).await?;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for i in first..=last {
            let span_start = self.index.spans[i].uncompressed_start;
            let from = range.start.max(span_start);
            let to = range.end.min(self.index.span_uncompressed_end(i));
            if self.is_large_span(i) {
                // Not held whole: only the wanted part is kept as it streams by.
                let mut chunks = self.stream_span(i, from..to).await?;
                while let Some(chunk) = chunks.recv().await {
                    out.extend_from_slice(&chunk?.1);
                }
                continue;
            }
            let output = self.span_output(i, InflatedFor::Reader).await?;
            out.extend_from_slice(
                &output[(from - span_start) as usize..(to - span_start) as usize],
            );
        }
        if out.len() as u64 != range.end - range.start {
            return Err(Error::BadRead(format!(
                "bytes {}..{}: {} bytes decompressed",
                range.start,
                range.end,
                out.len()
            )));
        }
        Ok(out)
    }

    /// The uncompressed output of span `i` (from memory if it was decompressed recently), for
    /// `whom`.
    pub async fn span_output(&self, i: usize, whom: InflatedFor) -> Result<Bytes> {
        if let Some(output) = self.recent_output(i) {
            return Ok(output);
        }
        // Files of one span, or of one checkpoint's continuation spans, filled at once inflate
        // it once: the others wait for it, then find their span's output kept.
        let _inflating = self.inflating.lock(self.index.checkpoint_of(i)).await;
        self.inflate_and_keep(i, whom).await
    }

    /// The bytes of inflated output held in memory for reads to come (see [`InflatedFor`]).
    pub fn recent_bytes(&self) -> usize {
        self.recent.lock().expect("recent spans").bytes()
    }

    fn recent_output(&self, i: usize) -> Option<Bytes> {
        self.recent.lock().expect("recent spans").output(i)
    }

    /// Inflates span `i` and keeps its output; a continuation span is inflated from its
    /// checkpoint, and the output of the local continuation spans after it is kept too (up to
    /// what `whom` may keep), so that filling a layer in order inflates each span once. The
    /// spans kept are slices of the one buffer inflated (copies of them held the output twice
    /// over for a moment, up to [`InflatedFor::kept_bytes`] more at the worker's peak); so a
    /// buffer lives until the last of its spans leaves the cache: about one buffer beyond that
    /// bound at most.
    async fn inflate_and_keep(&self, i: usize, whom: InflatedFor) -> Result<Bytes> {
        if let Some(output) = self.recent_output(i) {
            return Ok(output);
        }
        let index = &self.index;
        let output_of =
            |j: usize| index.span_uncompressed_end(j) - index.spans[j].uncompressed_start;
        let mut last = i;
        let mut kept = output_of(i);
        while last + 1 < index.spans.len()
            && index.spans[last + 1].start == SpanStart::Continue
            && self.cache.has(last + 1)
            && kept + output_of(last + 1) <= whom.kept_bytes() as u64
        {
            last += 1;
            kept += output_of(last);
        }
        let from = index.spans[i].uncompressed_start;
        let output = Bytes::from(self.decompress_keeping(i..=last, from).await?);
        let mut outputs = Vec::with_capacity(last - i + 1);
        for j in i..=last {
            let at = (index.spans[j].uncompressed_start - from) as usize;
            let end = (index.span_uncompressed_end(j) - from) as usize;
            outputs.push((j, output.slice(at..end)));
        }
        drop(output);
        let first = outputs[0].1.clone();
        self.recent
            .lock()
            .expect("recent spans")
            .keep(outputs, whom);
        Ok(first)
    }

    /// Whether span `i`'s output is too large to hold in memory whole (see
    /// [`LARGE_SPAN_OUTPUT`]): read it with [`LayerReader::stream_span`].
    pub fn is_large_span(&self, i: usize) -> bool {
        self.index.span_uncompressed_end(i) - self.index.spans[i].uncompressed_start
            > self.large_span_output.load(Ordering::Relaxed)
    }

    /// Changes the size above which spans are streamed (tests make it small, to exercise
    /// streaming on small layers).
    pub fn set_large_span_output(&self, bytes: u64) {
        self.large_span_output.store(bytes, Ordering::Relaxed);
    }

    /// Decompresses span `i` from its checkpoint and delivers the bytes of `range` (offsets in
    /// the uncompressed stream, inside the span) in order, as (offset, bytes) chunks, with only
    /// a few chunks in memory at a time. An error ends the stream.
    pub async fn stream_span(
        &self,
        i: usize,
        range: Range<u64>,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<(u64, Vec<u8>)>>> {
        let index = &self.index;
        let span = index
            .spans
            .get(i)
            .ok_or_else(|| Error::BadRead(format!("no span {i}")))?;
        let span_start = span.uncompressed_start;
        if range.start < span_start || range.end > index.span_uncompressed_end(i) {
            return Err(Error::BadRead(format!(
                "bytes {}..{} are not inside span {i}",
                range.start, range.end
            )));
        }
        self.ensure(i..=i).await?;
        // A continuation span streams from its checkpoint; what comes before `range` is
        // passed over.
        let checkpoint = index.checkpoint_of(i);
        let checkpoint_start = index.spans[checkpoint].uncompressed_start;
        let compressed = self.load_verified(
            checkpoint,
            i,
            index.spans[checkpoint].compressed_start,
            span.compressed_end,
        )?;
        let plan = index.run_plan(checkpoint, i)?;
        let compression = index.compression;
        let layer = index.blob_digest.to_string();
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        tokio::task::spawn_blocking(move || {
            let mut position = checkpoint_start;
            let result = codec::resume_run(
                compression,
                &plan,
                &compressed,
                range.end - checkpoint_start,
                &mut |chunk| {
                    let chunk_start = position;
                    position += chunk.len() as u64;
                    let from = range.start.max(chunk_start);
                    let to = range.end.min(position);
                    if from < to {
                        let bytes = chunk
                            [(from - chunk_start) as usize..(to - chunk_start) as usize]
                            .to_vec();
                        sender
                            .blocking_send(Ok((from, bytes)))
                            .map_err(|_| std::io::Error::other("the reader went away"))?;
                    }
                    Ok(())
                },
            );
            if let Err(e) = result {
                let _ = sender.blocking_send(Err(Error::BadLayer {
                    layer,
                    reason: format!("span {i} does not decompress: {e}"),
                }));
            }
        });
        Ok(receiver)
    }

    /// Decompresses a run of spans (from the first one's checkpoint); returns the
    /// uncompressed offset of the output and the output, which covers every file byte in
    /// those spans.
    pub async fn decompress(&self, spans: RangeInclusive<usize>) -> Result<(u64, Vec<u8>)> {
        let (first, last) = (*spans.start(), *spans.end());
        if last >= self.index.spans.len() || first > last {
            return Err(Error::BadRead(format!("no spans {first}..={last}")));
        }
        let output_start = self.index.spans[self.index.checkpoint_of(first)].uncompressed_start;
        let output = self.decompress_keeping(first..=last, output_start).await?;
        Ok((output_start, output))
    }

    /// Decompresses spans `spans` from the first one's checkpoint and returns their output
    /// from uncompressed offset `from` on (what comes before is passed over, not held).
    async fn decompress_keeping(&self, spans: RangeInclusive<usize>, from: u64) -> Result<Vec<u8>> {
        let index = &self.index;
        let first = index.checkpoint_of(*spans.start());
        let last = *spans.end();
        self.ensure(spans).await?;
        let start = index.spans[first].compressed_start;
        let end = index.spans[last].compressed_end;
        let compressed = self.load_verified(first, last, start, end)?;
        let plan = index.run_plan(first, last)?;
        let output_start = index.spans[first].uncompressed_start;
        let want = index.span_uncompressed_end(last) - output_start;
        let skip = from.saturating_sub(output_start).min(want);
        let compression = index.compression;
        let layer = index.blob_digest.to_string();
        let output = tokio::task::spawn_blocking(move || {
            let mut output = Vec::with_capacity((want - skip) as usize);
            let mut position = 0u64;
            codec::resume_run(compression, &plan, &compressed, want, &mut |chunk| {
                let chunk_start = position;
                position += chunk.len() as u64;
                if position > skip {
                    output.extend_from_slice(&chunk[skip.saturating_sub(chunk_start) as usize..]);
                }
                Ok(())
            })
            .map(|()| output)
        })
        .await
        .map_err(|e| Error::BadRead(format!("decompression task failed: {e}")))?
        .map_err(|e| Error::BadLayer {
            layer,
            reason: format!("spans {first}..={last} do not decompress: {e}"),
        })?;
        Ok(output)
    }

    /// Reads spans `first..=last` from the cache, checking each against its digest again;
    /// a span that fails is forgotten (to be fetched again) and the read fails.
    fn load_verified(&self, first: usize, last: usize, start: u64, end: u64) -> Result<Vec<u8>> {
        let bytes = self.cache.load(start, end)?;
        for i in first..=last {
            let span = &self.index.spans[i];
            let slice = &bytes
                [(span.compressed_start - start) as usize..(span.compressed_end - start) as usize];
            if !span.holds(self.index.compression, slice) {
                self.cache.forget(i)?;
                return Err(self.mismatch(i));
            }
        }
        Ok(bytes)
    }

    fn mismatch(&self, i: usize) -> Error {
        let span = &self.index.spans[i];
        Error::SpanMismatch {
            layer: self.index.blob_digest.to_string(),
            span: i,
            start: span.compressed_start,
            end: span.compressed_end,
        }
    }

    /// Fetches the spans of `spans` that are not local: one ranged GET per run of missing
    /// spans, several in flight, each span verified before it is stored.
    pub async fn ensure(&self, spans: RangeInclusive<usize>) -> Result<()> {
        self.ensure_set(spans).await
    }

    /// Like [`ensure`](Self::ensure) for any set of spans: missing spans that follow each
    /// other in `spans`, in ascending order, are fetched together, the runs concurrently and
    /// started in the order of `spans` (the caller puts what is needed first first).
    pub async fn ensure_set(&self, spans: impl IntoIterator<Item = usize>) -> Result<()> {
        let mut runs: Vec<RangeInclusive<usize>> = Vec::new();
        // A continuation span is read from its checkpoint: those before it are needed too.
        // Walking back stops at a span already taken, so a long run of spans costs each span
        // once, however long the chains an index (perhaps hostile) makes.
        let mut seen = std::collections::HashSet::new();
        let mut needed: Vec<usize> = Vec::new();
        for i in spans {
            if i >= self.index.spans.len() {
                return Err(Error::BadRead(format!("no span {i}")));
            }
            let mut back = Vec::new();
            let mut j = i;
            while seen.insert(j) {
                back.push(j);
                if j == 0 || self.index.spans[j].start != SpanStart::Continue {
                    break;
                }
                j -= 1;
            }
            needed.extend(back.into_iter().rev());
        }
        for &i in &needed {
            if self.cache.has(i) {
                continue;
            }
            if self.is_condemned(i) {
                return Err(self.condemned(i));
            }
            match runs.last_mut() {
                Some(run) if *run.end() + 1 == i => *run = *run.start()..=i,
                _ => runs.push(i..=i),
            }
        }
        if self.index.from_toc() {
            runs = runs.into_iter().map(|run| self.read_ahead(run)).collect();
        }
        // The windows of the checkpoints decompression starts from, if an index fetched head
        // first does not have them yet: fetched alongside the spans (they are small).
        let mut fetches = Vec::with_capacity(runs.len());
        for &j in &needed {
            if !self.index.window_is_local(j) {
                fetches.push(Either::Left(self.fetch_window(j)));
            }
        }
        for run in runs {
            fetches.push(Either::Right(self.fetch_run(run)));
        }
        futures_util::stream::iter(fetches)
            .buffer_unordered(MAX_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Fetches every window not local yet with one ranged GET (from the first missing one to
    /// the last), for a caller about to fill the whole layer: one request, not one per
    /// checkpoint as reads reach them.
    pub async fn fetch_missing_windows(&self) -> Result<()> {
        let missing = self.index.spans_missing_windows();
        let (Some(&first), Some(&last)) = (missing.first(), missing.last()) else {
            return Ok(());
        };
        let (Some(windows), Some(start), Some(end)) = (
            self.index.windows_source(),
            self.index.window_range(first),
            self.index.window_range(last),
        ) else {
            return Err(Error::WindowMissing {
                layer: self.index.blob_digest.to_string(),
                span: first,
            });
        };
        let (start, end) = (start.start, end.end);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = self.source.read_range(&windows.blob, start..end).await?;
        self.bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        for i in missing {
            let range = self.index.window_range(i).expect("a span with a window");
            let packed = bytes
                .get((range.start - start) as usize..(range.end - start) as usize)
                .ok_or_else(|| {
                    Error::BadRead(format!("the windows fetched end before span {i}'s"))
                })?;
            self.index.put_window(i, packed)?;
        }
        Ok(())
    }

    /// Fetches span `i`'s deflate window from the index blob its index names, checks it
    /// against its digest and keeps it in the index file (unless another read is fetching it:
    /// this one waits for that).
    async fn fetch_window(&self, i: usize) -> Result<()> {
        let _fetching = self.fetching_windows.lock(i).await;
        if self.index.window_is_local(i) {
            return Ok(());
        }
        let (Some(windows), Some(range)) =
            (self.index.windows_source(), self.index.window_range(i))
        else {
            return Err(Error::WindowMissing {
                layer: self.index.blob_digest.to_string(),
                span: i,
            });
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let packed = self.source.read_range(&windows.blob, range).await?;
        self.bytes_fetched
            .fetch_add(packed.len() as u64, Ordering::Relaxed);
        self.index.put_window(i, &packed)
    }

    /// `run` extended over the missing spans after it, up to [`READ_AHEAD`] compressed bytes:
    /// an index from a table of contents has a span per chunk, and most files are one small
    /// chunk, so fetching only the span asked for would cost a round trip per file.
    fn read_ahead(&self, run: RangeInclusive<usize>) -> RangeInclusive<usize> {
        let spans = &self.index.spans;
        let start = spans[*run.start()].compressed_start;
        let mut end = *run.end();
        while end + 1 < spans.len()
            && spans[end + 1].compressed_end - start <= READ_AHEAD
            && !self.cache.has(end + 1)
            && !self.is_condemned(end + 1)
        {
            end += 1;
        }
        *run.start()..=end
    }

    /// Once every span is local: checks the whole blob against its digest, end to end, and
    /// rebuilds the index from it to check that the index in use (perhaps from a registry)
    /// says exactly what the verified blob says: spans, file table, diff_id.
    pub async fn verify_complete(&self) -> Result<()> {
        self.ensure(0..=self.index.spans.len() - 1).await?;
        self.start_verification()?.finish().await
    }

    /// Starts the check of [`verify_complete`](Self::verify_complete) now, before the spans
    /// are all local: it follows them as they arrive and ends once the last is in. It fetches
    /// nothing (see [`Verification`]).
    pub fn start_verification(&self) -> Result<Verification> {
        Verification::start(
            self.index.clone(),
            self.cache.data_path(),
            self.cache.presence(),
        )
    }

    /// Fetches a run of spans, unless another read is fetching (some of) them: it waits for
    /// that one and fetches only what is still missing. Each span is released to readers
    /// waiting for it as soon as it has arrived and matched its digest, not when the run ends.
    async fn fetch_run(&self, run: RangeInclusive<usize>) -> Result<()> {
        // In ascending order, so that overlapping runs cannot deadlock.
        let mut guards = Vec::with_capacity(run.clone().count());
        for i in run.clone() {
            guards.push(Some(self.fetching.lock(i).await));
        }
        let first = *run.start();
        let mut result = Ok(());
        let mut i = first;
        while i <= *run.end() && result.is_ok() {
            if self.cache.has(i) {
                guards[i - first] = None;
                i += 1;
                continue;
            }
            let mut end = i;
            while end < *run.end() && !self.cache.has(end + 1) {
                end += 1;
            }
            result = self
                .fetch_missing(i..=end, &mut guards[i - first..=end - first])
                .await;
            i = end + 1;
        }
        drop(guards);
        result
    }

    /// One ranged GET for `run`; each span is checked and stored as soon as its last byte has
    /// arrived, and its lock in `guards` (one per span of the run) released.
    async fn fetch_missing<G: Send>(
        &self,
        run: RangeInclusive<usize>,
        guards: &mut [Option<G>],
    ) -> Result<()> {
        let (first, last) = (*run.start(), *run.end());
        let start = self.index.spans[first].compressed_start;
        let end = self.index.spans[last].compressed_end;
        self.requests.fetch_add(1, Ordering::Relaxed);
        // Only the span arriving is held: the bytes of each span stored are let go.
        let mut bytes: Vec<u8> = Vec::new();
        let mut held_from = start;
        let mut next = first;
        let mut refused: Option<Error> = None;
        let mut sink = |piece: &[u8]| -> std::result::Result<(), lazylayer_source::Error> {
            self.bytes_fetched
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
            bytes.extend_from_slice(piece);
            let arrived = held_from + bytes.len() as u64;
            while next <= last && self.index.spans[next].compressed_end <= arrived {
                let span = &self.index.spans[next];
                let slice = &bytes[(span.compressed_start - held_from) as usize
                    ..(span.compressed_end - held_from) as usize];
                if let Err(e) = self.accept_span(next, slice) {
                    let reason = e.to_string();
                    refused = Some(e);
                    return Err(lazylayer_source::Error::Protocol {
                        request: format!("span {next} of layer {}", self.index.blob_digest),
                        detail: reason,
                    });
                }
                guards[next - first] = None;
                next += 1;
            }
            // Spans of a gzip index may share a byte: what is let go ends where the next begins.
            if next <= last && self.index.spans[next].compressed_start > held_from {
                let next_start = self.index.spans[next].compressed_start;
                bytes.drain(..((next_start - held_from) as usize).min(bytes.len()));
                held_from = next_start;
            }
            Ok(())
        };
        let outcome = self
            .source
            .read_range_progressively(&self.index.blob_digest, start..end, &mut sink)
            .await;
        match (outcome, refused) {
            (_, Some(refusal)) => Err(refusal),
            (Err(e), None) => Err(e.into()),
            (Ok(()), None) => Ok(()),
        }
    }

    /// Checks span `i`'s bytes against its digest and keeps them; a span that failed its
    /// digest [`SPAN_ATTEMPTS`] times is condemned.
    fn accept_span(&self, i: usize, slice: &[u8]) -> Result<()> {
        let span = &self.index.spans[i];
        if !span.holds(self.index.compression, slice) {
            let mut mismatches = self.mismatches.lock().expect("mismatches");
            let count = mismatches.entry(i).or_insert(0);
            *count += 1;
            return Err(if *count >= SPAN_ATTEMPTS {
                self.condemned(i)
            } else {
                self.mismatch(i)
            });
        }
        self.cache.store(i, span.compressed_start, slice)?;
        self.spans_fetched.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn piece_len(piece: &Piece) -> u64 {
    match piece {
        Piece::Stored { len, .. } | Piece::Zeros { len } => *len,
    }
}
