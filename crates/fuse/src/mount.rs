//! Mounting a layer's FUSE filesystem, and taking it down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::filesystem::{FuseStats, LayerFs};

/// A mounted FUSE layer; unmounted when dropped.
pub struct FuseMount {
    mountpoint: PathBuf,
    stats: Arc<FuseStats>,
    session: Option<BackgroundSession>,
}

impl FuseMount {
    /// Mounts `fs` read-only at `mountpoint` (created if missing), served by a few threads with
    /// a cloned `/dev/fuse` descriptor each. Every user may use it (containers run as any
    /// user); the kernel checks permissions from the attributes.
    pub fn mount(fs: LayerFs, stats: Arc<FuseStats>, mountpoint: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(mountpoint)?;
        // A mount left by a daemon that died is no use to anyone.
        let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lazylayer".into()),
            MountOption::Subtype("lazylayer".into()),
            MountOption::RO,
            MountOption::DefaultPermissions,
            MountOption::Dev,
            MountOption::Suid,
            MountOption::Exec,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(4);
        config.clone_fd = true;
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(FuseMount {
            mountpoint: mountpoint.to_path_buf(),
            stats,
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Its counters.
    pub fn stats(&self) -> &FuseStats {
        &self.stats
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Lazily: an overlay still using it keeps it until that overlay goes.
            let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
            drop(session);
        }
    }
}
