//! Whole-layer population, as root: `lazylayer pull` + `detach --wait` against `curl BLOB |
//! tar -xz` from the same local registry (unshaped), each from a cold page cache and ending with
//! a `sync`, both on a fresh journaled ext4 filesystem ([`crate::scratch`]), on the Debian and
//! python test images and a layer of 100,000 small files; with the
//! peak resident memory of the daemon's worker and holder while they populate (sampled from
//! /proc every 20 ms; the startup issue's goals: <= 1.1x the time, <= 64 MiB of worker memory
//! for layers up to 100,000 entries).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::lazy::{drop_caches, ll, sh};
use lazylayer_testkit::fixtures::skopeo_copy;
use lazylayer_testkit::hostile;
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

/// Options of the population benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Files in the synthetic layer of small files.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Index gzip layers with this continuation spacing (compressed bytes; 0 for none; the
    /// product default if not given), to see what continuation spans cost a whole population.
    #[arg(long)]
    continuation: Option<u64>,
}

/// Peak resident memory (KiB) of the daemon's processes for one store, by role.
#[derive(Default, Clone, Copy)]
struct Peaks {
    worker: u64,
    holder: u64,
}

/// Samples the VmHWM of the daemon processes serving `root` until `done`.
fn watch_memory(root: &Path, done: Arc<AtomicBool>) -> std::thread::JoinHandle<Peaks> {
    let root = root.display().to_string();
    std::thread::spawn(move || {
        let mut peaks = Peaks::default();
        while !done.load(Ordering::Relaxed) {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let dir = entry.path();
                let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
                    continue;
                };
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if !cmdline.contains(&root) || !cmdline.contains(" serve") {
                    continue;
                }
                let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
                    continue;
                };
                let hwm = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                let peak = if cmdline.contains("--worker-fds") {
                    &mut peaks.worker
                } else {
                    &mut peaks.holder
                };
                *peak = (*peak).max(hwm);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peaks
    })
}

/// `curl | tar -xz` of the image's layers into a fresh directory, then `sync`.
fn extract(registry: &str, image: &str, layers: &[String]) -> anyhow::Result<Duration> {
    let dir = crate::scratch::dir("lazylayer-bench.")?;
    let repository = image.split(':').next().expect("repository");
    drop_caches()?;
    let started = Instant::now();
    for layer in layers {
        sh(&format!(
            "curl -sf http://{registry}/v2/{repository}/blobs/{layer} | tar -xzf - -C {}",
            dir.path().display()
        ))?;
    }
    sh("sync")?;
    Ok(started.elapsed())
}

/// `lazylayer pull` + `detach --wait` into a fresh store, then `sync`; and the daemon's peaks.
fn populate(reference: &str) -> anyhow::Result<(Duration, Peaks)> {
    let dir = crate::scratch::dir("lazylayer-bench.")?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    drop_caches()?;
    let done = Arc::new(AtomicBool::new(false));
    let watcher = watch_memory(&root, done.clone());
    let started = Instant::now();
    ll(&root, &["pull", reference])?;
    ll(&root, &["detach", "--wait", reference])?;
    sh("sync")?;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let peaks = watcher.join().expect("memory watcher");
    if let Ok(text) = ll(&root, &["status", "--json"])
        && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
    {
        lazylayer_testkit::daemon::kill_from_status(&status);
    }
    Ok((elapsed, peaks))
}

/// Pushes the layer of `files` small files as `bench/many-files:latest`, with its index.
fn push_many_files(registry: &str, files: usize, index_args: &[String]) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let layout = scratch.path().join("layout");
    let layer = hostile::many_small_files(files);
    hostile::write_layout(&layout, std::slice::from_ref(&layer))?;
    drop(layer);
    skopeo_copy(
        &format!("oci:{}:many-small-files", layout.display()),
        &format!("docker://{registry}/bench/many-files:latest"),
        &[],
    );
    let reference = format!("{registry}/bench/many-files:latest");
    let mut index = vec!["index", "--push", &reference];
    index.extend(index_args.iter().map(String::as_str));
    ll(scratch.path(), &index)?;
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the population benchmark needs root (fanotify, dropping caches)"
    );
    let _scratch = crate::scratch::Scratch::mount("8G")?;
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    let host = registry.host();
    let index_args: Vec<String> = match args.continuation {
        Some(bytes) => vec!["--continuation".into(), bytes.to_string()],
        None => Vec::new(),
    };
    crate::images::push_indexed(&host, &index_args)?;
    push_many_files(&host, args.files, &index_args)?;
    let scratch = tempfile::tempdir()?;
    println!(
        "pull + detach --wait against curl | tar -xz, local registry, cold cache, final sync; \
         {} runs, medians",
        args.runs
    );
    println!(
        "{:<30} {:>8} {:>9} {:>10} {:>10} {:>7} {:>12} {:>12}",
        "image", "entries", "MiB", "curl|tar", "lazylayer", "ratio", "worker peak", "holder peak"
    );
    for image in [
        crate::images::IMAGES[0],
        crate::images::IMAGES[1],
        "bench/many-files:latest",
    ] {
        let reference = format!("{host}/{image}");
        let inspected: serde_json::Value =
            serde_json::from_str(&ll(scratch.path(), &["inspect", "--json", &reference])?)?;
        let layers: Vec<&serde_json::Value> = inspected["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let digests: Vec<String> = layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
            .collect();
        let entries: u64 = layers
            .iter()
            .map(|l| l["index"]["entries"].as_u64().unwrap_or(0))
            .sum();
        let size: u64 = layers.iter().map(|l| l["size"].as_u64().unwrap_or(0)).sum();
        let mut baseline = Vec::new();
        let mut lazy = Vec::new();
        let mut worker = 0;
        let mut holder = 0;
        for _ in 0..args.runs {
            baseline.push(extract(&host, image, &digests)?);
            let (time, peaks) = populate(&reference)?;
            lazy.push(time);
            worker = worker.max(peaks.worker);
            holder = holder.max(peaks.holder);
        }
        baseline.sort();
        lazy.sort();
        let (base, ours) = (baseline[args.runs / 2], lazy[args.runs / 2]);
        println!(
            "{:<30} {:>8} {:>9.1} {:>9.2}s {:>9.2}s {:>6.2}x {:>8.1} MiB {:>8.1} MiB",
            image,
            entries,
            size as f64 / 1048576.0,
            base.as_secs_f64(),
            ours.as_secs_f64(),
            ours.as_secs_f64() / base.as_secs_f64(),
            worker as f64 / 1024.0,
            holder as f64 / 1024.0,
        );
    }
    println!("(ratio: lazylayer / curl | tar; memory: the highest peak over the runs)");
    Ok(())
}
