//! # lazylayer-fuse: lazy layers for every kernel
//!
//! The frontend for stores where fanotify pre-content marks cannot be placed (kernels before
//! 6.14, stores on tmpfs or overlayfs). Each lazy layer is mounted as a read-only FUSE
//! filesystem ([`mount`]) that the overlay uses as its lower. Names, attributes, link targets
//! and xattrs come from the layer's index ([`inodes`]); the data comes from the same layer
//! directory that fanotify mode fills. Opening a file has it filled first (as fanotify mode
//! does, so mmap is correct) and then hands the kernel the filled file as a **passthrough**
//! backing file: its reads and mmaps never come to the daemon ([`filesystem`]). The daemon's
//! holder process serves these mounts and relays fills to the worker, so the FUSE connections
//! outlive any worker.
#![forbid(unsafe_code)]

pub mod filesystem;
pub mod inodes;
pub mod mount;

pub use filesystem::{FuseStats, LayerContent, LayerFs};
pub use fuser::Errno;
pub use inodes::InodeTable;
pub use mount::FuseMount;
