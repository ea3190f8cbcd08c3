//! # lazylayer-store: layers as real directories, filled lazily
//!
//! The step after the index in lazylayer's data flow. Each layer becomes a directory on a
//! local filesystem (the overlay lower): created at once as placeholders with their final
//! metadata ([`tree`]), then filled file by file from the index's reader ([`layer`]), with a
//! population record that is made durable only after the data ([`state`]). Where everything
//! lives under `--root` is in [`store`].
#![forbid(unsafe_code)]

pub mod error;
pub mod gc;
pub mod layer;
pub mod profile;
pub mod startup_files;
pub mod state;
pub mod store;
pub mod tree;
pub mod verify;

pub use error::{Error, Result};
pub use gc::{GcReport, InUse, StoreLock};
pub use layer::Layer;
pub use profile::{Profile, ProfileEntry};
pub use startup_files::{COMMON_STARTUP_PATHS, startup_files};
pub use state::{FrontendMode, Phase};
pub use store::{ImageRecord, LayerLock, Progress, Store};
pub use tree::{LastParent, LayerTree};
