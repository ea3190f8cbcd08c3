//! The snapshots' records, kept in a redb database under the store
//! (`ROOT/snapshotter/metadata.redb`): every change is one transaction, so a snapshotter
//! killed at any point restarts with the snapshots containerd knows about.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Snapshot name -> its JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters (the next snapshot directory number).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Images the snapshotter pulled (manifest digest -> reference): forgotten again once no
/// snapshot uses their layers.
const IMAGES: TableDefinition<&str, &str> = TableDefinition::new("images");

/// What kind of snapshot a record is, as containerd names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only view of its parent.
    View,
    /// Writable: a layer being unpacked or a container's writable layer.
    Active,
    /// Immutable: a layer that others build on.
    Committed,
}

/// A lazily loaded layer that a committed snapshot stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The layer's compressed digest (its directory in the store).
    pub layer: String,
    /// The manifest of the image it was pulled with.
    pub manifest: String,
}

/// One snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Its directory number (`ROOT/snapshotter/snapshots/ID`).
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// The parent's name ("" for none).
    pub parent: String,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created: u64,
    /// Last update, nanoseconds since the epoch.
    pub updated: u64,
    /// The lazy layer it is, if it was made from one (its `fs` is then a link to the layer).
    pub remote: Option<RemoteLayer>,
}

/// Nanoseconds since the epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A metadata operation failed.
#[derive(Debug, thiserror::Error)]
#[error("snapshot metadata: {0}")]
pub struct MetadataError(String);

fn fail(e: impl std::fmt::Display) -> MetadataError {
    MetadataError(e.to_string())
}

/// Result of a metadata operation.
pub type Result<T> = std::result::Result<T, MetadataError>;

/// The database.
pub struct Metadata {
    db: Database,
}

/// A change made in one transaction (see [`Metadata::change`]).
pub struct Change<'a> {
    snapshots: redb::Table<'a, &'static str, &'static [u8]>,
    counters: redb::Table<'a, &'static str, u64>,
    images: redb::Table<'a, &'static str, &'static str>,
}

impl Change<'_> {
    /// The record named `name`.
    pub fn get(&self, name: &str) -> Result<Option<Record>> {
        match self.snapshots.get(name).map_err(fail)? {
            Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
            None => Ok(None),
        }
    }

    /// Saves `record` under `name`.
    pub fn put(&mut self, name: &str, record: &Record) -> Result<()> {
        let bytes = serde_json::to_vec(record).expect("a snapshot record serialises");
        self.snapshots
            .insert(name, bytes.as_slice())
            .map_err(fail)?;
        Ok(())
    }

    /// Removes the record named `name`.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.snapshots.remove(name).map_err(fail)?;
        Ok(())
    }

    /// Whether any snapshot has `name` as its parent.
    pub fn has_children(&self, name: &str) -> Result<bool> {
        for item in self.snapshots.iter().map_err(fail)? {
            let (key, value) = item.map_err(fail)?;
            if decode(key.value(), value.value())?.parent == name {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A new snapshot directory number.
    pub fn next_id(&mut self) -> Result<u64> {
        let id = self
            .counters
            .get("next_id")
            .map_err(fail)?
            .map_or(1, |v| v.value());
        self.counters.insert("next_id", id + 1).map_err(fail)?;
        Ok(id)
    }

    /// Notes that the snapshotter pulled the image `manifest` (`reference`).
    pub fn own_image(&mut self, manifest: &str, reference: &str) -> Result<()> {
        self.images.insert(manifest, reference).map_err(fail)?;
        Ok(())
    }

    /// Forgets that the snapshotter pulled `manifest`.
    pub fn disown_image(&mut self, manifest: &str) -> Result<()> {
        self.images.remove(manifest).map_err(fail)?;
        Ok(())
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| MetadataError(format!("the record of {name}: {e}")))
}

impl Metadata {
    /// Opens (creating it, 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Metadata> {
        use std::os::unix::fs::OpenOptionsExt;
        // Created with the mode set here, whatever the umask.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| MetadataError(format!("creating {}: {e}", path.display())))?;
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => MetadataError(format!(
                "{} is in use: another lazylayer snapshotter serves this store (--root)",
                path.display()
            )),
            e => MetadataError(format!("opening {}: {e}", path.display())),
        })?;
        let metadata = Metadata { db };
        metadata.change(|_| Ok::<_, MetadataError>(()))?;
        Ok(metadata)
    }

    /// Runs `change` in one write transaction: committed if it returns `Ok`, else nothing.
    pub fn change<T, E: From<MetadataError>>(
        &self,
        change: impl FnOnce(&mut Change<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let txn = self.db.begin_write().map_err(fail)?;
        let value = {
            let mut tables = Change {
                snapshots: txn.open_table(SNAPSHOTS).map_err(fail)?,
                counters: txn.open_table(COUNTERS).map_err(fail)?,
                images: txn.open_table(IMAGES).map_err(fail)?,
            };
            change(&mut tables)?
        };
        txn.commit().map_err(fail)?;
        Ok(value)
    }

    /// The record named `name`.
    pub fn get(&self, name: &str) -> Result<Option<Record>> {
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(SNAPSHOTS).map_err(fail)?;
        match table.get(name).map_err(fail)? {
            Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
            None => Ok(None),
        }
    }

    /// Every snapshot, by name.
    pub fn all(&self) -> Result<Vec<(String, Record)>> {
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(SNAPSHOTS).map_err(fail)?;
        let mut all = Vec::new();
        for item in table.iter().map_err(fail)? {
            let (key, value) = item.map_err(fail)?;
            all.push((key.value().to_string(), decode(key.value(), value.value())?));
        }
        Ok(all)
    }

    /// The images the snapshotter pulled (manifest digest, reference).
    pub fn owned_images(&self) -> Result<Vec<(String, String)>> {
        let txn = self.db.begin_read().map_err(fail)?;
        let table = txn.open_table(IMAGES).map_err(fail)?;
        let mut all = Vec::new();
        for item in table.iter().map_err(fail)? {
            let (key, value) = item.map_err(fail)?;
            all.push((key.value().to_string(), value.value().to_string()));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, parent: &str) -> Record {
        Record {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: now(),
            updated: now(),
            remote: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_failed_changes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let metadata = Metadata::open(&path).unwrap();
            metadata
                .change(|c| {
                    let id = c.next_id()?;
                    c.put("base", &record(id, ""))?;
                    let id = c.next_id()?;
                    c.put("top", &record(id, "base"))
                })
                .unwrap();
            let failed: Result<()> = metadata.change(|c| {
                c.put("half", &record(9, "top"))?;
                Err(MetadataError("stopped half way".into()))
            });
            assert!(failed.is_err());
        }
        let metadata = Metadata::open(&path).unwrap();
        let second = Metadata::open(&path).err().expect("one process at a time");
        assert!(
            second.to_string().contains("another lazylayer snapshotter"),
            "{second}"
        );
        let names: Vec<String> = metadata
            .all()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["base", "top"]);
        assert_eq!(metadata.get("top").unwrap().unwrap().id, 2);
        metadata
            .change(|c| {
                assert!(c.has_children("base")?);
                assert!(!c.has_children("top")?);
                assert_eq!(c.next_id()?, 3);
                Ok::<_, MetadataError>(())
            })
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
