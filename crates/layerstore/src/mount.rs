//! Mounting the layer store's filesystem, and taking it down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::filesystem::StoreFs;
use crate::layers::Layers;

/// The mounted layer store; unmounted (lazily) when dropped.
pub struct StoreMount {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl StoreMount {
    /// Mounts the filesystem serving `layers` at `mountpoint` (created if missing; a mount left
    /// there by a store that died is detached first). Read-write, because containers/storage
    /// signals uses by creating `use` and removing layer directories; only root may look in.
    pub fn mount(
        layers: Arc<Layers>,
        runtime: tokio::runtime::Handle,
        mountpoint: &Path,
    ) -> std::io::Result<StoreMount> {
        check_mountpoint(mountpoint).map_err(std::io::Error::other)?;
        match mounted_at(mountpoint) {
            None => {}
            // A store that died leaves its mount behind, answering ENOTCONN: detach it.
            Some((source, kind)) if source == FS_NAME && kind.starts_with("fuse") => {
                let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
            }
            Some((_, kind)) => {
                return Err(std::io::Error::other(format!(
                    "{} is a mountpoint already ({kind}): choose an empty directory",
                    mountpoint.display()
                )));
            }
        }
        std::fs::create_dir_all(mountpoint)?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(FS_NAME.into()),
            MountOption::Subtype("layerstore".into()),
            MountOption::RW,
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.acl = SessionACL::RootAndOwner;
        // Lookups block while a layer is pulled: others go on in parallel.
        config.n_threads = Some(4);
        config.clone_fd = true;
        let session = fuser::spawn_mount(StoreFs::new(layers, runtime), mountpoint, &config)?;
        Ok(StoreMount {
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for StoreMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
            drop(session);
        }
    }
}

/// The source the kernel shows for this store's mount (`lazylayer`, of type `fuse` or
/// `fuse.layerstore`).
const FS_NAME: &str = "lazylayer";

/// The source and type of the filesystem mounted at `path` (the last mount there), if one is.
fn mounted_at(path: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let path = path.display().to_string();
    mounts.lines().rev().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (target == path).then(|| (source.to_string(), kind.to_string()))
    })
}

/// containers/storage splits `additionallayerstores` entries at `:` and `,` and wants an
/// absolute path: a mountpoint it cannot name is refused here, not found missing later.
pub fn check_mountpoint(mountpoint: &Path) -> Result<(), String> {
    let text = mountpoint.to_string_lossy();
    if !mountpoint.is_absolute() {
        return Err(format!(
            "{text}: the mountpoint must be an absolute path (storage.conf names it so)"
        ));
    }
    if text.contains(':') || text.contains(',') {
        return Err(format!(
            "{text}: containers/storage cannot name a path with ':' or ',' in \
             additionallayerstores"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_type_of_what_is_mounted_is_found() {
        // Every Linux system has procfs at /proc; a fresh directory has nothing mounted.
        let (_, kind) = mounted_at(Path::new("/proc")).unwrap();
        assert_eq!(kind, "proc");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mounted_at(dir.path()), None);
    }

    #[test]
    fn mountpoints_storage_conf_cannot_name_are_refused() {
        assert!(check_mountpoint(Path::new("/var/lib/lazylayer/layerstore")).is_ok());
        for bad in ["relative/dir", "/mnt/a:b", "/mnt/a,b"] {
            assert!(check_mountpoint(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
