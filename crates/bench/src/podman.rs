//! Container start through podman, side by side in one run: podman on its own (`podman run`
//! pulls the whole image, then runs) and podman with `lazylayer layerstore` as its additional
//! layer store (the same command; the layers come from the store, lazily), each with a fresh
//! podman storage and a fresh lazylayer store, pulling through the same shaped link, timed from
//! the start of `podman run` to the workload's exit. Printed as a table with ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::podman::Podman;
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

/// Options of the podman benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only the workloads whose name contains this.
    #[arg(long)]
    workload: Option<String>,
    /// Only the 100 Mbit/s + 20 ms link.
    #[arg(long)]
    slow_link_only: bool,
}

struct Workload {
    name: &'static str,
    /// Repository:tag in the registry.
    image: &'static str,
    command: Vec<&'static str>,
}

/// A `lazylayer layerstore` over a fresh store, mounted; stopped with whatever it started.
struct LayerStore {
    child: Child,
    dir: tempfile::TempDir,
}

impl LayerStore {
    fn start() -> anyhow::Result<LayerStore> {
        // On the machine's own filesystem (ext4 here): fanotify mode, as a user would run it.
        let dir = tempfile::Builder::new()
            .prefix("ll-bench-ls.")
            .tempdir_in("/var/tmp")?;
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
        while !is_mounted(&store.mountpoint()) {
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

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.display().to_string();
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(path.as_str()))
}

fn lazylayer() -> PathBuf {
    std::env::current_exe()
        .expect("exe")
        .with_file_name("lazylayer")
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
    let podman = Podman::new(store.as_ref().map(|s| s.mountpoint()).as_deref());
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

fn median(mut values: Vec<(Duration, u64)>) -> (Duration, u64) {
    values.sort();
    values[values.len() / 2]
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the podman benchmark needs root (podman, mounts, fanotify)"
    );
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    let scratch = tempfile::tempdir()?;
    let images = ["bench/debian:bookworm", "bench/python:bookworm"];
    for (tag, name) in [("bookworm", images[0]), ("bookworm-python", images[1])] {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout_dir().display()),
            &format!("docker://{}/{name}", registry.host()),
            &[],
        );
        let status = Command::new(lazylayer())
            .arg("--root")
            .arg(scratch.path())
            .args(["index", "--push", &format!("{}/{name}", registry.host())])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "indexing {name}");
    }
    let workloads: Vec<Workload> = [
        Workload {
            name: "minbase: /bin/true",
            image: images[0],
            command: vec!["/bin/true"],
        },
        Workload {
            name: "python3: import json, http.server",
            image: images[1],
            command: vec!["python3", "-c", "import json, http.server"],
        },
        Workload {
            name: "perl: one-liner",
            image: images[0],
            command: vec![
                "perl",
                "-e",
                "print join(q(,), map { $_ * $_ } 1..5), qq(\\n)",
            ],
        },
    ]
    .into_iter()
    .filter(|w| crate::selected(args.workload.as_deref(), w.name))
    .collect();
    println!(
        "podman: `podman run --rm` (pull included) until the workload exits, median of {} runs, \
         fresh podman storage and lazylayer store each run; ratio = podman / with the layer store",
        args.runs
    );
    println!(
        "{:<36} {:<20} {:>10} {:>17} {:>13} {:>13}",
        "workload", "link", "podman", "+ layerstore", "fetched (pm)", "fetched (ll)"
    );
    let mut links = vec![(Shaping::link(100, 20), "100 Mbit/s + 20 ms")];
    if !args.slow_link_only {
        links.push((Shaping::link(1000, 1), "1 Gbit/s + 1 ms"));
    }
    for (shaping, label) in links {
        let proxy = FaultProxy::start(registry.addr(), shaping)?;
        for workload in &workloads {
            let mut plain = Vec::new();
            let mut lazy = Vec::new();
            for _ in 0..args.runs {
                plain.push(start_once(false, &proxy, workload)?);
                lazy.push(start_once(true, &proxy, workload)?);
            }
            let (plain, lazy) = (median(plain), median(lazy));
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
