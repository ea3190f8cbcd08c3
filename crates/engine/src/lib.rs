//! # lazylayer-engine: the pipeline as a library
//!
//! What the `lazylayer` command line and long-running services (a containerd snapshotter, a
//! podman layer store) share: [`Engine::pull`] resolves an image, finds, fetches
//! or builds each layer's lazy index, makes its placeholder tree and has the daemon take it up;
//! [`Engine::mount`] composes the layers with overlayfs under a fresh writable layer; and
//! [`Engine::run`] runs a container on the image in a freshly started helper process. Progress
//! is reported through [`PullEvent`]s, never printed: the caller decides what a person sees.
//!
//! Data flow: image reference -> `lazylayer-source` (registry, manifests) -> `lazylayer-index`
//! (lazy index) -> `lazylayer-store` (layer directories) -> `lazylayer-daemon` (fanotify or FUSE
//! frontend) -> `lazylayer-overlay` (mount) -> `lazylayer-container` (the workload).

mod daemon;
mod error;
mod gc;
pub mod guardian;
mod images;
mod lazy_pulls;
mod mount;
pub mod profiles;
mod pull;
mod run;

use std::path::PathBuf;

pub use error::{Error, Result};
pub use images::canonical_reference;
pub use lazy_pulls::{LazyPull, LazyPulls};
pub use lazylayer_index::distribution::{IndexOrigin, IndexTrust};
pub use lazylayer_store::GcReport;
pub use profiles::PushedProfile;
pub use pull::{LayerLabel, Mode, PullEvent, PullOptions, Pulled};
pub use run::{Recorded, RunOptions, RunOutcome, clean_stale_runs, container_helper_main};

use lazylayer_source::{ClientOptions, RegistryClient};
use lazylayer_store::{ImageRecord, Store};

/// How an [`Engine`] reaches its store, its registries and its own program.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The store root (`--root`).
    pub root: PathBuf,
    /// Registries (HOST or HOST:PORT) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// containerd's registry hosts directory (mirrors and servers from hosts.toml), for the
    /// engine's registry client and the daemon it starts.
    pub hosts_dir: Option<PathBuf>,
    /// The `lazylayer` program: started as `lazylayer serve` for the daemon and as the
    /// container helper (a service or benchmark linking this library is another program).
    pub program: PathBuf,
}

/// The pipeline over one store.
#[derive(Clone, Debug)]
pub struct Engine {
    options: EngineOptions,
    store: Store,
}

impl Engine {
    /// An engine over the store at `options.root`.
    pub fn new(options: EngineOptions) -> Engine {
        let store = Store::new(&options.root);
        Engine { options, store }
    }

    /// The options it was made with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The registry client for these options.
    pub fn registry_client(&self) -> Result<RegistryClient> {
        Ok(RegistryClient::new(ClientOptions {
            insecure_registries: self.options.insecure_registries.clone(),
            hosts_dir: self.options.hosts_dir.clone(),
            ..ClientOptions::default()
        })?)
    }

    /// The pulled image that `image` names: by reference (normalised as for pulling), or by a
    /// prefix of its manifest digest.
    pub fn find_image(&self, image: &str) -> Result<ImageRecord> {
        images::find(&self.store, image)
    }
}
