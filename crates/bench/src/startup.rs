//! The startup benchmark (HelloBench-style): real images built from Debian packages (and the
//! python image as eStargz and zstd:chunked, converted by `ctr-remote`), each
//! workload measured at two network shapings in one run: (a) full pull + extract + run (the
//! baseline, same registry, same shaping), (b) lazylayer (fanotify), (c) lazylayer with a
//! profile recorded by (b), (d) lazylayer in FUSE mode. Every store and extraction is on a
//! fresh journaled ext4 filesystem ([`crate::scratch`]). Printed as a table with ratios to the
//! baseline and bytes fetched; results and the command are kept in docs/benchmarks.md.

use std::path::Path;
use std::time::Instant;

use crate::lazylayer;
use lazylayer_container::baseline::{Timing, pull_extract_run, timed};
use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

/// Options of the startup benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Index the images with this checkpoint spacing (compressed bytes; the product default if
    /// not given), to see what span size costs and saves.
    #[arg(long)]
    spacing: Option<u64>,
    /// Index gzip layers with this continuation spacing (compressed bytes; 0 for none; the
    /// product default if not given), to see what continuation spans save.
    #[arg(long)]
    continuation: Option<u64>,
    /// Only the workloads whose name contains this.
    #[arg(long)]
    workload: Option<String>,
}

fn ll(root: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(lazylayer());
    command.arg("--root").arg(root);
    command
}

async fn fetched(root: &Path) -> u64 {
    let Ok(output) = ll(root).args(["status", "--json"]).output().await else {
        return 0;
    };
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    // Killed, not told to stop: told once, it would fill the layer over the shaped link
    // while the next contender runs.
    lazylayer_testkit::daemon::kill_from_status(&status);
    status["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["bytes_fetched"].as_u64().unwrap_or(0))
        .sum()
}

/// The compressed size of `image`'s layers (from `inspect`).
async fn compressed_size(root: &Path, image: &str) -> anyhow::Result<u64> {
    let inspect = ll(root).args(["inspect", "--json", image]).output().await?;
    let value: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    Ok(value["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["size"].as_u64().unwrap_or(0))
        .sum())
}

struct Workload {
    name: &'static str,
    image: &'static str,
    command: Vec<String>,
}

/// How a lazy run is made.
#[derive(Clone, Copy, Default)]
struct LazyRun<'a> {
    /// Copy in the profiles of this store first.
    profile_from: Option<&'a Path>,
    /// Record a profile.
    record: bool,
    /// Serve the layers through FUSE (`--mode fuse`) instead of fanotify.
    fuse: bool,
}

/// One lazylayer run on a fresh store, as `how` says; returns the store's directory for a
/// later run.
async fn lazy_run(
    image: &str,
    workload: &Workload,
    how: LazyRun<'_>,
) -> anyhow::Result<(Timing, u64, tempfile::TempDir)> {
    let LazyRun {
        profile_from,
        record,
        fuse,
    } = how;
    let dir = crate::scratch::dir("lazylayer-startup.")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("profiles"))?;
    if let Some(profiles) = profile_from {
        for profile in std::fs::read_dir(profiles)? {
            let profile = profile?.path();
            std::fs::copy(
                &profile,
                root.join("profiles")
                    .join(profile.file_name().unwrap_or_default()),
            )?;
        }
    }
    let started = Instant::now();
    let mut command = ll(&root);
    command.arg("run");
    if record {
        command.arg("--record");
    }
    if fuse {
        command.args(["--mode", "fuse"]);
    }
    command.arg(image).arg("--").args(&workload.command);
    let timing = timed(command, started).await.map_err(anyhow::Error::msg)?;
    let bytes = fetched(&root).await;
    // The daemon was killed: a FUSE mount of it is dead; take it down before the directory.
    lazylayer_testkit::unmount_everything_under(dir.path());
    Ok((timing, bytes, dir))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the startup benchmark needs root (mounts, fanotify)"
    );
    let _scratch = crate::scratch::Scratch::mount("8G")?;
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    let scratch = tempfile::tempdir()?;
    let mut sizes = std::collections::HashMap::new();
    for (tag, name) in [
        ("bookworm", "bench/debian:bookworm"),
        ("bookworm-python", "bench/python:bookworm"),
    ] {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout_dir().display()),
            &format!("docker://{}/{name}", registry.host()),
            &[],
        );
        let image = format!("{}/{name}", registry.host());
        let mut index = ll(scratch.path());
        index.args(["index", "--push", &image]);
        if let Some(spacing) = args.spacing {
            index.args(["--spacing", &spacing.to_string()]);
        }
        if let Some(continuation) = args.continuation {
            index.args(["--continuation", &continuation.to_string()]);
        }
        let status = index.status().await?;
        anyhow::ensure!(status.success(), "indexing {image}");
        sizes.insert(name, compressed_size(scratch.path(), &image).await?);
    }
    // The python image as eStargz and zstd:chunked (made by ctr-remote): lazylayer reads
    // them from their own table of contents, without the index pushed above.
    crate::images::convert(
        &registry.host(),
        &["bench/python:bookworm"],
        "--estargz",
        "-esgz",
    )?;
    crate::images::convert(
        &registry.host(),
        &["bench/python:bookworm"],
        "--zstdchunked",
        "-zchunked",
    )?;
    for name in [
        "bench/python:bookworm-esgz",
        "bench/python:bookworm-zchunked",
    ] {
        let image = format!("{}/{name}", registry.host());
        sizes.insert(name, compressed_size(scratch.path(), &image).await?);
    }
    let python = || {
        vec![
            "python3".into(),
            "-c".into(),
            "import json, http.server".into(),
        ]
    };
    let workloads = [
        Workload {
            name: "minbase: /bin/true",
            image: "bench/debian:bookworm",
            command: vec!["/bin/true".into()],
        },
        Workload {
            name: "python3: import json, http.server",
            image: "bench/python:bookworm",
            command: python(),
        },
        Workload {
            name: "python3 (eStargz)",
            image: "bench/python:bookworm-esgz",
            command: python(),
        },
        Workload {
            name: "python3 (zstd:chunked)",
            image: "bench/python:bookworm-zchunked",
            command: python(),
        },
        Workload {
            name: "perl: one-liner",
            image: "bench/debian:bookworm",
            command: vec![
                "perl".into(),
                "-e".into(),
                "print join(q(,), map { $_ * $_ } 1..5), qq(\\n)".into(),
            ],
        },
    ];
    let workloads: Vec<Workload> = workloads
        .into_iter()
        .filter(|w| crate::selected(args.workload.as_deref(), w.name))
        .collect();
    println!(
        "startup: time until the workload exits, median of {} runs; ratio = baseline / contender; spans of {} KiB, continuation spans of {} KiB",
        args.runs,
        args.spacing.unwrap_or(lazylayer_index::DEFAULT_SPACING) >> 10,
        args.continuation
            .unwrap_or(lazylayer_index::DEFAULT_CONTINUATION)
            >> 10
    );
    println!(
        "{:<36} {:<20} {:>10} {:>16} {:>16} {:>16} {:>16}",
        "workload", "link", "baseline", "lazylayer", "profiled", "FUSE", "fetched (lazy)"
    );
    for (shaping, label) in [
        (Shaping::link(100, 20), "100 Mbit/s + 20 ms"),
        (Shaping::link(1000, 1), "1 Gbit/s + 1 ms"),
    ] {
        let proxy = FaultProxy::start(registry.addr(), shaping)?;
        for workload in &workloads {
            let image = format!("{}/{}", proxy.host(), workload.image);
            let (mut base, mut lazy, mut profiled, mut fuse) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.runs {
                let work = crate::scratch::dir("lazylayer-baseline.")?;
                let (timing, bytes) =
                    pull_extract_run(&image, &workload.command, work.path(), &lazylayer())
                        .await
                        .map_err(anyhow::Error::msg)?;
                base.push((timing.exit, bytes));
                let record = LazyRun {
                    record: true,
                    ..LazyRun::default()
                };
                let (timing, bytes, recorded) = lazy_run(&image, workload, record).await?;
                lazy.push((timing.exit, bytes));
                let profiles = recorded.path().join("root/profiles");
                let profiled_run = LazyRun {
                    profile_from: Some(&profiles),
                    ..LazyRun::default()
                };
                let (timing, bytes, _) = lazy_run(&image, workload, profiled_run).await?;
                profiled.push((timing.exit, bytes));
                let fuse_run = LazyRun {
                    fuse: true,
                    ..LazyRun::default()
                };
                let (timing, bytes, _) = lazy_run(&image, workload, fuse_run).await?;
                fuse.push((timing.exit, bytes));
            }
            let (base, _) = crate::median_run(base);
            let (lazy, lazy_bytes) = crate::median_run(lazy);
            let (profiled, _) = crate::median_run(profiled);
            let (fuse, _) = crate::median_run(fuse);
            let size = sizes[workload.image];
            println!(
                "{:<36} {:<20} {:>9.2}s {:>9.2}s {:>5.2}x {:>9.2}s {:>5.2}x {:>9.2}s {:>5.2}x {:>9.1}M {:>4.0}%",
                workload.name,
                label,
                base.as_secs_f64(),
                lazy.as_secs_f64(),
                base.as_secs_f64() / lazy.as_secs_f64(),
                profiled.as_secs_f64(),
                base.as_secs_f64() / profiled.as_secs_f64(),
                fuse.as_secs_f64(),
                base.as_secs_f64() / fuse.as_secs_f64(),
                lazy_bytes as f64 / 1048576.0,
                lazy_bytes as f64 * 100.0 / size.max(1) as f64,
            );
        }
    }
    Ok(())
}
