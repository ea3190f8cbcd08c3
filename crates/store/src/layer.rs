//! One layer in the store: its directory, index, population state, and the work of filling a
//! file with its data (coalesced: concurrent requests for one file do the work once).

use std::path::Path;
use std::sync::Arc;

use lazylayer_index::{EntryKind, InflatedFor, KeyedLocks, LayerIndex, LayerReader};
use lazylayer_source::{Digest, ImageSource};

use crate::state::{LayerRecord, Phase, PopulationState};
use crate::tree::LayerTree;
use crate::{Error, Result};

/// A layer whose directory exists, ready to be populated.
pub struct Layer {
    /// The layer blob digest.
    pub digest: Digest,
    /// The index the tree was built from.
    pub index: Arc<LayerIndex>,
    /// The layer directory.
    pub tree: LayerTree,
    state: PopulationState,
    reader: LayerReader,
    record_path: std::path::PathBuf,
    /// How the layer is served while lazy (fixed when its tree was made).
    mode: crate::FrontendMode,
    /// One lock per file being filled.
    in_flight: KeyedLocks<usize>,
    /// Check each file's tar headers against its entry before its data is written (for an
    /// index nobody vouches for: see `lazylayer_index::check`); a mismatch fails the layer for
    /// good ([`Layer::proven_wrong`]).
    checks_headers: bool,
    /// Why the index proved wrong, once it has.
    proven_wrong: std::sync::Mutex<Option<String>>,
    /// Held while the record is read and written again, so that two writers in this process
    /// never undo each other's phase.
    record_lock: std::sync::Mutex<()>,
}

impl Layer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        digest: Digest,
        index: Arc<LayerIndex>,
        tree: LayerTree,
        state_path: &Path,
        record_path: &Path,
        source: ImageSource,
        span_dir: &Path,
        checks_headers: bool,
    ) -> Result<Self> {
        let state = PopulationState::open(state_path, index.entries.len())?;
        let reader = LayerReader::new(index.clone(), source, span_dir)?;
        let record = LayerRecord::load(record_path)?;
        if let Some(record) = &record {
            reader.count_earlier_fetches(record.bytes_fetched);
        }
        Ok(Layer {
            digest,
            index,
            tree,
            state,
            reader,
            record_path: record_path.to_path_buf(),
            mode: record.map(|r| r.mode).unwrap_or_default(),
            in_flight: KeyedLocks::default(),
            checks_headers,
            proven_wrong: std::sync::Mutex::new(None),
            record_lock: std::sync::Mutex::new(()),
        })
    }

    /// Why the layer's index proved wrong (a file's tar header disagrees with its entry), if
    /// it did: the layer is recorded failed, and no more of its files are filled.
    pub fn proven_wrong(&self) -> Option<String> {
        self.proven_wrong.lock().expect("proven wrong").clone()
    }

    /// The reader (span fetches, stats).
    pub fn reader(&self) -> &LayerReader {
        &self.reader
    }

    /// Whether entry `i` needs no more data: populated, or not a file with stored bytes.
    pub fn is_populated(&self, i: usize) -> bool {
        let entry = &self.index.entries[i];
        entry.kind != EntryKind::File || entry.stored_size() == 0 || self.state.is_populated(i)
    }

    /// The entries that still need data, in stream order (the background order).
    pub fn pending_files(&self) -> Vec<usize> {
        let mut pending: Vec<usize> = (0..self.index.entries.len())
            .filter(|&i| !self.is_populated(i))
            .collect();
        pending.sort_by_key(|&i| self.index.entries[i].data_offset);
        pending
    }

    /// Files with data, and how many of them are populated.
    pub fn progress(&self) -> (usize, usize) {
        let files = self
            .index
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.stored_size() > 0)
            .count();
        (files, files - self.pending_files().len())
    }

    /// Writes entry `i`'s data into its placeholder, unless it is there already, for `whom`
    /// (which bounds the inflated output kept in memory). Concurrent calls for the same file
    /// wait for one another and the work is done once.
    pub async fn populate(&self, i: usize, whom: InflatedFor) -> Result<()> {
        if self.is_populated(i) {
            return Ok(());
        }
        let _filling = self.in_flight.lock(i).await;
        if self.is_populated(i) {
            return Ok(());
        }
        self.write_file(i, whom).await
    }

    async fn write_file(&self, i: usize, whom: InflatedFor) -> Result<()> {
        if let Some(reason) = self.proven_wrong() {
            return Err(Error::IndexProvenWrong(reason));
        }
        if self.checks_headers {
            self.check_header(i).await?;
        }
        let entry = &self.index.entries[i];
        // Stored segments: (file offset, length, stream offset).
        let mut segments = Vec::new();
        match &entry.sparse {
            None => segments.push((0, entry.size, entry.data_offset)),
            Some(map) => {
                let mut stream = entry.data_offset;
                for &(offset, len) in map {
                    segments.push((offset, len, stream));
                    stream += len;
                }
            }
        }
        let stored = entry.stored_size();
        let first = self.index.span_at(entry.data_offset);
        let last = self.index.span_at(entry.data_offset + stored - 1);
        self.reader.ensure(first..=last).await?;
        let file = self.tree.open_for_data(entry)?;
        for (file_offset, len, stream_offset) in segments {
            let end = stream_offset + len;
            let mut position = stream_offset;
            while position < end {
                let span = self.index.span_at(position);
                if self.reader.is_large_span(span) {
                    // Too large to hold whole: streamed into the file chunk by chunk.
                    let chunk_end = end.min(self.index.span_uncompressed_end(span));
                    let mut chunks = self.reader.stream_span(span, position..chunk_end).await?;
                    while let Some(chunk) = chunks.recv().await {
                        let (at, bytes) = chunk?;
                        if at != position {
                            return Err(lazylayer_index::Error::BadRead(format!(
                                "span {span} streamed bytes at {at}, expected {position}"
                            ))
                            .into());
                        }
                        self.tree.write_at(
                            &file,
                            entry,
                            file_offset + (position - stream_offset),
                            &bytes,
                        )?;
                        position += bytes.len() as u64;
                    }
                    if position != chunk_end {
                        return Err(lazylayer_index::Error::BadRead(format!(
                            "span {span} ended at {position}, before {chunk_end}"
                        ))
                        .into());
                    }
                    continue;
                }
                let output = self.reader.span_output(span, whom).await?;
                let span_start = self.index.spans[span].uncompressed_start;
                let chunk_end = end.min(self.index.span_uncompressed_end(span));
                let bytes =
                    &output[(position - span_start) as usize..(chunk_end - span_start) as usize];
                self.tree.write_at(
                    &file,
                    entry,
                    file_offset + (position - stream_offset),
                    bytes,
                )?;
                position = chunk_end;
            }
        }
        self.tree.finish_file(&file, entry)?;
        self.state.mark(i);
        Ok(())
    }

    /// Checks file `i`'s tar headers against its entry; a mismatch fails the layer for good.
    async fn check_header(&self, i: usize) -> Result<()> {
        use lazylayer_index::check::{HEADER_WINDOW, MAX_HEADER_WINDOW, check_file_header};
        let end = self.index.entries[i].data_offset;
        let mut window = HEADER_WINDOW;
        loop {
            let start = end.saturating_sub(window);
            let bytes = self.reader.read_uncompressed(start..end).await?;
            match check_file_header(&self.index, i, start, &bytes) {
                Ok(()) => return Ok(()),
                // The headers may reach further back than this window.
                Err(_) if start > 0 && window < MAX_HEADER_WINDOW => {
                    window = MAX_HEADER_WINDOW;
                }
                Err(reason) => {
                    let reason = format!(
                        "{} in the index: {reason}",
                        self.index.entries[i].display_path()
                    );
                    tracing::error!("layer {}: {reason}; the layer fails for good", self.digest);
                    *self.proven_wrong.lock().expect("proven wrong") = Some(reason.clone());
                    self.fail(&reason)?;
                    return Err(Error::IndexProvenWrong(reason));
                }
            }
        }
    }

    /// Makes the tree the pull left unsynced durable, then says so in the record (see
    /// [`LayerRecord::unsynced_in_boot`]); nothing to do for a tree synced already.
    pub fn make_tree_durable(&self) -> Result<()> {
        if LayerRecord::load(&self.record_path)?.is_none_or(|r| r.unsynced_in_boot.is_none()) {
            return Ok(());
        }
        self.tree.sync()?;
        let _record = self.record_lock.lock().expect("record lock");
        match LayerRecord::load(&self.record_path)? {
            Some(mut record) if record.unsynced_in_boot.is_some() => {
                record.unsynced_in_boot = None;
                record.save(&self.record_path)
            }
            _ => Ok(()),
        }
    }

    /// Makes populated data and then the record of it durable, and the count of bytes
    /// fetched for the layer with it. Fills may go on meanwhile: what they mark during the
    /// sync is recorded by the next call.
    pub fn persist(&self) -> Result<()> {
        self.state.persist(|| self.tree.sync())?;
        // The phase read and written again under the lock: a detach recorded meanwhile is
        // never undone.
        let _record = self.record_lock.lock().expect("record lock");
        self.record_phase(self.phase()?)
    }

    /// The layer's phase on disk.
    pub fn phase(&self) -> Result<Phase> {
        LayerRecord::load(&self.record_path)?
            .map(|r| r.phase)
            .ok_or_else(|| Error::Corrupt(format!("{} has no record", self.record_path.display())))
    }

    /// Records a new phase durably (a failed layer stays failed: see [`Layer::fail`]).
    pub fn set_phase(&self, phase: Phase) -> Result<()> {
        let _record = self.record_lock.lock().expect("record lock");
        self.record_phase(phase)
    }

    /// [`set_phase`](Self::set_phase), with the record lock held.
    fn record_phase(&self, phase: Phase) -> Result<()> {
        let failure = match LayerRecord::load(&self.record_path)? {
            Some(record) if record.phase == Phase::Failed => {
                if phase != Phase::Failed {
                    return Err(Error::Corrupt(format!(
                        "layer {} failed ({}); it cannot become {phase:?}",
                        self.digest,
                        record.failure.as_deref().unwrap_or("no reason recorded")
                    )));
                }
                record.failure
            }
            _ => None,
        };
        self.save_record(phase, failure)
    }

    /// Records durably that the layer's index proved wrong, and why: it is never served or
    /// mounted again (see [`Phase::Failed`]).
    pub fn fail(&self, reason: &str) -> Result<()> {
        let _record = self.record_lock.lock().expect("record lock");
        self.save_record(Phase::Failed, Some(reason.to_string()))
    }

    /// Writes the record; the caller holds the record lock.
    fn save_record(&self, phase: Phase, failure: Option<String>) -> Result<()> {
        LayerRecord {
            phase,
            entries: self.index.entries.len(),
            mode: self.mode()?,
            bytes_fetched: self.reader().stats().bytes_fetched,
            failure,
            // Every phase is recorded after a sync of the tree (`persist`), or says the layer
            // failed: the tree made by the pull is durable now, or no longer matters.
            unsynced_in_boot: None,
        }
        .save(&self.record_path)
    }

    /// How the layer is served while lazy.
    pub fn mode(&self) -> Result<crate::FrontendMode> {
        Ok(self.mode)
    }
}
