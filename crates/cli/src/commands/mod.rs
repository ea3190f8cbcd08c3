//! One module per command.

pub mod demo;
pub mod detach;
pub mod gc;
pub mod index;
pub mod inspect;
mod layer_indexes;
pub mod layerstore;
pub mod mount;
pub mod pull;
pub mod run;
pub mod serve;
pub mod snapshotter;
pub mod status;
pub mod verify;

use crate::options::{Cli, Command};

/// The name of `command` if it mounts filesystems, places fanotify marks or serves FUSE:
/// those need root, and say so at once instead of failing half way.
fn needs_root(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Run(_) => "run",
        Command::Pull(_) => "pull",
        Command::Serve(_) => "serve",
        Command::Snapshotter(_) => "snapshotter",
        Command::LayerStore(_) => "layerstore",
        Command::Mount(_) => "mount",
        Command::Umount(_) => "umount",
        Command::Detach(_) => "detach",
        Command::Rmi(_) => "rmi",
        Command::Gc(_) => "gc",
        _ => return None,
    })
}

/// Runs the chosen command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Some(name) = needs_root(&cli.command) {
        crate::shared::require_root(name)?;
    }
    if let Command::Run(args) = cli.command {
        return run::run(&cli.global, args).await;
    }
    run_other(cli).await.map(|()| 0)
}

async fn run_other(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(_) => unreachable!("handled above"),
        Command::Demo(args) => demo::run(&cli.global, args).await,
        Command::Inspect(args) => inspect::run(&cli.global, args).await,
        Command::Index(args) => index::run(&cli.global, args).await,
        Command::Pull(args) => pull::run(&cli.global, args).await,
        Command::Serve(args) => serve::run(&cli.global, args).await,
        Command::Snapshotter(args) => snapshotter::run(&cli.global, args).await,
        Command::LayerStore(args) => layerstore::run(&cli.global, args).await,
        Command::Mount(args) => mount::run_mount(&cli.global, args).await,
        Command::Umount(args) => mount::run_umount(&cli.global, args).await,
        Command::Status(args) => status::run(&cli.global, args).await,
        Command::Detach(args) => detach::run(&cli.global, args).await,
        Command::Verify(args) => verify::run(&cli.global, args).await,
        Command::Rmi(args) => gc::run_rmi(&cli.global, args).await,
        Command::Gc(args) => gc::run(&cli.global, args).await,
    }
}
