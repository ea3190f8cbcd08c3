//! `lazylayer-testenv`: the test environment by hand, for trying lazylayer and for benchmarks.
//!
//!   lazylayer-testenv registry              registry on 127.0.0.1 with the test images
//!   lazylayer-testenv proxy --upstream ADDR shaping/fault proxy in front of a registry

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lazylayer_testkit::fixtures::{fixtures_dir, push_fixtures};
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

#[derive(Parser)]
#[command(about = "lazylayer's test environment: a registry with the test images, a shaping proxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the test images (cached), start a registry on 127.0.0.1, push them, and serve until
    /// interrupted. Prints the registry address.
    Registry,
    /// Run the shaping and fault-injecting proxy in front of UPSTREAM until interrupted.
    Proxy {
        /// The registry to forward to, e.g. 127.0.0.1:5000.
        #[arg(long)]
        upstream: SocketAddr,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Bandwidth in Mbit/s (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        mbit: u64,
        /// Added round-trip latency in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Registry => {
            let dir = fixtures_dir();
            let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
            push_fixtures(&registry.host());
            println!("registry: {}", registry.host());
            println!("fixtures: {}", dir.display());
            println!(
                "try:      lazylayer inspect {}/test/debian:bookworm",
                registry.host()
            );
            tokio::signal::ctrl_c().await?;
            drop(registry);
        }
        Cmd::Proxy {
            upstream,
            listen,
            mbit,
            latency_ms,
        } => {
            let shaping = Shaping {
                bytes_per_second: (mbit > 0).then_some(mbit * 1_000_000 / 8),
                latency: Duration::from_millis(latency_ms),
            };
            let proxy = FaultProxy::start_on(listen, upstream, shaping)?;
            println!("proxy: {} -> {upstream}", proxy.host());
            tokio::signal::ctrl_c().await?;
        }
    }
    Ok(())
}
