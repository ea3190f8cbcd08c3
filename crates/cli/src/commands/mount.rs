//! `lazylayer mount IMAGE TARGET` and `lazylayer umount TARGET`: the image's layer directories
//! under a fresh writable upper, with overlayfs.

use std::path::PathBuf;

use clap::Args;
use lazylayer_overlay::{OverlaySpec, mount, unmount};
use lazylayer_store::{Phase, Store};

use crate::commands::{images, pull};
use crate::options::GlobalArgs;

/// Options of `mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// A pulled image (its reference or manifest digest).
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Where to mount it (an existing directory).
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
}

/// Options of `umount`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// A mount made by `lazylayer mount`.
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
}

fn mount_name(target: &std::path::Path) -> String {
    let text = target.display().to_string();
    let digest = lazylayer_source::Digest::sha256(text.as_bytes());
    digest.hex()[..16].to_string()
}

/// Runs `mount`.
pub async fn run_mount(global: &GlobalArgs, args: MountArgs) -> anyhow::Result<()> {
    let store = Store::new(&global.root);
    let image = images::find(&store, &args.image)?;
    let target = args
        .target
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.target.display()))?;
    let mut lazy = false;
    for layer in &image.layers {
        match store.phase(&layer.digest)? {
            Some(Phase::Lazy) => lazy = true,
            Some(Phase::Detached) => {}
            _ => anyhow::bail!(
                "layer {} of {} is not ready; pull the image again",
                layer.digest,
                image.reference
            ),
        }
    }
    if lazy {
        // Lazy layers are only safe to read while the daemon holds their marks.
        pull::start_daemon(global).await?;
    }
    let dir = store.mounts_dir().join(mount_name(&target));
    if dir.exists() {
        anyhow::bail!(
            "{} is already a lazylayer mount (umount it first)",
            target.display()
        );
    }
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    std::fs::write(dir.join("target"), target.as_os_str().as_encoded_bytes())?;
    let spec = OverlaySpec {
        lowers: image
            .layers
            .iter()
            .rev()
            .map(|l| store.lower_dir(&l.digest))
            .collect::<Result<_, _>>()?,
        upper,
        work,
    };
    if let Err(e) = mount(&spec, &target) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    crate::output::print(&format!(
        "mounted {} at {}\n",
        image.reference,
        target.display()
    ))
}

/// Runs `umount`.
pub async fn run_umount(global: &GlobalArgs, args: UmountArgs) -> anyhow::Result<()> {
    let store = Store::new(&global.root);
    let target = args.target.canonicalize().unwrap_or(args.target.clone());
    unmount(&target)?;
    let dir = store.mounts_dir().join(mount_name(&target));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
