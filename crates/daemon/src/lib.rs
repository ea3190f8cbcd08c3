//! # lazylayer-daemon: `lazylayer serve`
//!
//! The processes behind lazy layers. The [`holder`] keeps the fanotify group (which fails open
//! when its last fd closes), serves the FUSE mounts of layers in FUSE mode, and supervises the
//! [`worker`], which fills files on access and in the background, detaches complete layers,
//! and answers commands; the worker can crash or be killed without a reader seeing zeros. The
//! two talk over the [`relay`] messages; the holder hands the worker its descriptors
//! ([`handover`]). [`client`] is how commands reach the daemon (starting it on demand) over
//! the [`protocol`] on `ROOT/lazylayer.sock`.

pub mod client;
pub mod error;
pub mod handover;
pub mod holder;
pub mod keeper;
pub mod options;
pub mod peer;
pub mod protocol;
pub mod relay;
pub mod systemd;
pub mod worker;

pub use error::{LayerError, ServeError};
pub use handover::WorkerFds;
pub use holder::serve;
pub use options::{ServeOptions, WORKER_CANNOT_START};
pub use protocol::{DaemonStatus, LayerState, LayerStatus, Request, Response};
pub use worker::work;
