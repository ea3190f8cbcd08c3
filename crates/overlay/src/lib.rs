//! # lazylayer-overlay: the image as one filesystem
//!
//! An image's layer directories are composed with overlayfs under a fresh writable upper. The
//! mount is made with the new mount API (`fsopen`/`fsconfig`), which takes each lower layer as
//! its own `lowerdir+` parameter: no page-size limit on the option string however many layers
//! an image has.
//!
//! Options: `metacopy=on` so that a chown or chmod copies only metadata up and data keeps being
//! read (and lazily filled) from the lower; `redirect_dir=on`, which metacopy needs; `index=on`,
//! so that hardlinked lower files stay hardlinked after copy-up and copied-up files keep their
//! inode number; `xino=auto`, so that inode numbers stay unique and stable when layers live on
//! different filesystems. All layers of a store share one filesystem, where overlay reports the
//! real lower inode numbers, which is what keeps `st_ino` unchanged across population and detach.
#![forbid(unsafe_code)]

mod in_use;

pub use in_use::MountTables;

use std::path::{Path, PathBuf};

use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};

/// The layers and writable directories of an overlay mount.
#[derive(Clone, Debug)]
pub struct OverlaySpec {
    /// Lower directories, the top layer first.
    pub lowers: Vec<PathBuf>,
    /// The writable upper directory.
    pub upper: PathBuf,
    /// overlayfs's work directory (same filesystem as `upper`).
    pub work: PathBuf,
}

/// A mount failed, with the step that failed.
#[derive(Debug)]
pub struct MountError {
    /// What was being done.
    pub step: String,
    /// The error.
    pub errno: rustix::io::Errno,
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "overlay mount: {}: {}", self.step, self.errno)
    }
}

impl std::error::Error for MountError {}

fn step(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> MountError {
    let step = what.into();
    move |errno| MountError { step, errno }
}

/// The overlay options lazylayer mounts with (see the crate docs).
pub const OPTIONS: [(&str, &str); 4] = [
    ("metacopy", "on"),
    ("redirect_dir", "on"),
    ("index", "on"),
    ("xino", "auto"),
];

/// Mounts the overlay described by `spec` at `target`.
pub fn mount(spec: &OverlaySpec, target: &Path) -> Result<(), MountError> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(step("fsopen overlay"))?;
    rustix::mount::fsconfig_set_string(&fs, "source", "lazylayer").map_err(step("source"))?;
    for lower in &spec.lowers {
        rustix::mount::fsconfig_set_string(&fs, "lowerdir+", lower.as_path())
            .map_err(step(format!("lowerdir+ {}", lower.display())))?;
    }
    rustix::mount::fsconfig_set_string(&fs, "upperdir", spec.upper.as_path())
        .map_err(step("upperdir"))?;
    rustix::mount::fsconfig_set_string(&fs, "workdir", spec.work.as_path())
        .map_err(step("workdir"))?;
    for (key, value) in OPTIONS {
        rustix::mount::fsconfig_set_string(&fs, key, value)
            .map_err(step(format!("{key}={value}")))?;
    }
    rustix::mount::fsconfig_create(&fs).map_err(step("creating the overlay (see dmesg)"))?;
    let mount = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(step("fsmount"))?;
    rustix::mount::move_mount(
        &mount,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(step(format!("attaching at {}", target.display())))
}

/// Unmounts `target`.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    rustix::mount::unmount(target, UnmountFlags::empty())
        .map_err(step(format!("unmounting {}", target.display())))
}
