//! # lazylayer-layerstore: lazylayer as podman's and CRI-O's additional layer store
//!
//! containers/storage (podman, CRI-O, buildah) asks an "additional layer store", configured as
//! `additionallayerstores = ["MOUNTPOINT:ref"]` in storage.conf, for each layer of an image it
//! pulls, before downloading it. This crate answers from a FUSE filesystem at MOUNTPOINT: a
//! lookup of `<base64 reference>/<layer digest>/diff` pulls the image lazily through the
//! engine (lazy indexes only) and points `diff` at the layer's directory, so podman stores the
//! layer without downloading it and its overlay mounts take the layer directory as a lower.
//!
//! Data flow: containers/storage -> [`filesystem`] (FUSE names) -> [`layers`] (path -> pulled
//! layer, `lazylayer-engine` pull) and [`uses`] (use counts, image holds) -> `diff` symlink ->
//! the layer directory, served by the daemon while lazy. [`info`] is the layer record,
//! [`blob`] the compressed layer read and verified span by span.

pub mod blob;
pub mod filesystem;
pub mod info;
pub mod layers;
pub mod mount;
pub mod names;
pub mod uses;

use std::path::PathBuf;
use std::sync::Arc;

pub use layers::{HOLDER, Layers, PullPolicy};
pub use mount::StoreMount;

use lazylayer_engine::Engine;

/// Mounts the layer store over `engine`'s store at `mountpoint`, pulling as `policy` says;
/// async work runs on `runtime`.
pub fn mount(
    engine: Engine,
    policy: PullPolicy,
    mountpoint: &std::path::Path,
    runtime: tokio::runtime::Handle,
) -> Result<StoreMount, String> {
    let store = engine.store();
    store.make_private().map_err(|e| e.to_string())?;
    let uses = uses::Uses::open(&uses_file(store.root()))?;
    let layers = Arc::new(Layers::new(engine, policy, uses));
    StoreMount::mount(layers, runtime, mountpoint)
        .map_err(|e| format!("mounting the layer store at {}: {e}", mountpoint.display()))
}

/// Where the use counts are kept.
pub fn uses_file(root: &std::path::Path) -> PathBuf {
    root.join("layerstore").join("uses.json")
}
