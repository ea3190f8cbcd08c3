//! Where the engine benchmarks put every store, containerd or podman root and extraction: a
//! fresh journaled ext4 filesystem in a loop file, mounted for the run and the same for every
//! contender.
//!
//! Not the machine's root filesystem: on the project's machines it is ext4 without a journal,
//! whose inode allocator skips every inode deleted in the last five minutes (five more while
//! its inode table block is dirty; `recently_deleted` in fs/ext4/ialloc.c, checked only
//! without a journal). Each measurement deletes the last one's trees, so a contender that
//! creates files (the full pull's extraction, lazylayer's placeholders) paid for the previous
//! contender's cleanup: `perf` showed a python pull there spending 4 s of system time in
//! `find_inode_bit`/`recently_deleted` for 8,240 creations.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The mounted scratch filesystem, once [`Scratch::mount`] has run.
static BASE: OnceLock<PathBuf> = OnceLock::new();

/// The scratch filesystem; unmounted and removed on drop.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Makes and mounts the filesystem (`size` as `truncate -s` takes it) in a file under
    /// `/var/tmp`; every [`dir`] is made in it from then on.
    pub fn mount(size: &str) -> anyhow::Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("ll-bench-fs.")
            .tempdir_in("/var/tmp")?;
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        run(Command::new("truncate").args(["-s", size]).arg(&image))?;
        // Inode tables and journal written now: lazy initialisation would write them in the
        // background while contenders are timed.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image))?;
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&image)
            .arg(&mnt))?;
        let _ = BASE.set(mnt);
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Everything mounted under it, and the filesystem itself.
        lazylayer_testkit::unmount_everything_under(&self.dir.path().join("mnt"));
    }
}

/// The directory new scratch directories go in: the scratch filesystem once mounted, else
/// `/var/tmp`.
pub fn base() -> &'static Path {
    BASE.get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new("/var/tmp"))
}

/// A new directory under [`base`], removed on drop.
pub fn dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir_in(base())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status()?;
    anyhow::ensure!(status.success(), "{command:?} failed");
    Ok(())
}
