//! Taking up the store's lazy layers: each one not served yet is opened for population, its
//! unfilled files become known to [`Demand`](super::demand::Demand), its frontend makes their
//! readers wait (marks, or a FUSE mount by the holder), and its background population starts.
//! A failed layer is only opened to have its files denied (see `failure.rs`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lazylayer_source::{ImageReference, ImageSource};
use lazylayer_store::{Layer, Phase};

use crate::error::{LayerError, ServeError};
use crate::worker::Worker;
use crate::worker::lifecycle::Managed;

impl Worker {
    /// Takes up every lazy layer of the store not yet served.
    pub(super) async fn refresh(self: &Arc<Self>) -> Result<(), ServeError> {
        let _one_at_a_time = self.taking_up.lock().await;
        for image in self.store.images()? {
            for blob in &image.layers {
                let store_error = |cause| LayerError::Store {
                    layer: blob.digest.clone(),
                    cause,
                };
                let phase = self.store.phase(&blob.digest).map_err(store_error)?;
                if self
                    .layers
                    .lock()
                    .expect("layers")
                    .contains_key(&blob.digest)
                    || !matches!(phase, Some(Phase::Lazy | Phase::Failed))
                    || (phase == Some(Phase::Failed)
                        && self.denied.lock().expect("denied").contains(&blob.digest))
                {
                    continue;
                }
                let started = std::time::Instant::now();
                let index = match self
                    .store
                    .indexes()
                    .get(blob)
                    .map_err(|e| store_error(e.into()))?
                {
                    Some(index) => Arc::new(index),
                    None => return Err(LayerError::NoIndex(blob.digest.clone()).into()),
                };
                let source_error = |cause| LayerError::Source {
                    layer: blob.digest.clone(),
                    image: image.reference.clone(),
                    cause,
                };
                let reference: ImageReference = image.reference.parse().map_err(source_error)?;
                let mut source =
                    ImageSource::open(&reference, &self.client).map_err(source_error)?;
                // An index fetched head first fetches its missing windows from the repository
                // it came from, which has the layer too: another image sharing the layer may
                // be in a repository without the index.
                if let Some(windows) = index.windows_source()
                    && let ImageSource::Registry { repository, .. } = &source
                    && format!("{}/{}", repository.registry(), repository.name())
                        != windows.repository
                    && index.missing_windows() > 0
                {
                    let origin: ImageReference = format!("{}@{}", windows.repository, blob.digest)
                        .parse()
                        .map_err(source_error)?;
                    source = ImageSource::open(&origin, &self.client).map_err(source_error)?;
                }
                tracing::debug!(elapsed = ?started.elapsed(), "{}: index read", blob.digest);
                let layer = Arc::new(self.store.open_layer(index, source).map_err(store_error)?);
                tracing::debug!(elapsed = ?started.elapsed(), "{}: opened", blob.digest);
                if phase == Some(Phase::Failed) {
                    // Failed for good: its files are only denied, to readers of older mounts.
                    self.deny_every_file(&layer).await;
                    continue;
                }
                let mode = layer.mode().map_err(store_error)?;
                let unfilled =
                    self.demand
                        .register(&layer, mode)
                        .map_err(|cause| LayerError::Marks {
                            layer: blob.digest.clone(),
                            cause,
                        })?;
                self.demand
                    .frontends()
                    .of(mode)
                    .take_up(&layer, &unfilled)
                    .await?;
                tracing::debug!(elapsed = ?started.elapsed(), "{}: taken up", blob.digest);
                let managed = Arc::new(Managed::new(layer));
                self.layers
                    .lock()
                    .expect("layers")
                    .insert(blob.digest.clone(), managed.clone());
                let first = self.profile_files(&managed.layer);
                let worker = self.clone();
                tokio::spawn(async move { worker.populate_in_background(managed, first).await });
            }
        }
        Ok(())
    }

    /// The entries of `layer` to fill first: those the prefetch profiles of images using it
    /// list, in order, then those an eStargz layer puts before its prefetch landmark, then the
    /// files nearly every container start opens ([`lazylayer_store::startup_files`]), each
    /// once.
    fn profile_files(&self, layer: &Layer) -> Vec<usize> {
        let recorded = self.recorded_profile_files(layer);
        let prioritized = lazylayer_index::toc::prioritized(&layer.index);
        let startup = lazylayer_store::startup_files(&layer.index);
        let mut listed = HashSet::new();
        recorded
            .into_iter()
            .chain(prioritized)
            .chain(startup)
            .filter(|i| listed.insert(*i))
            .collect()
    }

    /// The entries of `layer` that the prefetch profiles of images using it list, in order.
    fn recorded_profile_files(&self, layer: &Layer) -> Vec<usize> {
        // Made when a profile lists a file of this layer, keyed by the paths as profiles name
        // them (`Entry::display_path`), borrowed where they are UTF-8: a copy of every path
        // of a 100,000-entry layer was about 9 MiB at take-up, for layers with no profile too.
        let mut by_path: Option<HashMap<Cow<'_, str>, usize>> = None;
        let images = match self.store.images() {
            Ok(images) => images,
            Err(e) => {
                tracing::warn!("layer {}: no profile read: {e}", layer.digest);
                return Vec::new();
            }
        };
        let mut first = Vec::new();
        // Profiles come from the registry too: each file once, without a quadratic scan.
        let mut listed = HashSet::new();
        for image in images {
            if !image.layers.iter().any(|l| l.digest == layer.digest) {
                continue;
            }
            let path = self.store.profile_path(&image.manifest);
            let profile = match lazylayer_store::Profile::load(&path) {
                Ok(Some(profile)) => profile,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("{}: {e}; not used", path.display());
                    continue;
                }
            };
            for file in profile.files.iter().filter(|f| f.layer == layer.digest) {
                let by_path = by_path.get_or_insert_with(|| paths_as_profiles_name_them(layer));
                if let Some(&i) = by_path.get(file.path.as_str())
                    && listed.insert(i)
                {
                    first.push(i);
                }
            }
        }
        first
    }
}

/// Each entry of `layer` by its path as a profile names it ([`Entry::display_path`]: lossy
/// UTF-8, `.` for the root).
///
/// [`Entry::display_path`]: lazylayer_index::Entry::display_path
fn paths_as_profiles_name_them(layer: &Layer) -> HashMap<Cow<'_, str>, usize> {
    let entries = &layer.index.entries;
    let mut by_path = HashMap::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let path = match entry.path.as_slice() {
            b"" => Cow::Borrowed("."),
            path => String::from_utf8_lossy(path),
        };
        by_path.insert(path, i);
    }
    by_path
}
