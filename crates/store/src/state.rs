//! A layer's population state, durable in the order "data before state": which files hold
//! their data is recorded on disk only after a `syncfs` of the layer's filesystem has made the
//! data durable. After a crash, a file the record does not list is populated again from the
//! start, so a torn or lost write is never mistaken for data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where a layer is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Placeholders are being created (a crash here means starting the tree over).
    Creating,
    /// The tree exists; file data is populated on access and in the background.
    Lazy,
    /// Every file is populated and the blob digest was verified end to end; no marks remain.
    Detached,
    /// Its index proved wrong (it does not match the verified blob): the tree may show what
    /// the blob does not hold, so it is never mounted again; `rmi` and `gc` remove it.
    Failed,
}

/// How a lazy layer is served to the overlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendMode {
    /// Its directory is the lower; fanotify pre-content events fill files on access.
    #[default]
    Fanotify,
    /// A FUSE mount of it is the lower until it detaches.
    Fuse,
}

impl FrontendMode {
    /// The name `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            FrontendMode::Fanotify => "fanotify",
            FrontendMode::Fuse => "fuse",
        }
    }
}

/// The small record kept beside each layer directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The phase.
    pub phase: Phase,
    /// Number of entries of the index the tree was built from.
    pub entries: usize,
    /// How it is served while lazy (records written before FUSE existed are fanotify).
    #[serde(default)]
    pub mode: FrontendMode,
    /// Compressed bytes the daemon had fetched for it when the phase was recorded (what
    /// `status` shows for a layer no daemon serves any more, such as a detached one).
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Why the layer failed (with [`Phase::Failed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The boot (`/proc/sys/kernel/random/boot_id`) in which the tree was made, while no
    /// `syncfs` has made it durable yet: the pull does not wait for one (it would wait for
    /// everything else dirty on the store's filesystem); the daemon does when it takes the
    /// layer up ([`Layer::make_tree_durable`](crate::Layer::make_tree_durable)), and so does
    /// every persist.
    /// Read in another boot, such a record is taken as [`Phase::Creating`]: the machine
    /// stopped before the tree reached the disk, and the next pull makes it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsynced_in_boot: Option<String>,
}

impl LayerRecord {
    /// Reads the record at `path`, if the layer has one (a tree not synced before the
    /// machine stopped reads as [`Phase::Creating`]).
    pub fn load(path: &Path) -> Result<Option<LayerRecord>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<LayerRecord>(&bytes)
                .map(|mut record| {
                    if record
                        .unsynced_in_boot
                        .as_deref()
                        .is_some_and(|boot| Some(boot) != current_boot())
                    {
                        record.phase = Phase::Creating;
                    }
                    Some(record)
                })
                .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Writes the record durably (aside, synced, renamed, directory synced).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("record serialises");
        lazylayer_durable::write(path, &bytes)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

/// This boot's id, which changes at every boot (`None` if the kernel does not say: then a
/// tree is synced before its record says it exists, see [`LayerRecord::unsynced_in_boot`]).
pub fn current_boot() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|id| id.trim().to_string())
            .filter(|id| !id.is_empty())
    })
    .as_deref()
}

/// Which files of a layer hold their data: one byte per index entry on disk (1 = durable),
/// and in memory the files populated since the last [`persist`](Self::persist).
pub struct PopulationState {
    path: PathBuf,
    file: File,
    inner: Mutex<Inner>,
}

struct Inner {
    populated: Vec<bool>,
    pending: Vec<usize>,
}

impl PopulationState {
    /// Opens the state of a layer with `entries` entries.
    pub fn open(path: &Path, entries: usize) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut bytes = vec![0u8; entries];
        let len = file
            .metadata()
            .map_err(|e| Error::io(path.display().to_string(), e))?
            .len();
        if len == entries as u64 {
            file.read_exact_at(&mut bytes, 0)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        } else {
            file.set_len(entries as u64)
                .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        }
        Ok(PopulationState {
            path: path.to_path_buf(),
            file,
            inner: Mutex::new(Inner {
                populated: bytes.iter().map(|b| *b == 1).collect(),
                pending: Vec::new(),
            }),
        })
    }

    /// Whether entry `i` holds its data (durably or not yet).
    pub fn is_populated(&self, i: usize) -> bool {
        self.inner.lock().expect("state lock").populated[i]
    }

    /// Records that entry `i`'s data is written (durable at the next persist).
    pub fn mark(&self, i: usize) {
        let mut inner = self.inner.lock().expect("state lock");
        if !inner.populated[i] {
            inner.populated[i] = true;
            inner.pending.push(i);
        }
    }

    /// How many entries are populated.
    pub fn count(&self) -> usize {
        self.inner
            .lock()
            .expect("state lock")
            .populated
            .iter()
            .filter(|p| **p)
            .count()
    }

    /// Makes the marks made before this call durable: first `sync_data`, which must make the
    /// data of every file marked so far durable (a `syncfs` of the layer), then the marks, so
    /// the record never runs ahead of the data. Marks made meanwhile (fills go on during the
    /// sync) wait for the next call; on failure the marks taken stay pending.
    pub fn persist(&self, sync_data: impl FnOnce() -> Result<()>) -> Result<()> {
        let pending = std::mem::take(&mut self.inner.lock().expect("state lock").pending);
        let result = sync_data().and_then(|()| self.write_marks(&pending));
        if result.is_err() {
            self.inner
                .lock()
                .expect("state lock")
                .pending
                .extend(pending);
        }
        result
    }

    /// Writes `marks` to the state file and syncs it.
    fn write_marks(&self, marks: &[usize]) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        for i in marks {
            self.file
                .write_all_at(&[1], *i as u64)
                .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(path: &Path) -> Vec<u8> {
        std::fs::read(path).expect("state file")
    }

    /// A fresh state of `entries` entries in a scratch directory, and its file's path.
    fn fresh(entries: usize) -> (tempfile::TempDir, PathBuf, PopulationState) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("populated");
        let state = PopulationState::open(&path, entries).unwrap();
        (dir, path, state)
    }

    #[test]
    fn a_persist_records_only_the_marks_made_before_its_sync() {
        let (_dir, path, state) = fresh(4);
        state.mark(0);
        state
            .persist(|| {
                // A fill that ends while the sync runs: its data may not be durable yet.
                state.mark(2);
                Ok(())
            })
            .unwrap();
        assert_eq!(on_disk(&path), [1, 0, 0, 0]);
        assert!(state.is_populated(2));
        state.persist(|| Ok(())).unwrap();
        assert_eq!(on_disk(&path), [1, 0, 1, 0]);
    }

    #[test]
    fn marks_whose_sync_failed_are_recorded_by_the_next_persist() {
        let (_dir, path, state) = fresh(3);
        state.mark(1);
        let failed = state.persist(|| Err(Error::Corrupt("the disk went away".into())));
        assert!(failed.is_err());
        assert_eq!(on_disk(&path), [0, 0, 0]);
        state.persist(|| Ok(())).unwrap();
        assert_eq!(on_disk(&path), [0, 1, 0]);
        let reopened = PopulationState::open(&path, 3).unwrap();
        assert!(reopened.is_populated(1) && !reopened.is_populated(0));
    }
}
