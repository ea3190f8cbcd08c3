//! Mounting a pulled image: its layer directories (or, for lazy FUSE layers, their FUSE
//! mounts) under a fresh writable layer, with overlayfs; and unmounting it.

use std::path::{Path, PathBuf};

use lazylayer_overlay::OverlaySpec;
use lazylayer_store::Phase;

use crate::{Engine, Error, Result};

/// The name of a mount's directory under the store's mounts (from its target path).
fn mount_name(target: &Path) -> String {
    let text = target.display().to_string();
    let digest = lazylayer_source::Digest::sha256(text.as_bytes());
    digest.hex()[..16].to_string()
}

impl Engine {
    /// Mounts the pulled image `image` at the existing directory `target`, with a writable
    /// layer kept under the store until [`Engine::umount`]. Returns the canonical target.
    pub async fn mount(&self, image: &str, target: &Path) -> Result<PathBuf> {
        let store = &self.store;
        let image = self.find_image(image)?;
        let target = target
            .canonicalize()
            .map_err(|e| Error::io(target.display().to_string(), e))?;
        store.check_not_failed(&image)?;
        let mut lazy = false;
        for layer in &image.layers {
            match store.phase(&layer.digest)? {
                Some(Phase::Lazy) => lazy = true,
                Some(Phase::Detached) => {}
                _ => {
                    return Err(Error::Refused(format!(
                        "layer {} of {} is not ready; pull the image again",
                        layer.digest, image.reference
                    )));
                }
            }
        }
        if lazy {
            // Lazy layers are only safe to read while the daemon holds their marks.
            self.start_daemon().await?;
        }
        let dir = store.mounts_dir().join(mount_name(&target));
        if dir.exists() {
            return Err(Error::Refused(format!(
                "{} is already a lazylayer mount (umount it first)",
                target.display()
            )));
        }
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for made in [&upper, &work] {
            std::fs::create_dir_all(made)
                .map_err(|e| Error::io(format!("creating {}", made.display()), e))?;
        }
        std::fs::write(dir.join("target"), target.as_os_str().as_encoded_bytes())
            .map_err(|e| Error::io(format!("writing {}", dir.join("target").display()), e))?;
        let spec = OverlaySpec {
            lowers: store.overlay_lowers(&image)?,
            upper,
            work,
        };
        if let Err(e) = lazylayer_overlay::mount(&spec, &target) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Ok(target)
    }

    /// Unmounts a mount made by [`Engine::mount`] and removes its writable layer.
    pub async fn umount(&self, target: &Path) -> Result<()> {
        let target = target.canonicalize().unwrap_or(target.to_path_buf());
        lazylayer_overlay::unmount(&target)?;
        let dir = self.store.mounts_dir().join(mount_name(&target));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
        }
        Ok(())
    }
}
