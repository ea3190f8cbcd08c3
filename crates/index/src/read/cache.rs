//! The span cache: verified compressed spans of one layer blob, kept on disk at their blob
//! offsets in a sparse file, with one byte per span saying it is present. A span is checked
//! against its digest again whenever it is read back, so a torn write or a crash can cost a
//! re-fetch, never a wrong byte.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::format::LayerIndex;
use crate::{Error, Result};

/// The on-disk cache of one layer's spans.
pub struct SpanCache {
    data_path: std::path::PathBuf,
    data: File,
    marks: File,
    present: SpanPresence,
    what: String,
}

impl SpanCache {
    /// Opens (or creates) the cache for `index`'s blob under `dir`.
    pub fn open(dir: &Path, index: &LayerIndex) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let hex = index.blob_digest.hex();
        let data_path = dir.join(format!("{hex}.spans"));
        let marks_path = dir.join(format!("{hex}.present"));
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))
        };
        let data = open(&data_path)?;
        let marks = open(&marks_path)?;
        data.set_len(index.blob_size)
            .map_err(|e| Error::io(format!("sizing {}", data_path.display()), e))?;
        let mut present = vec![0u8; index.spans.len()];
        let on_disk = marks
            .metadata()
            .map_err(|e| Error::io("span marks", e))?
            .len();
        if on_disk == present.len() as u64 {
            marks
                .read_exact_at(&mut present, 0)
                .map_err(|e| Error::io(format!("reading {}", marks_path.display()), e))?;
        } else {
            marks
                .set_len(0)
                .and_then(|_| marks.set_len(present.len() as u64))
                .map_err(|e| Error::io(format!("resetting {}", marks_path.display()), e))?;
        }
        Ok(SpanCache {
            data_path: data_path.clone(),
            data,
            marks,
            present: SpanPresence(Arc::new(Mutex::new(
                present.iter().map(|b| *b == 1).collect(),
            ))),
            what: data_path.display().to_string(),
        })
    }

    /// The file holding the blob's bytes at their offsets.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Whether span `i` is believed present (it is verified again when read).
    pub fn has(&self, i: usize) -> bool {
        self.present.has(i)
    }

    /// A handle that tells which spans are present, for a reader of the cache file on another
    /// thread (the verification that follows the spans as they arrive).
    pub fn presence(&self) -> SpanPresence {
        self.present.clone()
    }

    /// How many spans are present.
    pub fn count(&self) -> usize {
        self.present
            .0
            .lock()
            .expect("cache lock")
            .iter()
            .filter(|p| **p)
            .count()
    }

    /// Stores verified bytes of span `i` at blob offset `offset`.
    pub fn store(&self, i: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        self.data
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io(format!("writing {}", self.what), e))?;
        self.marks
            .write_all_at(&[1], i as u64)
            .map_err(|e| Error::io(format!("marking span {i} in {}", self.what), e))?;
        self.present.0.lock().expect("cache lock")[i] = true;
        Ok(())
    }

    /// Marks every span present: the caller wrote the whole blob, verified against its digest.
    pub fn mark_all_present(&self) -> Result<()> {
        let mut present = self.present.0.lock().expect("cache lock");
        let ones = vec![1u8; present.len()];
        self.marks
            .write_all_at(&ones, 0)
            .map_err(|e| Error::io(format!("marking spans in {}", self.what), e))?;
        present.iter_mut().for_each(|p| *p = true);
        Ok(())
    }

    /// Forgets span `i` (its bytes did not verify).
    pub fn forget(&self, i: usize) -> Result<()> {
        self.present.0.lock().expect("cache lock")[i] = false;
        self.marks
            .write_all_at(&[0], i as u64)
            .map_err(|e| Error::io(format!("unmarking span {i} in {}", self.what), e))
    }

    /// Reads blob bytes `start..end` from the cache.
    pub fn load(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; (end - start) as usize];
        self.data
            .read_exact_at(&mut bytes, start)
            .map_err(|e| Error::io(format!("reading {}", self.what), e))?;
        Ok(bytes)
    }
}

/// Which spans of a [`SpanCache`] are present, shared with the cache.
#[derive(Clone)]
pub struct SpanPresence(Arc<Mutex<Vec<bool>>>);

impl SpanPresence {
    /// Whether span `i` is believed present.
    pub fn has(&self, i: usize) -> bool {
        self.0.lock().expect("cache lock")[i]
    }
}
