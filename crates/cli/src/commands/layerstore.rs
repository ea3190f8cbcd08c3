//! `lazylayer layerstore`: podman's and CRI-O's additional layer store, serving lazily loaded
//! layers to containers/storage.

use std::path::PathBuf;

use clap::Args;
use lazylayer_layerstore::PullPolicy;

use crate::commands::pull::{IndexTrust, Mode};
use crate::options::GlobalArgs;
use crate::shared::engine;

/// Options of `layerstore`.
#[derive(Args, Debug)]
pub struct LayerStoreArgs {
    /// Where to mount the store: the path of storage.conf's
    /// `additionallayerstores = ["MOUNTPOINT:ref"]` (absolute, without ':' or ',').
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// How new lazy layers are served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Which of the registry's lazy indexes to use lazily.
    #[arg(long, value_enum, default_value_t = IndexTrust::Bound)]
    pub index_trust: IndexTrust,
}

/// Runs `layerstore` until stopped.
pub async fn run(global: &GlobalArgs, args: LayerStoreArgs) -> anyhow::Result<()> {
    let engine = engine(global)?;
    let policy = PullPolicy {
        mode: args.mode.into(),
        index_trust: args.index_trust.into(),
    };
    let mount = lazylayer_layerstore::mount(
        engine.clone(),
        policy,
        &args.mountpoint,
        tokio::runtime::Handle::current(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let guardian = lazylayer_engine::guardian::spawn(engine);
    eprintln!(
        "lazylayer layerstore: serving containers/storage at {} (store {})",
        mount.mountpoint().display(),
        global.root.display()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    guardian.abort();
    // Unmounted lazily: containers keep their layers (overlayfs resolved `diff` when it
    // mounted), the daemon goes on serving lazy ones, and podman downloads what it pulls next
    // until the store is back.
    drop(mount);
    Ok(())
}
