//! The lazy-layer benchmark (issue: fanotify lazy layers), as root, on the Debian test image:
//! - time from `pull` to a usable mount, on loopback and through the shaping proxy;
//! - compressed bytes fetched to run `/bin/sh -c true` and `perl -e 1`, against the layer size;
//! - after detach, a cold read of every file and a `find` + `stat` of the tree through the
//!   lazylayer mount against an overlay over a plain GNU tar extraction of the same image
//!   (goal: ratio >= 0.98, i.e. nothing left in the path).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::lazylayer;
use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};
use lazylayer_testkit::tree_diff::extract_layer;

/// Options of the lazy benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

pub(crate) fn ll(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(lazylayer())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "lazylayer {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn sh(command: &str) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "{command} failed");
    Ok(())
}

pub(crate) fn drop_caches() -> anyhow::Result<()> {
    sh("sync; echo 3 > /proc/sys/vm/drop_caches")
}

/// Kills the daemon of `root`: told to stop, it would fill its lazy layers first, while the
/// next measurement runs.
fn stop_daemon(root: &Path) {
    if let Ok(text) = ll(root, &["status", "--json"])
        && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
    {
        lazylayer_testkit::daemon::kill_from_status(&status);
    }
}

/// A fresh store root with a mount of the image; cleaned up on drop.
struct Pulled {
    dir: tempfile::TempDir,
}

impl Pulled {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Pulled {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
        stop_daemon(&self.root());
    }
}

fn pull_and_mount(image: &str, serve_args: &[&str]) -> anyhow::Result<(Pulled, Duration)> {
    let pulled = Pulled {
        dir: tempfile::Builder::new()
            .prefix("lazylayer-bench.")
            .tempdir_in("/var/tmp")?,
    };
    std::fs::create_dir_all(pulled.root())?;
    std::fs::create_dir_all(pulled.mnt())?;
    if !serve_args.is_empty() {
        Command::new(lazylayer())
            .arg("--root")
            .arg(pulled.root())
            .arg("serve")
            .args(serve_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pulled.root().join("lazylayer.sock").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // pull makes the placeholder tree durable with one syncfs of the store's filesystem; flush
    // what earlier runs left dirty, so that the time is this pull's own.
    sh("sync")?;
    let started = Instant::now();
    ll(&pulled.root(), &["pull", image])?;
    ll(
        &pulled.root(),
        &["mount", image, pulled.mnt().to_str().expect("utf-8")],
    )?;
    let elapsed = started.elapsed();
    Ok((pulled, elapsed))
}

fn fetched(root: &Path) -> anyhow::Result<u64> {
    let status: serde_json::Value = serde_json::from_str(&ll(root, &["status", "--json"])?)?;
    Ok(status["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["bytes_fetched"].as_u64().unwrap_or(0))
        .sum())
}

fn chroot(mnt: &Path, command: &str) -> anyhow::Result<()> {
    let status = Command::new("chroot")
        .arg(mnt)
        .args(["/bin/sh", "-c", command])
        .status()?;
    anyhow::ensure!(status.success(), "{command} failed in the image");
    Ok(())
}

/// Reads every file and stats every path under `dir` (what a cold start of a big workload does).
fn read_everything(dir: &Path) -> anyhow::Result<()> {
    sh(&format!(
        "find {} -type f -print0 | xargs -0 cat > /dev/null",
        dir.display()
    ))
}

pub(crate) fn find_stat(dir: &Path) -> anyhow::Result<()> {
    sh(&format!(
        "find {} -printf '%i %s %m %u %g %T@\\n' > /dev/null",
        dir.display()
    ))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the lazy benchmark needs root (mounts, fanotify)"
    );
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("docker://{}/test/debian:bookworm", registry.host()),
        &[],
    );
    let scratch = tempfile::tempdir()?;
    ll(
        scratch.path(),
        &[
            "index",
            "--push",
            &format!("{}/test/debian:bookworm", registry.host()),
        ],
    )?;
    let layer_size: u64 = {
        let text = ll(
            scratch.path(),
            &[
                "inspect",
                "--json",
                &format!("{}/test/debian:bookworm", registry.host()),
            ],
        )?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        value["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| l["size"].as_u64().unwrap_or(0))
            .sum()
    };
    let proxy = FaultProxy::start(registry.addr(), Shaping::link(100, 20))?;
    println!(
        "Debian test image: one gzip layer of {:.1} MiB; {} runs, medians",
        layer_size as f64 / 1048576.0,
        args.runs
    );

    // 1. pull to a usable mount.
    println!();
    println!("{:<52} {:>10}", "pull + mount until usable", "time");
    for (label, host) in [
        ("loopback", registry.host()),
        ("100 Mbit/s + 20 ms (proxy)", proxy.host()),
    ] {
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let (_pulled, elapsed) = pull_and_mount(
                &format!("{host}/test/debian:bookworm"),
                &["--background-rate", "1", "--exit-when-idle"],
            )?;
            times.push(elapsed);
        }
        times.sort();
        println!(
            "{:<52} {:>9.2}s",
            label,
            times[times.len() / 2].as_secs_f64()
        );
    }

    // 2. bytes fetched to run a command, background held back.
    println!();
    println!(
        "{:<52} {:>10} {:>8}",
        "bytes fetched to run (background held back)", "fetched", "% layer"
    );
    for command in ["/bin/sh -c true", "perl -e 1"] {
        let (pulled, _) = pull_and_mount(
            &format!("{}/test/debian:bookworm", registry.host()),
            &["--background-rate", "1", "--exit-when-idle"],
        )?;
        chroot(&pulled.mnt(), command)?;
        let bytes = fetched(&pulled.root())?;
        println!(
            "{:<52} {:>8.1}M {:>7.2}%",
            command,
            bytes as f64 / 1048576.0,
            bytes as f64 * 100.0 / layer_size as f64
        );
    }

    // 3. The cost of filling whole files on open: the first byte of a large file waits for all
    // of it, the first byte of a small file for one span. Through the shaped link.
    println!();
    println!(
        "{:<52} {:>10}",
        "first byte through 100 Mbit/s + 20 ms (whole-file fill)", "time"
    );
    for (label, file) in [
        ("small file: etc/os-release", "etc/os-release"),
        (
            "large file: usr/bin/perl5.36.0 (3.9 MB)",
            "usr/bin/perl5.36.0",
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let (pulled, _) = pull_and_mount(
                &format!("{}/test/debian:bookworm", proxy.host()),
                &["--background-rate", "1", "--exit-when-idle"],
            )?;
            let started = Instant::now();
            let mut byte = [0u8; 1];
            std::io::Read::read_exact(
                &mut std::fs::File::open(pulled.mnt().join(file))?,
                &mut byte,
            )?;
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "{:<52} {:>9.3}s",
            label,
            times[times.len() / 2].as_secs_f64()
        );
    }

    // 4. after detach vs an overlay over a plain extraction.
    let (pulled, _) = pull_and_mount(&format!("{}/test/debian:bookworm", registry.host()), &[])?;
    ll(
        &pulled.root(),
        &[
            "detach",
            "--wait",
            &format!("{}/test/debian:bookworm", registry.host()),
        ],
    )?;
    let plain = tempfile::Builder::new()
        .prefix("lazylayer-bench-plain.")
        .tempdir_in("/var/tmp")?;
    let blob = {
        let layers = pulled.root().join("layers/sha256");
        let hex = std::fs::read_dir(&layers)?
            .next()
            .expect("a layer")?
            .file_name();
        layout_dir().join("blobs/sha256").join(hex)
    };
    let (lower, upper, work, mnt) = (
        plain.path().join("lower"),
        plain.path().join("upper"),
        plain.path().join("work"),
        plain.path().join("mnt"),
    );
    extract_layer(&blob, &lower);
    for dir in [&upper, &work, &mnt] {
        std::fs::create_dir_all(dir)?;
    }
    sh(&format!(
        "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={},metacopy=on,redirect_dir=on,index=on,xino=auto {}",
        lower.display(),
        upper.display(),
        work.display(),
        mnt.display()
    ))?;
    let mut results = Vec::new();
    for (label, work_fn) in [
        (
            "cold read of every file",
            read_everything as fn(&Path) -> anyhow::Result<()>,
        ),
        ("cold find + stat of the tree", find_stat),
    ] {
        let (mut plain_times, mut lazy_times) = (Vec::new(), Vec::new());
        for run in 0..args.runs {
            // Alternate which goes first, so that drift does not favour either.
            for which in [run % 2, 1 - run % 2] {
                drop_caches()?;
                let t = Instant::now();
                if which == 0 {
                    work_fn(&mnt)?;
                    plain_times.push(t.elapsed());
                } else {
                    work_fn(&pulled.mnt())?;
                    lazy_times.push(t.elapsed());
                }
            }
        }
        plain_times.sort();
        lazy_times.sort();
        results.push((label, plain_times[args.runs / 2], lazy_times[args.runs / 2]));
    }
    let _ = Command::new("umount").arg(&mnt).status();
    println!();
    println!(
        "{:<40} {:>14} {:>14} {:>8}",
        "after detach (page cache dropped)", "plain overlay", "lazylayer", "ratio"
    );
    for (label, plain, lazy) in results {
        println!(
            "{:<40} {:>13.3}s {:>13.3}s {:>7.2}x",
            label,
            plain.as_secs_f64(),
            lazy.as_secs_f64(),
            plain.as_secs_f64() / lazy.as_secs_f64()
        );
    }
    println!(
        "(ratio = plain time / lazylayer time: 1.00 means equal, above 1 lazylayer is faster)"
    );
    Ok(())
}
