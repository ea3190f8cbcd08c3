//! Garbage collection: removing what no image and no mount references — layer directories,
//! their indexes and span caches, the profiles of forgotten images, and the writable layers
//! of mounts that are gone — and the store lock that keeps a collection from racing a pull.
//!
//! A layer is removed by renaming its directory into `ROOT/trash` first (one atomic step: a
//! crash never leaves a half-removed layer that still looks complete) and deleting it there.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lazylayer_source::Digest;

use crate::state::Phase;
use crate::store::Store;
use crate::{Error, Result};

/// What must survive a collection although no image references it.
#[derive(Debug, Default)]
pub struct InUse {
    /// Layers kept, with why (mounted, still served lazily by the daemon).
    pub layers: HashMap<Digest, String>,
    /// Mount directories (`ROOT/mounts/NAME`) whose overlay is still mounted somewhere.
    pub mount_dirs: BTreeSet<PathBuf>,
}

/// One thing a collection removed (or, in a dry run, would remove).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    /// What it was: `layer`, `index`, `spans`, `profile`, `mount`, `mountpoint`.
    pub kind: &'static str,
    /// Its path.
    pub path: PathBuf,
    /// Bytes of disk it held.
    pub bytes: u64,
}

/// What a collection did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// What went (or would go).
    pub removed: Vec<Removed>,
    /// Unreferenced layers kept, with why.
    pub kept: Vec<(Digest, String)>,
}

impl GcReport {
    /// Bytes freed in all.
    pub fn bytes(&self) -> u64 {
        self.removed.iter().map(|r| r.bytes).sum()
    }
}

/// An advisory lock on the store: pulls hold it shared, a collection holds it exclusively, so
/// that a layer is never removed while a pull is making it part of an image.
pub struct StoreLock {
    _file: std::fs::File,
}

impl Store {
    fn lock(&self, exclusive: bool) -> Result<StoreLock> {
        std::fs::create_dir_all(self.root())
            .map_err(|e| Error::io(format!("creating {}", self.root().display()), e))?;
        let operation = if exclusive {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        let file = crate::store::lock_file(&self.root().join("store.lock"), operation)?;
        Ok(StoreLock { _file: file })
    }

    /// Holds the store against collection while a pull adds to it.
    pub fn lock_for_pull(&self) -> Result<StoreLock> {
        self.lock(false)
    }

    /// Waits for running pulls and keeps new ones out while a collection runs.
    pub fn lock_for_gc(&self) -> Result<StoreLock> {
        self.lock(true)
    }

    /// Forgets an image: its record and its prefetch profile. Its layers stay until a
    /// collection finds them unreferenced. An image a service holds ([`Store::hold_image`])
    /// is not forgotten: [`Error::Held`].
    pub fn forget_image(&self, manifest: &Digest) -> Result<()> {
        if let Some(holder) = self.image_holders(manifest)?.into_iter().next() {
            let reference = self
                .images()?
                .into_iter()
                .find(|i| i.manifest == *manifest)
                .map_or_else(|| manifest.to_string(), |i| i.reference);
            return Err(Error::Held {
                image: reference,
                holder,
            });
        }
        let record = self
            .root()
            .join("images")
            .join(format!("{}.json", manifest.hex()));
        std::fs::remove_file(&record)
            .map_err(|e| Error::io(format!("removing {}", record.display()), e))?;
        remove_if_present(&self.profile_path(manifest))
    }

    /// Marks the image `manifest` as used by `holder` (a service, e.g. `containerd`): its
    /// record, and so its layers, stay until the holder releases it; `forget_image` refuses.
    pub fn hold_image(&self, manifest: &Digest, holder: &str) -> Result<()> {
        let path = self.hold_path(manifest, holder);
        lazylayer_durable::write(&path, holder.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Ends `holder`'s hold on the image `manifest`.
    pub fn release_image(&self, manifest: &Digest, holder: &str) -> Result<()> {
        remove_if_present(&self.hold_path(manifest, holder))
    }

    /// Who holds the image `manifest`.
    pub fn image_holders(&self, manifest: &Digest) -> Result<Vec<String>> {
        let dir = self.root().join("images");
        let prefix = format!("{}.held-by-", manifest.hex());
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut holders = Vec::new();
        for entry in listing {
            let name = entry
                .map_err(|e| Error::io("listing images", e))?
                .file_name()
                .to_string_lossy()
                .to_string();
            if let Some(holder) = name.strip_prefix(&prefix) {
                holders.push(holder.to_string());
            }
        }
        Ok(holders)
    }

    fn hold_path(&self, manifest: &Digest, holder: &str) -> PathBuf {
        self.root()
            .join("images")
            .join(format!("{}.held-by-{holder}", manifest.hex()))
    }

    /// The layers the store holds a directory for.
    pub fn layer_digests(&self) -> Result<Vec<Digest>> {
        let mut digests = Vec::new();
        let layers = self.root().join("layers");
        for (algorithm, hex) in two_level_listing(&layers)? {
            match format!("{algorithm}:{hex}").parse::<Digest>() {
                Ok(digest) => digests.push(digest),
                Err(_) => tracing::warn!(
                    "ignoring a foreign entry {algorithm}/{hex} in {}",
                    layers.display()
                ),
            }
        }
        digests.sort_by_key(|d| d.to_string());
        Ok(digests)
    }

    /// Removes every layer, index, span cache, profile and mount directory that no image
    /// record references and `in_use` does not protect; with `dry_run`, only reports them.
    /// The caller holds [`Store::lock_for_gc`].
    pub fn collect_garbage(&self, in_use: &InUse, dry_run: bool) -> Result<GcReport> {
        let trash = self.root().join("trash");
        if !dry_run {
            // What an interrupted collection left.
            remove_tree(&trash)?;
        }
        let images = self.images()?;
        let referenced: BTreeSet<String> = images
            .iter()
            .flat_map(|i| &i.layers)
            .map(|l| l.digest.to_string())
            .collect();
        let mut report = GcReport::default();
        let remove = |kind: &'static str, path: PathBuf, report: &mut GcReport| -> Result<()> {
            let bytes = disk_usage(&path);
            if !dry_run {
                if kind == "layer" || kind == "mount" {
                    std::fs::create_dir_all(&trash)
                        .map_err(|e| Error::io(format!("creating {}", trash.display()), e))?;
                    let aside = trash.join(format!("{kind}-{}", fastrand_name()));
                    std::fs::rename(&path, &aside)
                        .map_err(|e| Error::io(format!("moving {} aside", path.display()), e))?;
                    remove_tree(&aside)?;
                } else {
                    remove_if_present(&path)?;
                }
            }
            report.removed.push(Removed { kind, path, bytes });
            Ok(())
        };

        for digest in self.layer_digests()? {
            if referenced.contains(&digest.to_string()) {
                continue;
            }
            if let Some(why) = in_use.layers.get(&digest) {
                report.kept.push((digest, why.clone()));
                continue;
            }
            let dir = self.layer_fs(&digest);
            let dir = dir
                .parent()
                .expect("a layer directory has a parent")
                .to_path_buf();
            remove("layer", dir, &mut report)?;
        }
        let kept: BTreeSet<String> = report.kept.iter().map(|(d, _)| d.to_string()).collect();
        let wanted = |digest: &str| referenced.contains(digest) || kept.contains(digest);

        let indexes = self.root().join("indexes");
        for (algorithm, name) in two_level_listing(&indexes)? {
            // `<hex>.origin` says where `<hex>` came from, `<hex>.windows` where its missing
            // windows are: they go with it, uncounted.
            let (hex, is_origin) = match name
                .strip_suffix(".origin")
                .or_else(|| name.strip_suffix(".windows"))
            {
                Some(hex) => (hex, true),
                None => (name.as_str(), false),
            };
            if wanted(&format!("{algorithm}:{hex}")) {
                continue;
            }
            let path = indexes.join(&algorithm).join(&name);
            if is_origin {
                if !dry_run {
                    remove_if_present(&path)?;
                }
            } else {
                remove("index", path, &mut report)?;
            }
        }

        // Span caches are only needed by lazy layers.
        for (stem, path) in listing_by_stem(&self.span_dir())? {
            let digest = format!("sha256:{stem}");
            // A layer whose record cannot be read keeps its spans: it may be lazy.
            let lazy = wanted(&digest)
                && digest.parse::<Digest>().is_ok_and(
                    |d| !matches!(self.phase(&d), Ok(Some(phase)) if phase != Phase::Lazy),
                );
            if !lazy {
                remove("spans", path, &mut report)?;
            }
        }

        let manifests: BTreeSet<&str> = images.iter().map(|i| i.manifest.hex()).collect();
        for (stem, path) in listing_by_stem(&self.root().join("profiles"))? {
            if !manifests.contains(stem.as_str()) {
                remove("profile", path, &mut report)?;
            }
        }

        // Mount points of FUSE layers that are gone (a mounted one is busy and stays).
        let layers: BTreeSet<String> = self
            .layer_digests()?
            .iter()
            .map(|d| d.hex().to_string())
            .collect();
        for dir in listing(&self.fuse_dir())? {
            let hex = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if dir.is_dir()
                && !layers.contains(&hex)
                && (dry_run || std::fs::remove_dir(&dir).is_ok())
            {
                report.removed.push(Removed {
                    kind: "mountpoint",
                    path: dir,
                    bytes: 0,
                });
            }
        }

        for dir in listing(&self.mounts_dir())? {
            if !in_use.mount_dirs.contains(&dir) {
                remove("mount", dir, &mut report)?;
            }
        }
        Ok(report)
    }
}

/// A name for something moved aside, unique enough within one trash directory.
fn fastrand_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Removes a directory tree (never following its symlinks: a layer's are hostile).
fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

fn listing(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        paths.push(
            entry
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
                .path(),
        );
    }
    paths.sort();
    Ok(paths)
}

/// `DIR/ALGORITHM/HEX` entries as (algorithm, hex).
fn two_level_listing(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for algorithm in listing(dir)? {
        let name = algorithm
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        for item in listing(&algorithm)? {
            let hex = item
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if !hex.ends_with(".tmp") && !lazylayer_durable::is_temporary(&hex) {
                found.push((name.clone(), hex));
            }
        }
    }
    Ok(found)
}

/// Files of a directory with the part of their name before the first dot.
fn listing_by_stem(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(listing(dir)?
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let stem = name.split('.').next().unwrap_or_default().to_string();
            (stem, path)
        })
        .collect())
}

/// Disk blocks under `path` (like `du`; symlinks are not followed, hardlinks counted once).
pub fn disk_usage(path: &Path) -> u64 {
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}
