//! `lazylayer-bench`: benchmarks that run lazylayer and the tools it is measured against side by
//! side in one run, repeat each measurement, and print medians and ratios (machines are noisy:
//! read the ratios). Results and the commands are kept in docs/benchmarks.md.
//!
//!   cargo run --release -p lazylayer-bench -- index [--runs N]
//!   cargo build --release && sudo target/release/lazylayer-bench lazy [--runs N]
//!   cargo build --release && sudo target/release/lazylayer-bench startup [--runs N]
//!   cargo build --release && sudo target/release/lazylayer-bench fuse [--runs N]
//!   cargo build --release && sudo target/release/lazylayer-bench containerd [--runs N]
//!   cargo build --release && sudo target/release/lazylayer-bench podman [--runs N]
//!   cargo build --release && sudo target/release/lazylayer-bench populate [--runs N]
//!   cargo run --release -p lazylayer-bench -- granularity --index FILE --profile FILE
#![forbid(unsafe_code)]

mod containerd;
mod fuse;
mod granularity;
mod images;
mod index;
mod lazy;
mod podman;
mod populate;
mod scratch;
mod startup;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lazylayer benchmarks (side by side, printed as ratios)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lazy index on the Debian test layer: build time vs `gzip -dc | tar -t`, bytes fetched for
    /// a cold 64 KiB read per checkpoint spacing, reconstruction throughput vs `gzip -dc`.
    Index(index::Args),
    /// Lazy layers (as root): pull to a usable mount, bytes fetched to run a command, and
    /// reads after detach against an overlay over a plain extraction.
    Lazy(lazy::Args),
    /// Container start (as root): full pull + extract + run against lazylayer, plain and with a
    /// recorded profile, for minbase /bin/true, python3 and perl at two network shapings.
    Startup(startup::Args),
    /// FUSE mode (as root): passthrough reads and find + stat against the native filesystem,
    /// and the first read of a file not yet local against fanotify mode.
    Fuse(fuse::Args),
    /// Container start through containerd (as root): its overlayfs snapshotter, lazylayer's
    /// snapshotter and stargz-snapshotter (eStargz copy) side by side.
    Containerd(containerd::Args),
    /// Container start through podman (as root): `podman run` on its own and with
    /// `lazylayer layerstore` as its additional layer store, side by side.
    Podman(podman::Args),
    /// Whole-layer population (as root): pull + detach --wait against curl | tar -xz, and the
    /// daemon's peak memory, on the Debian and python images and a layer of many small files.
    Populate(populate::Args),
    /// A model of lever 2: the demand misses of a recorded profile replayed against a layer's
    /// index at finer fetch granularities (bytes, round trips, estimated time).
    Granularity(granularity::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Index(args) => index::run(args).await,
        Command::Lazy(args) => lazy::run(args).await,
        Command::Startup(args) => startup::run(args).await,
        Command::Fuse(args) => fuse::run(args).await,
        Command::Containerd(args) => containerd::run(args).await,
        Command::Podman(args) => podman::run(args).await,
        Command::Populate(args) => populate::run(args).await,
        Command::Granularity(args) => granularity::run(args).await,
    }
}

/// The `lazylayer` program built beside this one.
pub fn lazylayer() -> PathBuf {
    std::env::current_exe()
        .expect("exe")
        .with_file_name("lazylayer")
}

/// Whether a workload named `name` is selected by `--workload` (`only`: a part of its name).
pub fn selected(only: Option<&str>, name: &str) -> bool {
    only.is_none_or(|only| name.contains(only))
}

/// The median of measured runs (time, bytes), by time.
pub fn median_run(mut values: Vec<(Duration, u64)>) -> (Duration, u64) {
    values.sort();
    values[values.len() / 2]
}

/// Runs `f` `runs` times and returns the median wall time.
pub fn median<F: FnMut() -> anyhow::Result<()>>(runs: usize, mut f: F) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        f()?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Like [`median`], for async work.
pub async fn median_async<F, Fut>(runs: usize, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        f().await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}
