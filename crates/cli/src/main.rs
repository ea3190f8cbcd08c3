//! `lazylayer`: the command line. Each command lives in `commands/`; this file parses the
//! options shared by all of them and sets up logging.
#![forbid(unsafe_code)]

mod commands;
mod options;
mod output;
mod progress;
mod shared;

use std::process::ExitCode;

use clap::Parser;

use crate::options::Cli;

fn main() -> ExitCode {
    // `lazylayer run` starts this program again as a single-threaded container helper.
    if let Some(code) = lazylayer_engine::container_helper_main() {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lazylayer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("lazylayer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `LAZYLAYER_LOG` (tracing filter syntax) wins over `-v`.
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYLAYER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .log_internal_errors(false)
        .init();
}
