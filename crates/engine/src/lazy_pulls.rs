//! Lazy pulls for long-running services (the containerd snapshotter, the podman layer store):
//! they learn which image a layer belongs to one layer at a time, so the first request for an
//! image pulls it (lazy indexes only: a service has a cheaper way to get a whole image, its
//! engine's own download) and the requests for its other layers, which follow at once, share
//! that pull, or its refusal, instead of asking the registry again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazylayer_source::Digest;
use lazylayer_store::{ImageRecord, Phase};

use crate::{Engine, IndexTrust, Mode, PullOptions};

/// How long a refusal stands for the layers of the same image.
const REFUSAL_STANDS: Duration = Duration::from_secs(30);

/// An image pulled lazily.
#[derive(Clone, Debug)]
pub struct LazyPull {
    /// Its record in the store.
    pub image: ImageRecord,
    /// Whether this pull added the image to the store (the service then owns its record).
    pub new_image: bool,
}

/// What the last pull of an image reference found.
#[derive(Default)]
enum Pulled {
    /// Not pulled yet.
    #[default]
    Not,
    /// Pulled lazily.
    Lazily(ImageRecord),
    /// Not available lazily (why), as found at that time.
    Refused(Instant, String),
}

/// Pulls images lazily, once per image reference at a time.
pub struct LazyPulls {
    engine: Engine,
    mode: Mode,
    index_trust: IndexTrust,
    /// See [`PullOptions::background_takeup`].
    background_takeup: bool,
    /// Per image reference: held while it is pulled.
    pulling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Pulled>>>>,
}

impl LazyPulls {
    /// Pulls through `engine`, serving new lazy layers in `mode` and trusting indexes as
    /// `index_trust` says.
    pub fn new(engine: Engine, mode: Mode, index_trust: IndexTrust) -> LazyPulls {
        LazyPulls {
            engine,
            mode,
            index_trust,
            background_takeup: false,
            pulling: Mutex::new(HashMap::new()),
        }
    }

    /// Pulls return while the daemon takes the new layers up, for a caller that starts the
    /// daemon itself before anything mounts a pulled image (see
    /// [`PullOptions::background_takeup`]).
    pub fn taking_up_in_background(self) -> LazyPulls {
        LazyPulls {
            background_takeup: true,
            ..self
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The image `reference` names, pulled lazily (or found pulled by an earlier request, if
    /// it is still whole in the store and has the layer `needs`: a tag may have moved since),
    /// or why it cannot be.
    pub async fn pull(&self, reference: &str, needs: Option<&Digest>) -> Result<LazyPull, String> {
        let slot = self
            .pulling
            .lock()
            .expect("pull table lock")
            .entry(reference.to_string())
            .or_default()
            .clone();
        let mut pulled = slot.lock().await;
        match &*pulled {
            // A record pulled for an earlier layer still serves, unless a collection removed
            // it or one of its layers since.
            Pulled::Lazily(image)
                if needs.is_none_or(|d| image.layers.iter().any(|l| l.digest == *d))
                    && self.still_whole(image)? =>
            {
                return Ok(LazyPull {
                    image: image.clone(),
                    new_image: false,
                });
            }
            Pulled::Refused(when, why) if when.elapsed() < REFUSAL_STANDS => {
                return Err(why.clone());
            }
            _ => {}
        }
        let store = self.engine.store();
        let before = store.images().map_err(|e| e.to_string())?;
        let options = PullOptions {
            platform: None,
            mode: self.mode,
            index_trust: self.index_trust,
            lazy_only: true,
            background_takeup: self.background_takeup,
        };
        let image = match self.engine.pull(reference, &options, &|_| {}).await {
            Ok(done) => done.image,
            Err(e) => {
                *pulled = Pulled::Refused(Instant::now(), e.to_string());
                return Err(e.to_string());
            }
        };
        let new_image = !before.iter().any(|i| i.manifest == image.manifest);
        *pulled = Pulled::Lazily(image.clone());
        Ok(LazyPull { image, new_image })
    }

    /// Whether `image` is still pulled: its record in the store and every layer lazy or
    /// detached.
    fn still_whole(&self, image: &ImageRecord) -> Result<bool, String> {
        let store = self.engine.store();
        if store
            .image(&image.manifest)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Ok(false);
        }
        for layer in &image.layers {
            match store.phase(&layer.digest).map_err(|e| e.to_string())? {
                Some(Phase::Lazy | Phase::Detached) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }
}
