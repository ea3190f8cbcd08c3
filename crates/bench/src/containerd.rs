//! Container start through containerd, side by side in one run: containerd's own overlayfs
//! snapshotter (`ctr image pull` + `ctr run`), lazylayer's snapshotter and stargz-snapshotter
//! (the peer, on an eStargz copy of the same image made by `ctr-remote image convert`), each
//! pulling through the same shaped link into a fresh containerd and a fresh snapshotter store,
//! timed from the pull's start to the workload's exit; then both lazy snapshotters again with
//! a profile of the workload: lazylayer's recorded by `run --record --push` and bound to a copy
//! of the image, stargz's the same files as the prioritized files of an eStargz copy
//! (`convert --estargz-record-in`, what `ctr-remote image optimize` records by running the
//! workload). Printed as a table with ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazylayer_testkit::containerd::Containerd;

use crate::images::{IMAGES, Workload};
use crate::lazylayer;
use lazylayer_testkit::proxy::FaultProxy;
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

/// Options of the benchmark (shared with the other engine benchmarks).
pub use crate::images::Args;

/// The snapshotters compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    /// containerd's overlayfs snapshotter: the whole image pulled and unpacked first.
    Overlayfs,
    /// `lazylayer snapshotter`.
    Lazylayer,
    /// stargz-snapshotter's `containerd-stargz-grpc` on the eStargz copy.
    Stargz,
}

/// A snapshotter process serving one containerd, with its own fresh state.
struct Snapshotter {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Snapshotter {
    fn start(contender: Contender, stargz: &Path) -> anyhow::Result<Option<Snapshotter>> {
        let dir = crate::scratch::dir("ll-bench-snap.")?;
        let socket = dir.path().join("snapshotter.sock");
        let root = dir.path().join("root");
        let mut command = match contender {
            Contender::Overlayfs => return Ok(None),
            Contender::Lazylayer => {
                let mut command = Command::new(lazylayer());
                command
                    .arg("--root")
                    .arg(&root)
                    .arg("snapshotter")
                    .arg("--address")
                    .arg(&socket);
                command
            }
            Contender::Stargz => {
                let mut command = Command::new(stargz);
                command
                    .arg("--root")
                    .arg(&root)
                    .arg("--address")
                    .arg(&socket);
                command
            }
        };
        let log = match std::env::var_os("LAZYLAYER_BENCH_VERBOSE") {
            Some(_) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(
                format!(
                    "/tmp/lazylayer-bench-{}.log",
                    if contender == Contender::Stargz {
                        "stargz"
                    } else {
                        "lazylayer"
                    }
                ),
            )?),
            None => Stdio::null(),
        };
        let child = command
            .env(
                "LAZYLAYER_LOG",
                std::env::var("LAZYLAYER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the snapshotter did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(Snapshotter {
            child,
            socket,
            _dir: dir,
            root,
        }))
    }

    /// Stops it and whatever it started (lazylayer's daemon; stargz's FUSE mounts).
    fn stop(mut self, contender: Contender) {
        if contender == Contender::Lazylayer
            && let Ok(output) = Command::new(lazylayer())
                .arg("--root")
                .arg(&self.root)
                .args(["status", "--json"])
                .output()
            && let Ok(status) = serde_json::from_slice::<serde_json::Value>(&output.stdout)
        {
            lazylayer_testkit::daemon::kill_from_status(&status);
        }
        // SIGINT: stargz unmounts its layers on it; lazylayer's snapshotter stops.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        lazylayer_testkit::unmount_everything_under(self._dir.path());
    }
}

/// One measured start of the workload's image with `suffix` after its tag: pull (lazily where
/// the contender can) and run; returns the time and the bytes the link carried.
fn start_once(
    contender: Contender,
    stargz: &Path,
    proxy: &FaultProxy,
    workload: &Workload,
    suffix: &str,
) -> anyhow::Result<(Duration, u64)> {
    // Each contender starts with nothing dirty in the page cache: the previous contender's
    // extraction would otherwise be written back during this one's pull (a sync there waits).
    Command::new("sync").status()?;
    let snapshotter = Snapshotter::start(contender, stargz)?;
    let socket = snapshotter
        .as_ref()
        .map(|s| s.socket.clone())
        .unwrap_or_else(|| PathBuf::from("/nonexistent.sock"));
    let name = match contender {
        Contender::Overlayfs => "unused",
        Contender::Lazylayer => "lazylayer",
        Contender::Stargz => "stargz",
    };
    let containerd = Containerd::start_in(crate::scratch::base(), &[(name, &socket)], None);
    let image = format!("{}/{}{suffix}", proxy.host(), workload.image);
    let before = proxy.bytes_sent();
    let started = Instant::now();
    match contender {
        Contender::Overlayfs => {
            containerd.ctr_ok(&["image", "pull", "--plain-http", &image]);
        }
        _ => {
            containerd.ctr_remote_ok(&[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                name,
                &image,
            ]);
        }
    }
    let pulled = started.elapsed();
    let mut args = vec!["run", "--rm"];
    if contender != Contender::Overlayfs {
        args.extend(["--snapshotter", name]);
    }
    args.extend([image.as_str(), "bench"]);
    args.extend(workload.command.iter().copied());
    containerd.ctr_ok(&args);
    let elapsed = started.elapsed();
    let bytes = proxy.bytes_sent() - before;
    if std::env::var_os("LAZYLAYER_BENCH_VERBOSE").is_some() {
        eprintln!(
            "  {name}: pull {:.2}s, run {:.2}s",
            pulled.as_secs_f64(),
            (elapsed - pulled).as_secs_f64()
        );
    }
    drop(containerd);
    if let Some(snapshotter) = snapshotter {
        snapshotter.stop(contender);
    }
    Ok((elapsed, bytes))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the containerd benchmark needs root (containerd, mounts, fanotify)"
    );
    let _scratch = crate::scratch::Scratch::mount("8G")?;
    let build = Command::new(lazylayer_testkit::repo_root().join("scripts/build-stargz-grpc"))
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(build.status.success(), "scripts/build-stargz-grpc failed");
    let stargz = PathBuf::from(
        String::from_utf8_lossy(&build.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    );
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    crate::images::push_indexed(&registry.host(), &[])?;
    // The eStargz copy of each image has `-esgz` after its tag.
    crate::images::convert(&registry.host(), &IMAGES, "--estargz", "-esgz")?;
    let workloads = crate::images::workloads(args.workload.as_deref());
    // Each workload's profile, on copies of its image: lazylayer's bound by `run --record
    // --push`, stargz's the same files as prioritized files.
    for (n, workload) in workloads.iter().enumerate() {
        let paths = crate::images::push_profiled(&registry.host(), workload, &profiled(n))?;
        let record = tempfile::NamedTempFile::new()?;
        let lines: Vec<String> = paths
            .iter()
            .map(|path| serde_json::json!({ "path": path }).to_string())
            .collect();
        std::fs::write(record.path(), lines.join("\n"))?;
        let record = record.path().to_string_lossy().into_owned();
        crate::images::convert_one(
            &registry.host(),
            workload.image,
            &format!("{}-esgz{}", workload.image, profiled(n)),
            &["--estargz", "--estargz-record-in", &record],
        )?;
    }
    println!(
        "containerd: pull + `ctr run` until the workload exits, median of {} runs, fresh \
         containerd and snapshotter each run; ratio = overlayfs / contender; ll/sz = lazylayer / \
         stargz",
        args.runs
    );
    println!(
        "{:<36} {:<20} {:>10} {:>17} {:>17} {:>7} {:>17} {:>17} {:>7} {:>12} {:>7} {:>8} {:>8}",
        "workload",
        "link",
        "overlayfs",
        "lazylayer",
        "stargz",
        "ll/sz",
        "ll profiled",
        "sz profiled",
        "ll/sz",
        "fetched: ll",
        "sz",
        "ll prof",
        "sz prof"
    );
    for (shaping, label) in crate::images::links(args.slow_link_only) {
        let proxy = FaultProxy::start(registry.addr(), shaping)?;
        for (n, workload) in workloads.iter().enumerate() {
            let contenders = [
                (Contender::Overlayfs, String::new()),
                (Contender::Lazylayer, String::new()),
                (Contender::Stargz, "-esgz".to_string()),
                (Contender::Lazylayer, profiled(n)),
                (Contender::Stargz, format!("-esgz{}", profiled(n))),
            ];
            let mut results = [const { Vec::new() }; 5];
            for _ in 0..args.runs {
                for (i, (contender, suffix)) in contenders.iter().enumerate() {
                    results[i].push(start_once(*contender, &stargz, &proxy, workload, suffix)?);
                }
            }
            let [overlay, lazy, peer, lazy_profiled, peer_profiled] =
                results.map(crate::median_run);
            let time = |d: Duration| {
                format!(
                    "{:>9.2}s {:>5.2}x",
                    d.as_secs_f64(),
                    overlay.0.as_secs_f64() / d.as_secs_f64()
                )
            };
            let versus = |ll: Duration, sz: Duration| {
                format!("{:>6.2}x", ll.as_secs_f64() / sz.as_secs_f64())
            };
            println!(
                "{:<36} {:<20} {:>9.2}s {} {} {} {} {} {} {:>11.1}M {:>6.1}M {:>7.1}M {:>7.1}M",
                workload.name,
                label,
                overlay.0.as_secs_f64(),
                time(lazy.0),
                time(peer.0),
                versus(lazy.0, peer.0),
                time(lazy_profiled.0),
                time(peer_profiled.0),
                versus(lazy_profiled.0, peer_profiled.0),
                lazy.1 as f64 / 1048576.0,
                peer.1 as f64 / 1048576.0,
                lazy_profiled.1 as f64 / 1048576.0,
                peer_profiled.1 as f64 / 1048576.0,
            );
        }
    }
    Ok(())
}

/// The tag suffix of the copies of an image profiled for workload `n`.
fn profiled(n: usize) -> String {
    format!("-prof{n}")
}
