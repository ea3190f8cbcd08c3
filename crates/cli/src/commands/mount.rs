//! `lazylayer mount IMAGE TARGET` and `lazylayer umount TARGET`: the image's layer directories
//! under a fresh writable upper, with overlayfs.

use std::path::PathBuf;

use clap::Args;

use crate::options::GlobalArgs;
use crate::shared::engine;

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

/// Runs `mount`.
pub async fn run_mount(global: &GlobalArgs, args: MountArgs) -> anyhow::Result<()> {
    let engine = engine(global)?;
    let image = engine.find_image(&args.image)?;
    let target = engine.mount(&args.image, &args.target).await?;
    crate::output::print(&format!(
        "mounted {} at {}\n",
        image.reference,
        target.display()
    ))
}

/// Runs `umount`.
pub async fn run_umount(global: &GlobalArgs, args: UmountArgs) -> anyhow::Result<()> {
    Ok(engine(global)?.umount(&args.target).await?)
}
