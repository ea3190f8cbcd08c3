//! # lazylayer-daemon: `lazylayer serve`
//!
//! The processes behind lazy layers. The [`holder`] keeps the fanotify group (which fails open
//! when its last fd closes) and supervises the [`worker`], which fills files on access and in
//! the background, detaches complete layers, and answers commands; the worker can crash or be
//! killed without a reader seeing zeros. The holder also serves the FUSE mounts of layers in
//! FUSE mode ([`fuse_layers`]), relaying their fills to the worker the same way. [`client`] is
//! how commands reach the daemon (starting it on demand) over the [`protocol`] on
//! `ROOT/lazylayer.sock`.

pub mod client;
pub mod fuse_layers;
pub mod holder;
pub mod protocol;
pub mod worker;

pub use holder::{ServeError, ServeOptions, WORKER_CANNOT_START, serve};
pub use protocol::{DaemonStatus, LayerState, LayerStatus, Request, Response};
pub use worker::{WorkerFds, work};
