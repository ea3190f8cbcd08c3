//! lazylayer's end-to-end tests, one test binary: the `lazylayer` binary against real
//! registries, real overlayfs, fanotify and FUSE mounts on ext4 and XFS loop images, as root.
//! Each module is one area; `common` is what they share (one registry with pushed indexes for
//! the whole run, loop filesystems, stores with their daemons). Tests of fanotify and FUSE
//! mode run on each store kind through [`on_every_store!`].
//!
//! Run one area with `cargo test -p lazylayer --test e2e lazy::`, one test by its full name.

#[macro_use]
mod common;

mod background;
mod cli;
mod containerd;
mod cri;
mod daemon_death;
mod everyday;
mod formats;
mod fuse;
mod gc;
mod hostile;
mod lazy;
mod mirrors;
mod outage;
mod pjdfstest;
mod podman;
mod privacy;
mod run;
mod stopping;
mod store_recovery;
mod trust;
