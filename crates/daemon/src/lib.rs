//! # lazylayer-daemon: `lazylayer serve`
//!
//! The process behind lazy layers: [`server`] holds the fanotify group, fills files on access
//! and in the background, and detaches complete layers; [`client`] is how commands reach it
//! (starting it on demand) over the [`protocol`] on `ROOT/lazylayer.sock`.

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{DaemonStatus, LayerStatus, Request, Response};
pub use server::{ServeError, ServeOptions, serve};
