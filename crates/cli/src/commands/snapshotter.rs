//! `lazylayer snapshotter`: containerd's remote snapshotter, serving lazily loaded layers to
//! containerd, nerdctl and Kubernetes (CRI).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use lazylayer_snapshotter::{ServeOptions, Snapshotter, SnapshotterOptions};

use crate::commands::pull::{IndexTrust, Mode};
use crate::options::GlobalArgs;
use crate::shared::engine;

/// Options of `snapshotter`.
#[derive(Args, Debug)]
pub struct SnapshotterArgs {
    /// The unix socket to serve on: the `address` of containerd's `proxy_plugins` entry.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/lazylayer/snapshotter.sock"
    )]
    pub address: PathBuf,

    /// How new lazy layers are served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Which of the registry's lazy indexes to use lazily.
    #[arg(long, value_enum, default_value_t = IndexTrust::Bound)]
    pub index_trust: IndexTrust,
}

/// Runs `snapshotter` until stopped.
pub async fn run(global: &GlobalArgs, args: SnapshotterArgs) -> anyhow::Result<()> {
    let options = SnapshotterOptions {
        mode: args.mode.into(),
        index_trust: args.index_trust.into(),
    };
    let snapshotter = Arc::new(
        Snapshotter::open(engine(global)?, options)
            .map_err(|e| anyhow::anyhow!("opening the snapshotter's state: {e}"))?,
    );
    eprintln!(
        "lazylayer snapshotter: serving containerd on {} (store {})",
        args.address.display(),
        global.root.display()
    );
    let serve_options = ServeOptions {
        address: args.address.clone(),
    };
    let serving = lazylayer_snapshotter::serve(snapshotter, &serve_options);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = serving => result.map_err(|e| anyhow::anyhow!(e))?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    // The daemon goes on serving the lazy layers of running containers; the socket file is
    // left for the next start to replace.
    Ok(())
}
