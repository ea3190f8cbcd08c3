//! Pulling an image lazily: resolve it, find (in the store or the registry), fetch or build
//! each layer's lazy index, make the layer's placeholder tree, and have the daemon take the
//! lazy layers up. Returns once the image can be mounted.
//!
//! The registry is asked in as few round trips in a row as there can be: the tag; then the
//! image manifest and the manifests of the artifacts bound to it (indexes, profile); then the
//! config, the indexes' heads and the profile, all at once.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;

use lazylayer_index::distribution::{
    ARTIFACT_TYPE, IndexOrigin, IndexTrust, RemoteIndex, RemoteIndexes, fetch_index,
    find_bound_indexes, find_referrer_indexes,
};
use lazylayer_index::{BuildOptions, build_and_cache};
use lazylayer_source::{Digest, ImageReference, ImageSource, ManifestView, PlatformChoice};
use lazylayer_store::{FrontendMode, ImageRecord, Phase};

use crate::images::canonical_reference;
use crate::profiles::{PROFILE_ARTIFACT_TYPE, fetch_bound_profile};
use crate::{Engine, Error, Result};

/// How lazy layers are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// fanotify where the store's filesystem takes pre-content marks, FUSE elsewhere.
    #[default]
    Auto,
    /// fanotify pre-content events (Linux 6.14+, store on ext4, xfs or btrfs).
    Fanotify,
    /// A FUSE mount per lazy layer, with passthrough once a file is local.
    Fuse,
}

/// What to pull, and how.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Platform to pick from a multi-platform image (`OS/ARCH[/VARIANT]`; default: this
    /// machine's).
    pub platform: Option<String>,
    /// How new lazy layers are served.
    pub mode: Mode,
    /// Which of the registry's lazy indexes may be used.
    pub index_trust: IndexTrust,
    /// Refuse ([`Error::NoLazyIndex`]) instead of fetching a layer whole to index it, for
    /// callers with a cheaper way to get a whole image (a containerd snapshotter lets
    /// containerd download and unpack it).
    pub lazy_only: bool,
    /// Return once the layers are set up, while the daemon takes them up (places their marks):
    /// for a caller that makes sure of the daemon ([`Engine::start_daemon`]) before anything
    /// mounts the image, as a snapshotter's `Mounts` does, so that the take-up overlaps what
    /// the caller does meanwhile. A lazy layer must never be read before it is taken up.
    pub background_takeup: bool,
}

/// Which layer of the image an event is about.
#[derive(Clone, Copy, Debug)]
pub struct LayerLabel<'a> {
    /// Its place in the image, from 1, bottom first.
    pub position: usize,
    /// How many layers the image has.
    pub count: usize,
    /// Its blob digest.
    pub digest: &'a Digest,
}

impl std::fmt::Display for LayerLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {}/{} {}", self.position, self.count, self.digest)
    }
}

/// What a pull reports as it goes (see [`Engine::pull`]).
#[derive(Debug)]
pub enum PullEvent<'a> {
    /// The layer is in the store already, lazy or detached.
    Present {
        /// The layer.
        layer: LayerLabel<'a>,
        /// Where it is.
        phase: Phase,
    },
    /// The registry has a lazy index for the layer only as an unbound referrer, which the
    /// index trust policy does not accept: one is built here instead.
    IndexUnbound {
        /// The layer.
        layer: LayerLabel<'a>,
    },
    /// The registry's lazy index for the layer cannot be used; one is built here instead.
    IndexUnusable {
        /// The layer.
        layer: LayerLabel<'a>,
        /// Why.
        reason: String,
    },
    /// The layer has no lazy index: it is fetched whole, once, to build one.
    FetchingWhole {
        /// The layer.
        layer: LayerLabel<'a>,
        /// Its compressed size.
        size: u64,
    },
    /// Bytes of the layer fetched so far (while fetching it whole).
    Fetched {
        /// The layer.
        layer: LayerLabel<'a>,
        /// Compressed bytes so far.
        bytes: u64,
    },
    /// The whole layer was fetched and indexed.
    FetchedWhole {
        /// The layer.
        layer: LayerLabel<'a>,
    },
    /// The image has a prefetch profile bound to it in the registry, and the store had none:
    /// the files it lists are filled first.
    ProfileFetched {
        /// How many files it lists.
        files: usize,
    },
    /// The registry's prefetch profile of the image cannot be used; the pull goes on without.
    ProfileUnusable {
        /// Why.
        reason: String,
    },
    /// The layer's placeholder tree is made: it can be mounted.
    Ready {
        /// The layer.
        layer: LayerLabel<'a>,
        /// Entries in its index.
        entries: usize,
        /// Where its index came from.
        origin: IndexOrigin,
        /// How it is served while lazy.
        frontend: FrontendMode,
    },
}

/// A pulled image.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// Its record in the store.
    pub image: ImageRecord,
    /// How many layers had no lazy index and were fetched whole to build one.
    pub built_here: usize,
}

impl Engine {
    /// Pulls `image` lazily (see the module docs), reporting progress to `progress`.
    pub async fn pull(
        &self,
        image: &str,
        options: &PullOptions,
        progress: &(dyn Fn(PullEvent<'_>) + Sync),
    ) -> Result<Pulled> {
        let started = std::time::Instant::now();
        let reference: ImageReference = image.parse()?;
        let choice = PlatformChoice::from_flag(options.platform.as_deref())?;
        let client = self.registry_client()?;
        let source = ImageSource::open(&reference, &client)?;
        // The store is made ready (its modes, the pull lock, the fanotify probe, which waits
        // for the kernel to release a group) while the registry answers. The manifests of the
        // artifacts bound to the image come with the image manifest.
        let local = {
            let engine = self.clone();
            let mode = options.mode;
            tokio::task::spawn_blocking(move || -> Result<_> {
                engine.store.make_private()?;
                // Held until the image record names every layer: `gc` must not remove one
                // meanwhile.
                let lock = engine.store.lock_for_pull()?;
                Ok((lock, engine.frontend_for(mode)?))
            })
        };
        let (manifest, local) = tokio::join!(
            source.resolve_manifest(&choice, &[ARTIFACT_TYPE, PROFILE_ARTIFACT_TYPE]),
            local
        );
        let manifest = manifest?;
        let (_lock, frontend) =
            local.map_err(|e| Error::io("readying the store", std::io::Error::other(e)))??;
        tracing::debug!(elapsed = ?started.elapsed(), "{image}: manifest resolved");
        let store = &self.store;
        let repository = match &source {
            ImageSource::Registry { repository, .. } => Some(repository),
            ImageSource::Layout { .. } => None,
        };
        let mut remote = RemoteLookup::default();
        // While the config downloads: the registry's indexes of the layers not set up yet,
        // fetched all at once (one round trip for an image of many layers, not one per
        // layer), and the image's prefetch profile, if the registry binds one and this store
        // has none.
        let profile_path = store.profile_path(&manifest.manifest.digest);
        let mut wants_profile = !profile_path.exists();
        for layer in &manifest.layers {
            wants_profile &= store.phase(&layer.digest)? != Some(Phase::Detached);
        }
        let config = source.with_config(manifest.clone(), &choice);
        let indexes = async {
            match repository {
                Some(repository) => {
                    remote
                        .prefetch(repository, &manifest, store, options.index_trust)
                        .await
                }
                None => Ok(HashMap::new()),
            }
        };
        let profile = async {
            match repository {
                Some(repository) if wants_profile => {
                    Some(fetch_bound_profile(repository, &manifest).await)
                }
                _ => None,
            }
        };
        let (resolved, indexes, profile) = tokio::join!(config, indexes, profile);
        let resolved = resolved?;
        let mut prefetched = indexes?;
        tracing::debug!(elapsed = ?started.elapsed(), "{image}: config and indexes fetched");
        match profile {
            Some(Ok(Some(profile))) => {
                profile.save(&profile_path)?;
                progress(PullEvent::ProfileFetched {
                    files: profile.files.len(),
                });
            }
            Some(Err(e)) => progress(PullEvent::ProfileUnusable {
                reason: e.to_string(),
            }),
            Some(Ok(None)) | None => {}
        }
        // Layers written for lazy reading (eStargz, zstd:chunked) announce their table of
        // contents here.
        let annotations = lazylayer_index::toc::layer_annotations(&resolved.manifest_bytes);
        let mut built_here = 0;
        let mut daemon_starting = None;
        let count = resolved.layers.len();
        for (i, layer) in resolved.layers.iter().enumerate() {
            let label = LayerLabel {
                position: i + 1,
                count,
                digest: &layer.digest,
            };
            // Another pull may be setting this layer up: wait for it, then find it ready.
            let _layer_lock = {
                let (store, digest) = (store.clone(), layer.digest.clone());
                tokio::task::spawn_blocking(move || store.lock_layer(&digest))
                    .await
                    .map_err(|e| Error::io("locking a layer", std::io::Error::other(e)))??
            };
            if let Some(reason) = store.failure(&layer.digest)? {
                return Err(lazylayer_store::Error::LayerFailed {
                    image: canonical_reference(&reference),
                    layer: layer.digest.clone(),
                    reason,
                }
                .into());
            }
            if let Some(phase @ (Phase::Lazy | Phase::Detached)) = store.phase(&layer.digest)? {
                progress(PullEvent::Present {
                    layer: label,
                    phase,
                });
                continue;
            }
            let mut index = store.indexes().get_trusted(layer, options.index_trust)?;
            if index.is_none()
                && let Some(repository) = repository
            {
                let found = match prefetched.remove(&layer.digest) {
                    Some(found) => found,
                    None => {
                        remote
                            .index_of(repository, &resolved, layer, options.index_trust)
                            .await
                    }
                };
                match found {
                    Ok(Some((fetched, origin))) => {
                        store.indexes().put(layer, &fetched, origin)?;
                        index = Some((fetched, origin));
                    }
                    Ok(None) => {}
                    Err(RemoteIndexError::Unbound) => {
                        progress(PullEvent::IndexUnbound { layer: label })
                    }
                    Err(RemoteIndexError::Unusable(reason)) => progress(PullEvent::IndexUnusable {
                        layer: label,
                        reason,
                    }),
                }
            }
            if index.is_none()
                && let Some(toc) = lazylayer_index::toc::announced(
                    &layer.media_type,
                    annotations.get(i).unwrap_or(&HashMap::new()),
                )?
            {
                let diff_id = resolved
                    .config_summary
                    .rootfs
                    .diff_ids
                    .get(i)
                    .ok_or_else(|| {
                        Error::Refused(format!(
                            "the image config has no diff_id for layer {}",
                            layer.digest
                        ))
                    })?;
                // `None`: a layer without file data, as cheap to download whole.
                if let Some(made) =
                    lazylayer_index::toc::index_from_toc(&source, layer, &toc, diff_id).await?
                {
                    store.indexes().put(layer, &made, IndexOrigin::Toc)?;
                    index = Some((made, IndexOrigin::Toc));
                }
            }
            let fetched_whole = index.is_none();
            let (index, origin) = match index {
                Some(found) => found,
                None if options.lazy_only => {
                    return Err(Error::NoLazyIndex {
                        image: canonical_reference(&reference),
                        layer: layer.digest.clone(),
                    });
                }
                None => {
                    progress(PullEvent::FetchingWhole {
                        layer: label,
                        size: layer.size,
                    });
                    let diff_id = resolved.config_summary.rootfs.diff_ids.get(i);
                    let index = build_and_cache(
                        &source,
                        layer,
                        diff_id,
                        BuildOptions::default(),
                        &store.span_dir(),
                        &|bytes| {
                            progress(PullEvent::Fetched {
                                layer: label,
                                bytes,
                            })
                        },
                    )
                    .await?;
                    progress(PullEvent::FetchedWhole { layer: label });
                    store.indexes().put(layer, &index, IndexOrigin::Local)?;
                    built_here += 1;
                    (index, IndexOrigin::Local)
                }
            };
            let index = Arc::new(index);
            daemon_starting.get_or_insert_with(|| self.start_daemon_early());
            store.prepare_layer(&index, frontend)?;
            if fetched_whole {
                // The registry served the whole blob to index it: status counts it.
                store.count_fetched(&layer.digest, layer.size)?;
            }
            tracing::debug!(elapsed = ?started.elapsed(), "{image}: layer {} set up", i + 1);
            progress(PullEvent::Ready {
                layer: label,
                entries: index.entries.len(),
                origin,
                frontend,
            });
        }
        let config: serde_json::Value = serde_json::from_slice(&resolved.config_bytes)
            .map_err(|e| Error::Refused(format!("the image config is not JSON: {e}")))?;
        let record = ImageRecord {
            reference: canonical_reference(&reference),
            manifest: resolved.manifest.digest.clone(),
            layers: resolved.layers.clone(),
            config,
        };
        store.save_image(&record)?;
        let engine = self.clone();
        let takeup = async move {
            if let Some(starting) = daemon_starting {
                let _ = starting.await;
            }
            engine.start_daemon().await
        };
        if options.background_takeup {
            let shown = image.to_string();
            tokio::spawn(async move {
                // Whoever mounts the image starts the daemon again and says what fails.
                if let Err(e) = takeup.await {
                    tracing::warn!("{shown}: the daemon did not take the layers up: {e}");
                }
            });
            tracing::debug!(elapsed = ?started.elapsed(), "{image}: pulled, daemon taking up");
        } else {
            takeup.await?;
            tracing::debug!(elapsed = ?started.elapsed(), "{image}: pulled, daemon serving");
        }
        Ok(Pulled {
            image: record,
            built_here,
        })
    }

    /// The frontend new lazy layers get in `mode` on this store.
    fn frontend_for(&self, mode: Mode) -> Result<FrontendMode> {
        let root = &self.options.root;
        let pre_content = lazylayer_fanotify::supports_pre_content(root)
            .map_err(|e| Error::io(format!("probing {}", root.display()), e))?;
        Ok(match mode {
            Mode::Fanotify if !pre_content => {
                return Err(Error::Refused(format!(
                    "the store {} is on a filesystem without fanotify pre-content support \
                     (ext4, xfs and btrfs have it on Linux 6.14+; tmpfs and overlayfs do not): \
                     use a --root on one of those, or --mode fuse",
                    root.display()
                )));
            }
            Mode::Fanotify => FrontendMode::Fanotify,
            Mode::Fuse => FrontendMode::Fuse,
            Mode::Auto if pre_content => FrontendMode::Fanotify,
            Mode::Auto => FrontendMode::Fuse,
        })
    }
}

/// Why a registry index is not used for a layer.
enum RemoteIndexError {
    /// Only an unbound referrer has one, and the policy does not accept those.
    Unbound,
    /// The registry's index is broken or foreign (why).
    Unusable(String),
}

/// The registry's lazy indexes of the image being pulled, looked up once each: the bound ones
/// first, the referrers only when a layer has no bound index.
#[derive(Default)]
struct RemoteLookup {
    bound: Option<std::result::Result<RemoteIndexes, String>>,
    referrers: Option<std::result::Result<RemoteIndexes, String>>,
}

/// What looking for a layer's index in the registry found.
type IndexLookup =
    std::result::Result<Option<(lazylayer_index::LayerIndex, IndexOrigin)>, RemoteIndexError>;

/// Registry indexes fetched at once.
const PREFETCHES_IN_FLIGHT: usize = 8;

/// Fetches the index `descriptor` found for `layer` (see [`RemoteLookup::prefetch`]).
async fn fetch_one(
    repository: lazylayer_source::Repository,
    layer: lazylayer_source::BlobDescriptor,
    descriptor: std::result::Result<Option<(RemoteIndex, IndexOrigin)>, RemoteIndexError>,
) -> (Digest, IndexLookup) {
    let found = match descriptor {
        Ok(Some((descriptor, origin))) => fetch_index(&repository, &descriptor, &layer)
            .await
            .map(|index| Some((index, origin)))
            .map_err(|e| RemoteIndexError::Unusable(e.to_string())),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    (layer.digest, found)
}

impl RemoteLookup {
    /// The registry's indexes of `image`'s layers that the store has neither set up nor an
    /// index for, looked up and fetched concurrently (a few at a time), by layer: even one,
    /// since this runs while the config downloads.
    async fn prefetch(
        &mut self,
        repository: &lazylayer_source::Repository,
        image: &impl ManifestView,
        store: &lazylayer_store::Store,
        trust: IndexTrust,
    ) -> Result<HashMap<Digest, IndexLookup>> {
        let mut wanted = Vec::new();
        for layer in image.layers() {
            if matches!(
                store.phase(&layer.digest)?,
                Some(Phase::Lazy | Phase::Detached)
            ) || store.indexes().get_trusted(layer, trust)?.is_some()
            {
                continue;
            }
            let descriptor = self.descriptor_of(repository, image, layer, trust).await;
            wanted.push(fetch_one(repository.clone(), layer.clone(), descriptor));
        }
        Ok(futures_util::stream::iter(wanted)
            .buffer_unordered(PREFETCHES_IN_FLIGHT)
            .collect()
            .await)
    }

    /// The index of `layer` that `trust` accepts, fetched and verified, if the registry has
    /// one.
    async fn index_of(
        &mut self,
        repository: &lazylayer_source::Repository,
        image: &impl ManifestView,
        layer: &lazylayer_source::BlobDescriptor,
        trust: IndexTrust,
    ) -> IndexLookup {
        let descriptor = self.descriptor_of(repository, image, layer, trust).await;
        fetch_one(repository.clone(), layer.clone(), descriptor)
            .await
            .1
    }

    /// Where the registry keeps the index of `layer` that `trust` accepts (the bound ones are
    /// looked up first, the referrers only when a layer has no bound index; each list once).
    async fn descriptor_of(
        &mut self,
        repository: &lazylayer_source::Repository,
        image: &impl ManifestView,
        layer: &lazylayer_source::BlobDescriptor,
        trust: IndexTrust,
    ) -> std::result::Result<Option<(RemoteIndex, IndexOrigin)>, RemoteIndexError> {
        if self.bound.is_none() {
            let found = find_bound_indexes(repository, image).await;
            self.bound = Some(found.map_err(|e| e.to_string()));
        }
        let descriptor = match self.bound.as_ref().expect("looked up") {
            Ok(bound) => bound.by_layer.get(&layer.digest).cloned(),
            Err(reason) => return Err(RemoteIndexError::Unusable(reason.clone())),
        };
        if let Some(descriptor) = descriptor {
            return Ok(Some((descriptor, IndexOrigin::Bound)));
        }
        if self.referrers.is_none() {
            let found = find_referrer_indexes(repository, image).await;
            self.referrers = Some(found.map_err(|e| e.to_string()));
        }
        let descriptor = match self.referrers.as_ref().expect("looked up") {
            Ok(referrers) => referrers.by_layer.get(&layer.digest).cloned(),
            // A broken referrer is said only to those who would have used it.
            Err(reason) if trust.accepts(IndexOrigin::Referrer) => {
                return Err(RemoteIndexError::Unusable(reason.clone()));
            }
            Err(_) => None,
        };
        match descriptor {
            None => Ok(None),
            Some(_) if !trust.accepts(IndexOrigin::Referrer) => Err(RemoteIndexError::Unbound),
            Some(descriptor) => Ok(Some((descriptor, IndexOrigin::Referrer))),
        }
    }
}
