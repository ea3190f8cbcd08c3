//! One layer in the store: its directory, index, population state, and the work of filling a
//! file with its data (coalesced: concurrent requests for one file do the work once).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use lazylayer_index::{EntryKind, LayerIndex, LayerReader};
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
    in_flight: std::sync::Mutex<HashMap<usize, Arc<tokio::sync::Mutex<()>>>>,
}

impl Layer {
    pub(crate) fn new(
        digest: Digest,
        index: Arc<LayerIndex>,
        tree: LayerTree,
        state_path: &Path,
        record_path: &Path,
        source: ImageSource,
        span_dir: &Path,
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
            in_flight: std::sync::Mutex::new(HashMap::new()),
        })
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

    /// Writes entry `i`'s data into its placeholder, unless it is there already. Concurrent
    /// calls for the same file wait for one another and the work is done once.
    pub async fn populate(&self, i: usize) -> Result<()> {
        if self.is_populated(i) {
            return Ok(());
        }
        let lock = self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .entry(i)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _guard = lock.lock().await;
        if self.is_populated(i) {
            return Ok(());
        }
        let result = self.write_file(i).await;
        self.in_flight.lock().expect("in-flight lock").remove(&i);
        result
    }

    async fn write_file(&self, i: usize) -> Result<()> {
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
                let output = self.reader.span_output(span).await?;
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

    /// Makes populated data and then the record of it durable, and the count of bytes
    /// fetched for the layer with it.
    pub fn persist(&self) -> Result<()> {
        self.tree.sync()?;
        self.state.persist()?;
        self.set_phase(self.phase()?)
    }

    /// The layer's phase on disk.
    pub fn phase(&self) -> Result<Phase> {
        LayerRecord::load(&self.record_path)?
            .map(|r| r.phase)
            .ok_or_else(|| Error::Corrupt(format!("{} has no record", self.record_path.display())))
    }

    /// Records a new phase durably.
    pub fn set_phase(&self, phase: Phase) -> Result<()> {
        LayerRecord {
            phase,
            entries: self.index.entries.len(),
            mode: self.mode()?,
            bytes_fetched: self.reader().stats().bytes_fetched,
        }
        .save(&self.record_path)
    }

    /// How the layer is served while lazy.
    pub fn mode(&self) -> Result<crate::FrontendMode> {
        Ok(self.mode)
    }
}
