//! # lazylayer-fanotify: the fanotify frontend
//!
//! Lazy layers served by the kernel's pre-content events (Linux 6.14+, store on ext4, XFS or
//! btrfs). [`group`] is the syscall boundary; [`frontend`] answers events by having the layer
//! store fill files, and removes each file's mark once it holds its data, so a populated file
//! costs nothing more and a populated layer is a plain directory. Because a group whose last
//! fd closes fails open, the group is shared by two processes: the [`holder`], which only keeps
//! it and relays its events over the [`relay`] records, and the worker running the frontend.

pub mod frontend;
pub mod group;
pub mod holder;
pub mod relay;

pub use frontend::Frontend;
pub use group::{Group, supports_pre_content};
pub use holder::Holder;
