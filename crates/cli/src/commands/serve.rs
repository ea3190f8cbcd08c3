//! `lazylayer serve`: the daemon in the foreground (other commands start it on demand).

use std::time::Duration;

use clap::Args;
use lazylayer_daemon::{ServeOptions, WORKER_CANNOT_START, WorkerFds, serve, work};

use crate::options::GlobalArgs;

/// Options of `serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Longest a reader waits for a file that cannot be fetched before it gets EIO (seconds).
    #[arg(
        long,
        value_name = "SECONDS",
        env = "LAZYLAYER_FETCH_DEADLINE",
        default_value_t = 30
    )]
    pub fetch_deadline: u64,

    /// Cap on background population, in bytes per second (reads that wait are not capped).
    #[arg(long, value_name = "BYTES_PER_SECOND")]
    pub background_rate: Option<u64>,

    /// Exit once no layer is lazy (how other commands start it).
    #[arg(long)]
    pub exit_when_idle: bool,

    /// For lazylayer's own use: run as the worker of a holder, on the descriptors it handed down.
    #[arg(long, hide = true, value_name = "GROUP,RELAY,LISTENER")]
    pub worker_fds: Option<String>,
}

/// Runs `serve`.
pub async fn run(global: &GlobalArgs, args: ServeArgs) -> anyhow::Result<()> {
    let options = ServeOptions {
        root: global.root.clone(),
        deadline: Duration::from_secs(args.fetch_deadline.max(1)),
        background_rate: args.background_rate,
        exit_when_idle: args.exit_when_idle,
        insecure_registries: global.insecure_registries.clone(),
        hosts_dir: global.hosts_dir(),
    };
    match args.worker_fds {
        Some(fds) => {
            if let Err(e) = work(options, WorkerFds::from_arg(&fds)?).await {
                eprintln!("error: {e}");
                std::process::exit(WORKER_CANNOT_START);
            }
        }
        None => serve(options).await?,
    }
    Ok(())
}
