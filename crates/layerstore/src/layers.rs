//! Which layer a path stands for, and making it available: containers/storage asks for
//! `<reference>/<layer digest>` and must be answered right then, so a layer path resolves to
//! - the image it was served from before (kept in [`Uses`]: the path outlives tag moves and
//!   restarts), else
//! - any pulled image holding the layer, lazy or detached (layers are content-addressed and
//!   shared between images), else
//! - a lazy pull of the reference through the engine (lazy indexes only, with the index trust
//!   policy of `pull`), once per reference at a time; a refusal stands briefly for the
//!   image's other layers, which containers/storage asks for next.
//!
//! Anything it cannot serve is "not here" to containers/storage, which then downloads the
//! layer as usual.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lazylayer_engine::{Engine, IndexOrigin, IndexTrust, LazyPulls, Mode};
use lazylayer_index::Span;
use lazylayer_source::{BlobDescriptor, Digest, ImageReference, ImageSource};
use lazylayer_store::{ImageRecord, Phase};

use crate::blob::{self, Verified};
use crate::info::{LayerInfo, config_diff_id};
use crate::uses::{Released, Uses};

/// The holder name of images podman's layers stand for ([`lazylayer_store::Store::hold_image`]).
pub const HOLDER: &str = "podman";

/// Verified runs of blob bytes kept for sequential readers.
const RECENT_RUNS: usize = 4;

/// A layer path's layer, as served.
#[derive(Debug)]
pub struct ServedLayer {
    /// The layer path's image reference.
    pub reference: String,
    /// The layer blob.
    pub blob: BlobDescriptor,
    /// The image it is served from.
    pub manifest: Digest,
    /// The `info` file.
    pub info: Vec<u8>,
    /// Where its index came from (an unbound referrer's spans are not trusted for `blob`).
    pub origin: IndexOrigin,
    /// The blob's spans and their digests (from the index).
    pub spans: Vec<Span>,
}

/// How the layer store pulls.
#[derive(Clone, Copy, Debug, Default)]
pub struct PullPolicy {
    /// How new lazy layers are served.
    pub mode: Mode,
    /// Which of the registry's lazy indexes may be used.
    pub index_trust: IndexTrust,
}

/// The layers served, and the pulls and uses behind them.
pub struct Layers {
    pulls: LazyPulls,
    uses: Uses,
    served: Mutex<HashMap<(String, Digest), Arc<ServedLayer>>>,
    sources: Mutex<HashMap<String, ImageSource>>,
    recent: Mutex<VecDeque<(Digest, Verified)>>,
    /// Held while a use is counted or released together with its image's hold.
    accounting: Mutex<()>,
}

impl Layers {
    /// Serves layers from `engine`'s store, pulling as `policy` says, with the use counts in
    /// `uses`.
    pub fn new(engine: Engine, policy: PullPolicy, uses: Uses) -> Layers {
        Layers {
            pulls: LazyPulls::new(engine, policy.mode, policy.index_trust),
            uses,
            served: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
            accounting: Mutex::new(()),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        self.pulls.engine()
    }

    /// The layer the path `reference`/`digest` stands for, made available (see the module
    /// docs), or why it cannot be.
    pub async fn resolve(
        &self,
        reference: &str,
        digest: &Digest,
    ) -> Result<Arc<ServedLayer>, String> {
        let key = (reference.to_string(), digest.clone());
        let cached = self
            .served
            .lock()
            .expect("served layers")
            .get(&key)
            .cloned();
        if let Some(served) = cached
            && self.still_served(&served)?
        {
            return Ok(served);
        }
        let store = self.engine().store();
        let mut image = None;
        if let Some(manifest) = self.uses.served_from(reference, digest) {
            image = store.image(&manifest).map_err(|e| e.to_string())?;
        }
        if image.is_none() {
            image = store
                .images()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|i| i.layers.iter().any(|l| l.digest == *digest));
        }
        let image = match image {
            Some(image) if self.present(digest)? => image,
            _ => self.pull(reference, digest).await?,
        };
        let served = Arc::new(self.serve_from(reference, &image, digest)?);
        self.uses.record(reference, digest, &served.manifest)?;
        self.served
            .lock()
            .expect("served layers")
            .insert(key, served.clone());
        Ok(served)
    }

    /// Whether the layer is in the store, lazy or detached.
    fn present(&self, digest: &Digest) -> Result<bool, String> {
        Ok(matches!(
            self.engine()
                .store()
                .phase(digest)
                .map_err(|e| e.to_string())?,
            Some(Phase::Lazy | Phase::Detached)
        ))
    }

    /// Whether a layer served before still is: present, with its image's record.
    fn still_served(&self, served: &ServedLayer) -> Result<bool, String> {
        Ok(self.present(&served.blob.digest)?
            && self
                .engine()
                .store()
                .image(&served.manifest)
                .map_err(|e| e.to_string())?
                .is_some())
    }

    /// Pulls `reference` lazily (once at a time; again if the image pulled before lacks
    /// `layer`: its tag may have moved), owning the image if the pull added it.
    async fn pull(&self, reference: &str, layer: &Digest) -> Result<ImageRecord, String> {
        let pulled = self
            .pulls
            .pull(reference, Some(layer))
            .await
            .map_err(|e| format!("{reference} is not available lazily: {e}"))?;
        if pulled.new_image {
            self.uses.mark_owned(&pulled.image.manifest)?;
        }
        Ok(pulled.image)
    }

    /// The layer `digest` of `image`, as served for the path of `reference`.
    fn serve_from(
        &self,
        reference: &str,
        image: &ImageRecord,
        digest: &Digest,
    ) -> Result<ServedLayer, String> {
        let Some(position) = image.layers.iter().position(|l| l.digest == *digest) else {
            return Err(format!(
                "{digest} is not a layer of {reference} ({}, this machine's platform)",
                image.manifest
            ));
        };
        let blob = image.layers[position].clone();
        let indexes = self.engine().store().indexes();
        let index = indexes
            .get(&blob)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("layer {digest} has no index in the store"))?;
        let origin = indexes.origin(&blob).map_err(|e| e.to_string())?;
        let diff_id = config_diff_id(&image.config, position).ok_or_else(|| {
            format!(
                "the config of {} names no diff ID for layer {}",
                image.reference,
                position + 1
            )
        })?;
        let info = LayerInfo::new(&index, diff_id)?;
        Ok(ServedLayer {
            reference: reference.to_string(),
            blob,
            manifest: image.manifest.clone(),
            info: info.to_bytes(),
            origin,
            spans: index.spans.clone(),
        })
    }

    /// Counts a use of the layer path (containers/storage created `use`) under the image
    /// `served_from` (or the one its uses already are): the image is held first.
    pub fn add_use(
        &self,
        reference: &str,
        digest: &Digest,
        served_from: &Digest,
    ) -> Result<(), String> {
        let _accounting = self.accounting.lock().expect("use accounting");
        let manifest = self.uses.image_to_count(reference, digest, served_from);
        self.engine()
            .store()
            .hold_image(&manifest, HOLDER)
            .map_err(|e| e.to_string())?;
        self.uses.add_use(reference, digest, &manifest)
    }

    /// The image the layer path was served from, as recorded (for a use signalled when the
    /// layer cannot be resolved now).
    pub fn recorded_image(&self, reference: &str, digest: &Digest) -> Option<Digest> {
        self.uses.served_from(reference, digest)
    }

    /// Ends a use of the layer path (containers/storage removed its directory): at the image's
    /// last use its hold ends, and an image this store pulled is forgotten. Counting and
    /// holding are one step against concurrent uses (FUSE requests come on several threads).
    pub fn release(&self, reference: &str, digest: &Digest) -> Result<(), String> {
        let _accounting = self.accounting.lock().expect("use accounting");
        let Released::Unused { manifest, owned } = self.uses.release(reference, digest)? else {
            return Ok(());
        };
        let store = self.engine().store();
        store
            .release_image(&manifest, HOLDER)
            .map_err(|e| e.to_string())?;
        self.served
            .lock()
            .expect("served layers")
            .retain(|_, s| s.manifest != manifest);
        if owned {
            match store.forget_image(&manifest) {
                Ok(()) => tracing::info!("podman no longer uses {manifest}: forgotten"),
                // Someone else holds it (containerd): theirs to release.
                Err(lazylayer_store::Error::Held { .. }) => {}
                Err(e) if store.image(&manifest).ok().flatten().is_none() => {
                    tracing::debug!("{manifest} was forgotten already: {e}")
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Bytes `range` of `served`'s blob (all of them, up to the blob's end: a FUSE read
    /// answered short is taken for the end of the file), fetched and verified span by span.
    pub async fn read_blob(
        &self,
        served: &ServedLayer,
        range: Range<u64>,
    ) -> Result<Bytes, String> {
        let digest = &served.blob.digest;
        let range = range.start..range.end.min(served.blob.size);
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        // A table of contents vouches for the chunks of file data, not for the tar headers
        // between them: that blob is checked only whole, once the layer is complete.
        if matches!(served.origin, IndexOrigin::Referrer | IndexOrigin::Toc)
            && self
                .engine()
                .store()
                .phase(digest)
                .map_err(|e| e.to_string())?
                != Some(Phase::Detached)
        {
            // Nothing vouches for a referrer's span digests until the whole layer was checked.
            return Err(format!(
                "the blob of {digest} is served once the layer is complete: its index is {}",
                match served.origin {
                    IndexOrigin::Toc => "its table of contents, which covers file data only",
                    _ => "an unbound referrer",
                }
            ));
        }
        for (layer, run) in self.recent.lock().expect("recent runs").iter() {
            if layer == digest
                && let Some(bytes) = run.slice(range.clone())
            {
                return Ok(bytes);
            }
        }
        let (first, last) = blob::spans_for(&served.spans, range.clone())
            .ok_or_else(|| format!("no span of {digest} holds bytes {range:?}"))?;
        let start = served.spans[first].compressed_start;
        let end = served.spans[last].compressed_end;
        if end - start > blob::MAX_RUN {
            // A span this large (a single-frame zstd layer) is verified only whole: too much
            // to hold for one read.
            return Err(format!(
                "span {first} of {digest} holds {} bytes: the blob is served only in spans of up \
                 to {} bytes",
                end - start,
                blob::MAX_RUN
            ));
        }
        let source = self.source(&served.reference)?;
        let bytes = source
            .read_range(digest, start..end)
            .await
            .map_err(|e| e.to_string())?;
        if let Err(span) = blob::check_spans(&served.spans, first, last, &bytes) {
            return Err(format!(
                "span {span} of {digest} from the registry does not match its digest"
            ));
        }
        let run = Verified { start, bytes };
        let answer = run
            .slice(range)
            .expect("the spans fetched hold the range's start");
        let mut recent = self.recent.lock().expect("recent runs");
        recent.push_front((digest.clone(), run));
        recent.truncate(RECENT_RUNS);
        Ok(answer)
    }

    /// The registry source of `reference`'s repository (one client per reference).
    fn source(&self, reference: &str) -> Result<ImageSource, String> {
        let mut sources = self.sources.lock().expect("sources");
        if let Some(source) = sources.get(reference) {
            return Ok(source.clone());
        }
        let parsed: ImageReference = reference.parse().map_err(|e| format!("{e}"))?;
        let client = self.engine().registry_client().map_err(|e| e.to_string())?;
        let source = ImageSource::open(&parsed, &client).map_err(|e| e.to_string())?;
        sources.insert(reference.to_string(), source.clone());
        Ok(source)
    }
}
