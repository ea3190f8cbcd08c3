//! Container start through podman, side by side in one run: podman on its own (`podman run`
//! pulls the whole image, then runs) and podman with `lazylayer layerstore` as its additional
//! layer store (the same command; the layers come from the store, lazily), each with a fresh
//! podman storage and a fresh lazylayer store, pulling through the same shaped link, timed from
//! the start of `podman run` to the workload's exit. Printed as a table with ratios.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazylayer_testkit::podman::Podman;
use lazylayer_testkit::proxy::FaultProxy;
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

use crate::images::Workload;
use crate::lazylayer;

/// Options of the benchmark (shared with the other engine benchmarks).
pub use crate::images::Args;

/// A `lazylayer layerstore` over a fresh store, mounted; stopped with whatever it started.
struct LayerStore {
    child: Child,
    dir: tempfile::TempDir,
}

impl LayerStore {
    fn start() -> anyhow::Result<LayerStore> {
        // On ext4 (the scratch filesystem): fanotify mode, as a user would run it.
        let dir = crate::scratch::dir("ll-bench-ls.")?;
        let child = Command::new(lazylayer())
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("layerstore")
            .arg(dir.path().join("mnt"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(verbose_log()?)
            .spawn()?;
        let store = LayerStore { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lazylayer_testkit::is_mounted(&store.mountpoint()) {
            anyhow::ensure!(Instant::now() < deadline, "the layer store did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(store)
    }

    fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Stops the store and the daemon it started, and unmounts what is left.
    fn stop(mut self) {
        if let Ok(output) = Command::new(lazylayer())
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .args(["status", "--json"])
            .output()
            && let Ok(status) = serde_json::from_slice::<serde_json::Value>(&output.stdout)
        {
            lazylayer_testkit::daemon::kill_from_status(&status);
        }
        lazylayer_testkit::daemon::stop(&mut self.child);
        lazylayer_testkit::unmount_everything_under(self.dir.path());
    }
}

fn verbose_log() -> anyhow::Result<Stdio> {
    Ok(match std::env::var_os("LAZYLAYER_BENCH_VERBOSE") {
        Some(_) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open("/tmp/lazylayer-bench-layerstore.log")?,
        ),
        None => Stdio::null(),
    })
}

/// One measured start: `podman run --rm IMAGE COMMAND` on a fresh podman storage (with the
/// layer store when `lazy`); returns the time and the bytes the link carried.
fn start_once(
    lazy: bool,
    proxy: &FaultProxy,
    workload: &Workload,
) -> anyhow::Result<(Duration, u64)> {
    // Each contender starts with nothing dirty in the page cache (see the containerd bench).
    Command::new("sync").status()?;
    let store = if lazy {
        Some(LayerStore::start()?)
    } else {
        None
    };
    let podman = Podman::new_in(
        crate::scratch::base(),
        store.as_ref().map(|s| s.mountpoint()).as_deref(),
    );
    let image = format!("{}/{}", proxy.host(), workload.image);
    let before = proxy.bytes_sent();
    let started = Instant::now();
    let mut args = vec!["run", "--rm"];
    args.extend(Podman::run_args());
    args.push(&image);
    args.extend(workload.command.iter().copied());
    podman.ok(&args);
    let elapsed = started.elapsed();
    let bytes = proxy.bytes_sent() - before;
    drop(podman);
    if let Some(store) = store {
        store.stop();
    }
    Ok((elapsed, bytes))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the podman benchmark needs root (podman, mounts, fanotify)"
    );
    let _scratch = crate::scratch::Scratch::mount("8G")?;
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    crate::images::push_indexed(&registry.host(), &[])?;
    let workloads = crate::images::workloads(args.workload.as_deref());
    println!(
        "podman: `podman run --rm` (pull included) until the workload exits, median of {} runs, \
         fresh podman storage and lazylayer store each run; ratio = podman / with the layer store",
        args.runs
    );
    println!(
        "{:<36} {:<20} {:>10} {:>17} {:>13} {:>13}",
        "workload", "link", "podman", "+ layerstore", "fetched (pm)", "fetched (ll)"
    );
    for (shaping, label) in crate::images::links(args.slow_link_only) {
        let proxy = FaultProxy::start(registry.addr(), shaping)?;
        for workload in &workloads {
            let mut plain = Vec::new();
            let mut lazy = Vec::new();
            for _ in 0..args.runs {
                plain.push(start_once(false, &proxy, workload)?);
                lazy.push(start_once(true, &proxy, workload)?);
            }
            let (plain, lazy) = (crate::median_run(plain), crate::median_run(lazy));
            println!(
                "{:<36} {:<20} {:>9.2}s {:>9.2}s {:>5.2}x {:>12.1}M {:>12.1}M",
                workload.name,
                label,
                plain.0.as_secs_f64(),
                lazy.0.as_secs_f64(),
                plain.0.as_secs_f64() / lazy.0.as_secs_f64(),
                plain.1 as f64 / 1048576.0,
                lazy.1 as f64 / 1048576.0,
            );
        }
    }
    Ok(())
}
