//! # lazylayer-snapshotter: lazylayer as a containerd remote snapshotter
//!
//! containerd's snapshots gRPC service on a unix socket, registered with containerd as a proxy
//! plugin. When containerd's unpacker prepares a layer and its labels name the image and the
//! layer (`containerd.io/snapshot.ref` plus CRI's `cri.image-ref`/`cri.layer-digest` or
//! ctr-remote's `stargz.reference`/`stargz.digest`), the layer is made available lazily through
//! the engine's pull pipeline and committed under the target name at once, and containerd
//! never downloads its blob. Everything else (images without a usable lazy index, a plain
//! `ctr image pull`, containers' writable layers) works as containerd's own overlay
//! snapshotter does.
//!
//! Data flow: containerd -> [`service`] (gRPC) -> [`Snapshotter`] -> [`remote`] (labels ->
//! `lazylayer-engine` pull) and [`metadata`] (snapshots in redb) -> [`mounts`] (overlay
//! over layer directories) -> containerd mounts them for the container. The engine's guardian
//! keeps the daemon and its fanotify group alive while lazy layers are in use.

mod api;
pub mod labels;
pub mod metadata;
pub mod mounts;
pub mod remote;
pub mod service;
mod snapshotter;
mod usage;

pub use api::{Mount, snapshots};
pub use service::{ServeOptions, serve};
pub use snapshotter::{Error, Snapshotter, SnapshotterOptions};
