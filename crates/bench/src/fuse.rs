//! The FUSE benchmark (as root), on the Debian test image, side by side in one run:
//! - sequential and 4 KiB random reads of complete files through the FUSE mount (passthrough)
//!   against the same files in the layer directory on the native filesystem (goal >= 0.9x);
//! - a cold `find` + `stat` of the tree through FUSE against the native directory;
//! - the first 4 KiB read of a file not yet local, through the shaping proxy (100 Mbit/s,
//!   20 ms), in FUSE mode and in fanotify mode.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

use crate::lazy::{drop_caches, find_stat, ll, sh};
use crate::lazylayer;

/// Options of the FUSE benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// A store with the image pulled in `mode` and mounted; the daemon is stopped on drop.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn pull(image: &str, mode: &str, serve: &[&str]) -> anyhow::Result<Store> {
        let store = Store {
            dir: tempfile::Builder::new()
                .prefix("lazylayer-bench-fuse.")
                .tempdir_in("/var/tmp")?,
        };
        std::fs::create_dir_all(store.root())?;
        std::fs::create_dir_all(store.mnt())?;
        Command::new(lazylayer())
            .arg("--root")
            .arg(store.root())
            .arg("serve")
            .args(serve)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.root().join("lazylayer.sock").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        ll(&store.root(), &["pull", "--mode", mode, image])?;
        ll(
            &store.root(),
            &["mount", image, store.mnt().to_str().expect("utf-8")],
        )?;
        Ok(store)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// The one layer's directory and FUSE mount.
    fn layer_dirs(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let hex = std::fs::read_dir(self.root().join("layers/sha256"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("no layer"))??
            .file_name();
        Ok((
            self.root().join("layers/sha256").join(&hex).join("fs"),
            self.root().join("fuse").join(&hex),
        ))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
        if let Ok(text) = ll(&self.root(), &["status", "--json"])
            && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
            && status["daemon_running"] == true
        {
            let _ = sh(&format!(
                "kill -9 {} {}",
                status["pid"], status["worker_pid"]
            ));
        }
        // The worker was killed: its FUSE mounts are dead; take them down.
        let _ = sh(&format!(
            "for m in {}/*; do umount -l $m; done",
            self.root().join("fuse").display()
        ));
    }
}

/// The `count` largest regular files under `dir`, relative.
fn largest_files(dir: &Path, count: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                files.push((meta.len(), entry.path().strip_prefix(dir)?.to_path_buf()));
            }
        }
    }
    files.sort();
    Ok(files
        .into_iter()
        .rev()
        .take(count)
        .map(|(_, p)| p)
        .collect())
}

fn read_files(dir: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    for file in files {
        std::fs::read(dir.join(file))?;
    }
    Ok(())
}

/// 100,000 reads of 4 KiB at pseudo-random offsets of files already open (page cache warm):
/// the cost of a read, not of an open.
fn random_reads(handles: &[std::fs::File]) -> anyhow::Result<()> {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut buffer = [0u8; 4096];
    for handle in handles {
        let len = handle.metadata()?.len().max(4096);
        for _ in 0..100_000 / handles.len() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            handle.read_at(&mut buffer, rng % (len - 4095))?;
        }
    }
    Ok(())
}

/// Median times of `work` on `native` and on `fuse`, alternating which goes first.
fn side_by_side(
    runs: usize,
    cold: bool,
    native: &Path,
    fuse: &Path,
    work: &dyn Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<(Duration, Duration)> {
    let (mut native_times, mut fuse_times) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for which in [run % 2, 1 - run % 2] {
            if cold {
                drop_caches()?;
            }
            let started = Instant::now();
            if which == 0 {
                work(native)?;
                native_times.push(started.elapsed());
            } else {
                work(fuse)?;
                fuse_times.push(started.elapsed());
            }
        }
    }
    native_times.sort();
    fuse_times.sort();
    Ok((native_times[runs / 2], fuse_times[runs / 2]))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the FUSE benchmark needs root (mounts)"
    );
    let registry = TestRegistry::start(RegistryAuth::Anonymous)?;
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("docker://{}/test/debian:bookworm", registry.host()),
        &[],
    );
    let image = format!("{}/test/debian:bookworm", registry.host());
    let scratch = tempfile::tempdir()?;
    ll(scratch.path(), &["index", "--push", &image])?;
    println!("Debian test image; {} runs, medians", args.runs);

    // Complete files: pulled in FUSE mode, detached; the FUSE mount made while lazy stays.
    let store = Store::pull(&image, "fuse", &[])?;
    ll(&store.root(), &["detach", "--wait", &image])?;
    let (native, fuse) = store.layer_dirs()?;
    let big = largest_files(&native, 20)?;
    let mut rows = Vec::new();
    let (n, f) = side_by_side(args.runs, true, &native, &fuse, &|d| read_files(d, &big))?;
    rows.push(("sequential read, 20 largest files, cold", n, f));
    read_files(&native, &big)?;
    read_files(&fuse, &big)?;
    let open = |dir: &Path| -> anyhow::Result<Vec<std::fs::File>> {
        big.iter()
            .map(|f| Ok(std::fs::File::open(dir.join(f))?))
            .collect()
    };
    let (native_open, fuse_open) = (open(&native)?, open(&fuse)?);
    let (n, f) = side_by_side(args.runs, false, &native, &fuse, &|d| {
        random_reads(if d == native {
            &native_open
        } else {
            &fuse_open
        })
    })?;
    rows.push(("100,000 random 4 KiB reads, warm, files open", n, f));
    let (n, f) = side_by_side(args.runs, true, &native, &fuse, &find_stat)?;
    rows.push(("find + stat of the tree, cold", n, f));
    let status: serde_json::Value =
        serde_json::from_str(&ll(&store.root(), &["status", "--json"])?)?;
    drop(store);
    println!();
    println!(
        "{:<44} {:>11} {:>11} {:>7}",
        "complete files", "native", "FUSE", "ratio"
    );
    for (label, native, fuse) in rows {
        println!(
            "{:<44} {:>10.3}s {:>10.3}s {:>6.2}x",
            label,
            native.as_secs_f64(),
            fuse.as_secs_f64(),
            native.as_secs_f64() / fuse.as_secs_f64()
        );
    }
    println!(
        "(ratio = native time / FUSE time; READ requests that reached the daemon: {})",
        status["fuse_reads"]
    );

    // The first 4 KiB of a file not yet local, through the shaped link.
    let proxy = FaultProxy::start(registry.addr(), Shaping::link(100, 20))?;
    let shaped = format!("{}/test/debian:bookworm", proxy.host());
    println!();
    println!(
        "{:<44} {:>11} {:>11}",
        "first 4 KiB read, not local, 100 Mbit/s + 20 ms", "fanotify", "FUSE"
    );
    for file in ["etc/os-release", "usr/lib/x86_64-linux-gnu/libc.so.6"] {
        let mut medians = Vec::new();
        for mode in ["fanotify", "fuse"] {
            let mut times = Vec::new();
            for _ in 0..args.runs {
                let store = Store::pull(&shaped, mode, &["--background-rate", "1"])?;
                let started = Instant::now();
                let mut buffer = [0u8; 4096];
                let handle = std::fs::File::open(store.mnt().join(file))?;
                let _ = handle.read_at(&mut buffer, 0)?;
                times.push(started.elapsed());
            }
            times.sort();
            medians.push(times[times.len() / 2]);
        }
        println!(
            "{:<44} {:>10.3}s {:>10.3}s",
            file,
            medians[0].as_secs_f64(),
            medians[1].as_secs_f64()
        );
    }
    Ok(())
}
