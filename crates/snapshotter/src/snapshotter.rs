//! The snapshotter: containerd's snapshot operations over the metadata database, the
//! snapshot directories (`ROOT/snapshotter/snapshots/ID/{fs,work}`) and the lazy layers of the
//! store.
//!
//! A Prepare whose labels name a layer of an image with lazy indexes commits a snapshot under
//! the target name whose `fs` links to the layer's directory, and answers AlreadyExists, as
//! containerd's remote snapshotter contract asks: containerd then neither downloads nor
//! unpacks that layer. Everything else is an ordinary overlay snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lazylayer_engine::{Engine, IndexTrust, Mode};
use lazylayer_source::Digest;
use lazylayer_store::Phase;

use crate::api::Mount;
use crate::labels::{self, Asked};
use crate::metadata::{Kind, Metadata, MetadataError, Record, RemoteLayer, now};
use crate::mounts::{MountPlan, mounts};
use crate::remote::{Available, RemoteLayers};

/// How deep a chain of parents may be (a cycle in a damaged database ends here).
const MAX_DEPTH: usize = 4096;

/// Who holds (`Store::hold_image`) the images whose layers containerd's snapshots stand for:
/// `lazylayer rmi` refuses them, so that the daemon keeps serving their lazy layers and a
/// collection keeps them, until the snapshotter's cleanup releases them.
pub const HOLDER: &str = "containerd";

/// A snapshot operation failed; each variant is the gRPC status containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot of that name.
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    /// The name is taken (for a lazy layer: the target is committed, which containerd takes
    /// as the layer being there).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    InvalidArgument(String),
    /// The snapshot is not in the state the operation needs.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A lazy layer cannot be served now (failed, gone, or no daemon).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl From<MetadataError> for Error {
    fn from(e: MetadataError) -> Error {
        Error::Internal(e.to_string())
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// How the snapshotter serves lazy layers.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotterOptions {
    /// How new lazy layers are served (fanotify or FUSE).
    pub mode: Mode,
    /// Which registry indexes may be used lazily.
    pub index_trust: IndexTrust,
}

/// containerd's snapshotter over a lazylayer store.
pub struct Snapshotter {
    engine: Engine,
    metadata: Metadata,
    dir: PathBuf,
    remote: RemoteLayers,
    /// Per target: held while a Prepare decides whether it is a lazy layer.
    targets: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Written while a cleanup runs, read while a Prepare makes a layer lazy: a cleanup never
    /// releases an image a Prepare is about to commit a snapshot for.
    cleaning: tokio::sync::RwLock<()>,
}

impl Snapshotter {
    /// Opens the snapshotter's state under the engine's store (`ROOT/snapshotter`), creating
    /// it private to root.
    pub fn open(engine: Engine, options: SnapshotterOptions) -> Result<Snapshotter, Error> {
        engine
            .store()
            .make_private()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let dir = engine.store().root().join("snapshotter");
        for made in [dir.join("snapshots"), dir.join("trash")] {
            std::fs::create_dir_all(&made).map_err(io(format!("creating {}", made.display())))?;
            set_mode(&made, 0o700)?;
        }
        let metadata = Metadata::open(&dir.join("metadata.redb"))?;
        let remote = RemoteLayers::new(engine.clone(), options.mode, options.index_trust);
        Ok(Snapshotter {
            engine,
            metadata,
            dir,
            remote,
            targets: Mutex::new(HashMap::new()),
            cleaning: tokio::sync::RwLock::new(()),
        })
    }

    /// The engine it pulls with.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir.join("snapshots").join(id.to_string())
    }

    /// A writable snapshot on `parent`; a lazy layer instead when the labels name one (then
    /// [`Error::AlreadyExists`], as containerd expects of a remote snapshotter).
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        match labels::asked(&labels) {
            Asked::Plain => {}
            Asked::Unpack(why) => tracing::info!("{key}: containerd unpacks it: {why}"),
            Asked::Layer(request) => {
                let lock = self
                    .targets
                    .lock()
                    .expect("target table lock")
                    .entry(request.target.clone())
                    .or_default()
                    .clone();
                let _held = lock.lock().await;
                let _not_cleaning = self.cleaning.read().await;
                if let Some(existing) = self.metadata.get(&request.target)? {
                    if existing.kind == Kind::Committed && existing.parent == parent {
                        return Err(already_there(&request.target));
                    }
                } else {
                    let parent_layer = match parent {
                        "" => None,
                        parent => self
                            .metadata
                            .get(parent)?
                            .and_then(|r| r.remote)
                            .and_then(|r| r.layer.parse::<Digest>().ok()),
                    };
                    match self
                        .remote
                        .make_available(&request, parent_layer.as_ref())
                        .await
                    {
                        Ok(available) => {
                            self.commit_lazy(&request.target, parent, labels, &available)?;
                            return Err(already_there(&request.target));
                        }
                        Err(why) => tracing::warn!(
                            "layer {} of {} is not lazy (containerd downloads and unpacks \
                             it): {why}",
                            request.layer,
                            request.image
                        ),
                    }
                }
            }
        }
        self.create(key, parent, labels, Kind::Active)?;
        self.mounts_of_new(key).await
    }

    /// A read-only view of `parent`.
    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create(key, parent, labels, Kind::View)?;
        self.mounts_of_new(key).await
    }

    /// The mounts of the snapshot just created as `key`; if it cannot be mounted (a lazy
    /// layer under it failed), it is removed again: containerd takes the Prepare as failed.
    async fn mounts_of_new(&self, key: &str) -> Result<Vec<Mount>, Error> {
        match self.mounts(key).await {
            Ok(mounts) => Ok(mounts),
            Err(e) => {
                let removed = self.metadata.change(|c| {
                    let record = c.get(key)?;
                    c.remove(key)?;
                    Ok::<_, MetadataError>(record)
                });
                if let Ok(Some(record)) = removed {
                    let _ = self.discard(record.id);
                }
                Err(e)
            }
        }
    }

    /// Records a new snapshot `key` of `kind` on `parent`, with its directories.
    fn create(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("a snapshot needs a key".into()));
        }
        self.metadata.change(|c| {
            if c.get(key)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {key} already exists"
                )));
            }
            if !parent.is_empty() {
                match c.get(parent)? {
                    None => return Err(Error::NotFound(parent.to_string())),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(Error::InvalidArgument(format!(
                            "parent {parent} is not a committed snapshot"
                        )));
                    }
                    Some(_) => {}
                }
            }
            let id = c.next_id()?;
            let dir = self.snapshot_dir(id);
            make_dir(&dir, 0o700)?;
            make_dir(&dir.join("fs"), 0o755)?;
            if kind == Kind::Active {
                make_dir(&dir.join("work"), 0o700)?;
            }
            let time = now();
            c.put(
                key,
                &Record {
                    id,
                    kind,
                    parent: parent.to_string(),
                    labels: labels.into_iter().collect(),
                    created: time,
                    updated: time,
                    remote: None,
                },
            )?;
            Ok(())
        })
    }

    /// Commits the lazy layer `available` as the snapshot `target` on `parent`.
    fn commit_lazy(
        &self,
        target: &str,
        parent: &str,
        labels: HashMap<String, String>,
        available: &Available,
    ) -> Result<(), Error> {
        let store = self.engine.store();
        let lower = store
            .lower_dir(&available.layer)
            .map_err(|e| Error::Internal(e.to_string()))?;
        // Held before the snapshot exists: a crash between the two leaves a hold that the next
        // cleanup releases, never a snapshot whose image could be forgotten.
        store
            .hold_image(&available.image.manifest, HOLDER)
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.metadata.change(|c| {
            if !parent.is_empty() && c.get(parent)?.is_none() {
                return Err(Error::NotFound(parent.to_string()));
            }
            let id = c.next_id()?;
            let dir = self.snapshot_dir(id);
            make_dir(&dir, 0o700)?;
            std::os::unix::fs::symlink(&lower, dir.join("fs"))
                .map_err(io(format!("linking {} to the layer", dir.display())))?;
            let mut labels: BTreeMap<String, String> = labels.into_iter().collect();
            labels.insert(
                labels::LAZYLAYER_LAYER.to_string(),
                available.layer.to_string(),
            );
            let time = now();
            c.put(
                target,
                &Record {
                    id,
                    kind: Kind::Committed,
                    parent: parent.to_string(),
                    labels,
                    created: time,
                    updated: time,
                    remote: Some(RemoteLayer {
                        layer: available.layer.to_string(),
                        manifest: available.image.manifest.to_string(),
                    }),
                },
            )?;
            if available.new_image {
                c.own_image(
                    &available.image.manifest.to_string(),
                    &available.image.reference,
                )?;
            }
            Ok(())
        })?;
        tracing::info!(
            "layer {} of {} is lazy as {target}",
            available.layer,
            available.image.reference
        );
        Ok(())
    }

    /// The mounts of snapshot `key`; [`Error::Unavailable`] when a lazy layer under it has
    /// failed or cannot be served.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let record = self
            .metadata
            .get(key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let mut chain = vec![record.clone()];
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            if chain.len() > MAX_DEPTH {
                return Err(Error::Internal(format!(
                    "{key}: the chain of parents loops"
                )));
            }
            let above = self.metadata.get(&parent)?.ok_or_else(|| {
                Error::Internal(format!("{key}: its ancestor {parent} is missing"))
            })?;
            parent = above.parent.clone();
            chain.push(above);
        }
        let mut lazy_below = false;
        let mut needs_daemon = false;
        for (i, snapshot) in chain.iter().enumerate() {
            if let Some(remote) = &snapshot.remote {
                lazy_below |= i > 0 || snapshot.kind != Kind::Active;
                needs_daemon |= self.check_layer(key, remote, &self.snapshot_dir(snapshot.id))?;
            }
        }
        if needs_daemon {
            self.engine.start_daemon().await.map_err(|e| {
                Error::Unavailable(format!("{key}: lazy layers under it cannot be served: {e}"))
            })?;
        }
        let plan = MountPlan {
            kind: record.kind,
            fs: self.snapshot_dir(record.id).join("fs"),
            work: self.snapshot_dir(record.id).join("work"),
            parents: chain[1..]
                .iter()
                .map(|s| self.snapshot_dir(s.id).join("fs"))
                .collect(),
            lazy_below,
        };
        Ok(mounts(&plan))
    }

    /// Checks that the lazy layer of the snapshot in `dir` can be served and points its `fs`
    /// at the layer's current lower directory; returns whether it is still lazy.
    fn check_layer(&self, key: &str, remote: &RemoteLayer, dir: &Path) -> Result<bool, Error> {
        let store = self.engine.store();
        let layer: Digest = remote
            .layer
            .parse()
            .map_err(|e| Error::Internal(format!("the layer of {key}: {e}")))?;
        let internal = |e: lazylayer_store::Error| Error::Internal(e.to_string());
        if let Some(reason) = store.failure(&layer).map_err(internal)? {
            return Err(Error::Unavailable(format!(
                "layer {layer} under {key} failed ({reason}): remove the image (ctr image rm), \
                 which releases the layer, and pull it again"
            )));
        }
        let lazy = match store.phase(&layer).map_err(internal)? {
            Some(Phase::Lazy) => true,
            Some(Phase::Detached) => false,
            other => {
                return Err(Error::Unavailable(format!(
                    "layer {layer} under {key} is not in the store ({other:?}): remove the \
                     image and pull it again"
                )));
            }
        };
        let lower = store.lower_dir(&layer).map_err(internal)?;
        point_link(&dir.join("fs"), &lower)?;
        Ok(lazy)
    }

    /// Commits the active snapshot `key` as `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        self.metadata.change(|c| {
            let mut record = c
                .get(key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            if record.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            if c.get(name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name} already exists"
                )));
            }
            record.kind = Kind::Committed;
            record.labels = labels.into_iter().collect();
            record.updated = now();
            c.remove(key)?;
            c.put(name, &record)?;
            Ok(())
        })
    }

    /// Removes the snapshot `key` (one with children cannot go) and its directory; the lazy
    /// layer it stood for is released, and goes at the next cleanup if nothing else uses it.
    pub async fn remove(self: &Arc<Self>, key: &str) -> Result<(), Error> {
        let record = self.metadata.change(|c| {
            let record = c
                .get(key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            if c.has_children(key)? {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} has children: remove them first"
                )));
            }
            c.remove(key)?;
            Ok(record)
        })?;
        self.discard(record.id)?;
        if record.remote.is_some() {
            // containerd calls Cleanup after its own collection, but not after every Remove.
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.cleanup().await {
                    tracing::warn!("cleaning up after removing a lazy layer's snapshot: {e}");
                }
            });
        }
        Ok(())
    }

    /// Moves a snapshot directory to the trash (one step) and deletes it there.
    fn discard(&self, id: u64) -> Result<(), Error> {
        let dir = self.snapshot_dir(id);
        let trashed = self.dir.join("trash").join(format!("{id}-{}", now()));
        match std::fs::rename(&dir, &trashed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(format!("moving {} to the trash", dir.display()))(e)),
        }
        std::fs::remove_dir_all(&trashed).map_err(io(format!("removing {}", trashed.display())))
    }

    /// The snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Record, Error> {
        self.metadata
            .get(key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }

    /// Updates the labels of snapshot `name`: those `fieldpaths` name (`labels.KEY` or
    /// `labels`), or all of them when it names none.
    pub fn update(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Record, Error> {
        self.metadata.change(|c| {
            let mut record = c
                .get(name)?
                .ok_or_else(|| Error::NotFound(name.to_string()))?;
            if fieldpaths.is_empty() || fieldpaths.iter().any(|p| p == "labels") {
                record.labels = labels.into_iter().collect();
            } else {
                for path in fieldpaths {
                    let Some(label) = path.strip_prefix("labels.") else {
                        return Err(Error::InvalidArgument(format!(
                            "cannot update {path}: only labels can change"
                        )));
                    };
                    match labels.get(label) {
                        Some(value) => record.labels.insert(label.to_string(), value.clone()),
                        None => record.labels.remove(label),
                    };
                }
            }
            record.updated = now();
            c.put(name, &record)?;
            Ok(record)
        })
    }

    /// Disk bytes and inodes snapshot `key` holds: its own directory, or for a lazy layer the
    /// layer's directory (blocks allocated: unfilled placeholders hold none).
    pub async fn usage(&self, key: &str) -> Result<(u64, u64), Error> {
        let record = self.stat(key)?;
        let dir = match &record.remote {
            Some(remote) => {
                let layer: Digest = remote
                    .layer
                    .parse()
                    .map_err(|e| Error::Internal(format!("the layer of {key}: {e}")))?;
                self.engine.store().layer_fs(&layer)
            }
            None => self.snapshot_dir(record.id).join("fs"),
        };
        tokio::task::spawn_blocking(move || crate::usage::disk_usage(&dir))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(io(format!("measuring {key}")))
    }

    /// Every snapshot, by name.
    pub fn list(&self) -> Result<Vec<(String, Record)>, Error> {
        Ok(self.metadata.all()?)
    }

    /// Removes what no snapshot records: directories left by a crash, images the snapshotter
    /// pulled whose layers no snapshot stands for any more, and then (as `lazylayer gc`) every
    /// layer, index and span cache nothing references.
    pub async fn cleanup(&self) -> Result<(), Error> {
        let _held = self.cleaning.write().await;
        let all = self.metadata.all()?;
        let ids: HashSet<String> = all.iter().map(|(_, r)| r.id.to_string()).collect();
        let snapshots = self.dir.join("snapshots");
        let listing = std::fs::read_dir(&snapshots)
            .map_err(io(format!("listing {}", snapshots.display())))?;
        for entry in listing.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Ok(id) = name.parse::<u64>()
                && !ids.contains(&name)
            {
                self.discard(id)?;
            }
        }
        let trash = self.dir.join("trash");
        if let Ok(listing) = std::fs::read_dir(&trash) {
            for entry in listing.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let used: HashSet<String> = all
            .iter()
            .filter_map(|(_, r)| r.remote.as_ref().map(|l| l.layer.clone()))
            .collect();
        let store = self.engine.store();
        let internal = |e: lazylayer_store::Error| Error::Internal(e.to_string());
        let images = store.images().map_err(internal)?;
        let owned = self.metadata.owned_images()?;
        for image in &images {
            let in_use = image
                .layers
                .iter()
                .any(|l| used.contains(&l.digest.to_string()));
            if in_use {
                continue;
            }
            let holders = store.image_holders(&image.manifest).map_err(internal)?;
            if holders.iter().any(|h| h == HOLDER) {
                store
                    .release_image(&image.manifest, HOLDER)
                    .map_err(internal)?;
                tracing::info!("released {}: no snapshot uses its layers", image.reference);
            }
            let manifest = image.manifest.to_string();
            if owned.iter().any(|(m, _)| *m == manifest) {
                // Pulled for containerd alone: forgotten too (another holder keeps it).
                match store.forget_image(&image.manifest) {
                    Ok(()) | Err(lazylayer_store::Error::Held { .. }) => {}
                    Err(e) => return Err(internal(e)),
                }
                self.metadata
                    .change(|c| c.disown_image(&manifest).map_err(Error::from))?;
            }
        }
        // Images forgotten by other means.
        for (manifest, _) in owned {
            if !images.iter().any(|i| i.manifest.to_string() == manifest) {
                self.metadata
                    .change(|c| c.disown_image(&manifest).map_err(Error::from))?;
            }
        }
        let report = self
            .engine
            .collect_garbage(false)
            .await
            .map_err(|e| Error::Internal(format!("collecting the store: {e}")))?;
        if !report.removed.is_empty() {
            tracing::info!(
                "cleanup removed {} items ({} bytes)",
                report.removed.len(),
                report.bytes()
            );
        }
        Ok(())
    }
}

/// What a Prepare answers for a layer that is (now) a committed lazy snapshot.
fn already_there(target: &str) -> Error {
    Error::AlreadyExists(format!("target snapshot {target} (lazily loaded)"))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", path.display())))
}

/// Creates `path` with `mode`, whatever the umask.
fn make_dir(path: &Path, mode: u32) -> Result<(), Error> {
    std::fs::create_dir(path).map_err(io(format!("creating {}", path.display())))?;
    set_mode(path, mode)
}

/// Makes the symlink `link` point at `target`, replacing it in one step if it points
/// elsewhere (a layer that detached from its FUSE mount since).
fn point_link(link: &Path, target: &Path) -> Result<(), Error> {
    if std::fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    let fresh = link.with_file_name(format!("fs.{}", now()));
    std::os::unix::fs::symlink(target, &fresh)
        .map_err(io(format!("linking {}", fresh.display())))?;
    std::fs::rename(&fresh, link).map_err(io(format!("replacing {}", link.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_engine::EngineOptions;
    use lazylayer_store::state::LayerRecord;

    fn snapshotter(root: &Path) -> Arc<Snapshotter> {
        let engine = Engine::new(EngineOptions {
            root: root.to_path_buf(),
            insecure_registries: Vec::new(),
            hosts_dir: None,
            program: "/nonexistent/lazylayer".into(),
        });
        Arc::new(Snapshotter::open(engine, SnapshotterOptions::default()).unwrap())
    }

    fn no_labels() -> HashMap<String, String> {
        HashMap::new()
    }

    #[tokio::test]
    async fn ordinary_snapshots_behave_as_containerd_expects() {
        let dir = tempfile::tempdir().unwrap();
        let s = snapshotter(dir.path());
        let mounts = s.prepare("ns/1/a", "", no_labels()).await.unwrap();
        assert_eq!(mounts[0].r#type, "bind");
        assert!(mounts[0].options.contains(&"rw".to_string()));
        // A name taken, a parent missing or not committed.
        assert!(matches!(
            s.prepare("ns/1/a", "", no_labels()).await,
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.prepare("ns/2/b", "nothing", no_labels()).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            s.prepare("ns/2/b", "ns/1/a", no_labels()).await,
            Err(Error::InvalidArgument(_))
        ));
        let labels: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
        s.commit("layer-a", "ns/1/a", labels).unwrap();
        assert!(matches!(s.stat("ns/1/a"), Err(Error::NotFound(_))));
        let committed = s.stat("layer-a").unwrap();
        assert_eq!(committed.kind, Kind::Committed);
        assert_eq!(committed.labels["k"], "v");
        assert!(matches!(
            s.commit("again", "layer-a", no_labels()),
            Err(Error::FailedPrecondition(_))
        ));
        let mounts = s.prepare("ns/3/c", "layer-a", no_labels()).await.unwrap();
        assert_eq!(mounts[0].r#type, "overlay");
        let options = mounts[0].options.join(",");
        assert!(
            options.contains("upperdir=") && options.contains("lowerdir="),
            "{options}"
        );
        assert!(!options.contains("metacopy"), "{options}");
        let view = s.view("ns/4/v", "layer-a", no_labels()).await.unwrap();
        assert_eq!(
            (view[0].r#type.as_str(), view[0].options[0].as_str()),
            ("bind", "ro")
        );
        assert!(matches!(
            s.remove("layer-a").await,
            Err(Error::FailedPrecondition(_))
        ));
        let updated = s
            .update(
                "layer-a",
                [("k2".to_string(), "w".to_string())].into(),
                &["labels.k2".to_string()],
            )
            .unwrap();
        assert_eq!(updated.labels.len(), 2);
        assert!(
            s.update("layer-a", no_labels(), &["parent".to_string()])
                .is_err()
        );
        std::fs::write(
            s.snapshot_dir(s.stat("ns/3/c").unwrap().id).join("fs/file"),
            vec![1u8; 8192],
        )
        .unwrap();
        let (bytes, inodes) = s.usage("ns/3/c").await.unwrap();
        assert!(bytes >= 8192 && inodes == 2, "{bytes} {inodes}");
        assert_eq!(s.list().unwrap().len(), 3);
        for key in ["ns/3/c", "ns/4/v", "layer-a"] {
            s.remove(key).await.unwrap();
        }
        assert!(s.list().unwrap().is_empty());
        let left = std::fs::read_dir(dir.path().join("snapshotter/snapshots")).unwrap();
        assert_eq!(
            left.count(),
            0,
            "every snapshot directory went with its snapshot"
        );
    }

    #[tokio::test]
    async fn a_failed_lazy_layer_is_unavailable_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let s = snapshotter(dir.path());
        let layer: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let layer_dir = dir.path().join("layers/sha256").join(layer.hex());
        std::fs::create_dir_all(layer_dir.join("fs")).unwrap();
        LayerRecord {
            phase: Phase::Failed,
            entries: 0,
            mode: Default::default(),
            bytes_fetched: 0,
            failure: Some("its index lied about /etc/passwd".into()),
            unsynced_in_boot: None,
        }
        .save(&layer_dir.join("record"))
        .unwrap();
        s.metadata
            .change(|c| {
                let id = c.next_id()?;
                make_dir(&s.snapshot_dir(id), 0o700)?;
                c.put(
                    "sha256:chain",
                    &Record {
                        id,
                        kind: Kind::Committed,
                        parent: String::new(),
                        labels: BTreeMap::new(),
                        created: now(),
                        updated: now(),
                        remote: Some(RemoteLayer {
                            layer: layer.to_string(),
                            manifest: format!("sha256:{}", "cd".repeat(32)),
                        }),
                    },
                )?;
                Ok::<_, Error>(())
            })
            .unwrap();
        let result = s
            .prepare("ns/1/container", "sha256:chain", no_labels())
            .await;
        match result {
            Err(Error::Unavailable(message)) => {
                assert!(message.contains("lied about /etc/passwd"), "{message}");
                assert!(message.contains("pull it again"), "{message}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(
            matches!(s.stat("ns/1/container"), Err(Error::NotFound(_))),
            "a Prepare that failed leaves no snapshot"
        );
        // The same once the layer is gone from the store altogether.
        std::fs::remove_dir_all(&layer_dir).unwrap();
        assert!(matches!(
            s.view("ns/2/view", "sha256:chain", no_labels()).await,
            Err(Error::Unavailable(_))
        ));
    }
}
