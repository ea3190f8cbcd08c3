//! Background population as issue 4 describes it: it follows the compressed stream (files are
//! filled in the order of their data in the layer), it keeps under `--background-rate`, and a
//! daemon started on demand goes away once nothing is lazy.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use crate::common::{Lazy, indexed_registry, wait_for_status};
use lazylayer_testkit::require_root;

/// The regular files of the image's only layer with data, as `(data offset, path)`, from
/// `inspect --files` (an index lists each file's offset in the uncompressed stream).
fn files_in_stream_order(lazy: &Lazy, image: &str) -> Vec<(u64, String)> {
    let out: serde_json::Value =
        serde_json::from_str(&lazy.ll(&["inspect", "--json", "--files", image])).unwrap();
    let table = out["layers"][0]["index"]["fileTable"]
        .as_array()
        .expect("a file table");
    let mut files: Vec<(u64, String)> = table
        .iter()
        .filter(|f| f["kind"] == "File" && f["size"].as_u64().unwrap() > 0)
        .map(|f| {
            (
                f["dataOffset"].as_u64().expect("a data offset"),
                f["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Whether process `pid` holds a fanotify group with an ignore mark on a mount for every
/// event a placeholder is marked for (`FAN_PRE_ACCESS | FAN_OPEN_EXEC_PERM | FAN_OPEN_PERM`),
/// as `/proc/PID/fdinfo` shows marks: the worker fills through a private mount whose opens
/// and writes raise no event.
fn ignores_a_mount(pid: u64) -> bool {
    const PLACEHOLDER_MASK: u64 = 0x0010_0000 | 0x0004_0000 | 0x0001_0000;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_to_string(fd.path())
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with("fanotify mnt_id:"))
            .filter_map(|line| line.split_once("ignored_mask:"))
            .filter_map(|(_, mask)| mask.split_whitespace().next())
            .filter_map(|mask| u64::from_str_radix(mask, 16).ok())
            .any(|mask| mask & PLACEHOLDER_MASK == PLACEHOLDER_MASK)
    })
}

#[test]
fn background_population_follows_the_stream_and_keeps_under_the_cap() {
    if !require_root("background_population_follows_the_stream_and_keeps_under_the_cap") {
        return;
    }
    const RATE: u64 = 2_000_000;
    let image = format!("{}/test/debian:bookworm", indexed_registry());
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&["--background-rate", &RATE.to_string()]);
    let started = Instant::now();
    lazy.ll(&["pull", "--mode", "fanotify", &image]);
    let files = files_in_stream_order(&lazy, &image);
    let digest = lazy.status()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .replace(':', "/");
    let layer_dir = lazy.root().join("layers").join(digest).join("fs");
    // The worker's own fills raise no event for the holder to answer.
    let worker = lazy.status()["worker_pid"].as_u64().expect("a worker pid");
    assert!(
        ignores_a_mount(worker),
        "the worker {worker} fills through no mount its fanotify group ignores"
    );

    // Nothing reads the layer: whatever is filled, the background filled. A filled file has
    // blocks; a placeholder has none. Read the filled set before the fetched count, so that
    // the count covers it. Wait for some progress rather than a fixed time: the test binary
    // runs many tests at once on two cores, and a starved worker is slow, not wrong.
    let snapshot = || {
        let filled: Vec<bool> = files
            .iter()
            .map(|(_, path)| {
                std::fs::symlink_metadata(layer_dir.join(path))
                    .unwrap()
                    .blocks()
                    > 0
            })
            .collect();
        let fetched = lazy.status()["layers"][0]["bytes_fetched"]
            .as_u64()
            .unwrap();
        (filled, fetched, started.elapsed().as_secs_f64())
    };
    std::thread::sleep(Duration::from_secs(8));
    let deadline = Instant::now() + Duration::from_secs(90);
    let (filled, fetched, elapsed) = loop {
        let (filled, fetched, elapsed) = snapshot();
        let count = filled.iter().filter(|f| **f).count();
        if (fetched > 2 * RATE && count > 10) || Instant::now() > deadline {
            break (filled, fetched, elapsed);
        }
        std::thread::sleep(Duration::from_millis(500));
    };

    // The cap: what was fetched fits the rate over the time since the pull began, plus the
    // last file's spans (a fill is not cut short). Uncapped, the loopback registry delivers
    // the whole 60 MiB layer in a second or two.
    let allowed = (RATE as f64 * elapsed) as u64 + (8 << 20);
    assert!(
        fetched <= allowed,
        "fetched {fetched} bytes in {elapsed:.1} s with a cap of {RATE} B/s"
    );
    let count = filled.iter().filter(|f| **f).count();
    assert!(
        fetched > 2 * RATE && count > 10,
        "the background made no progress: {fetched} bytes, {count} files"
    );

    // Stream order: the filled files are a prefix of the files sorted by data offset (one fill
    // may be in flight at the edge). The files nearly every start opens are filled first, at
    // take-up (`lazylayer_store::COMMON_STARTUP_PATHS`, by name: symlinks lead to them): past
    // them the order holds only once the stream has passed them too.
    let filled_first: Vec<&str> = lazylayer_store::COMMON_STARTUP_PATHS
        .iter()
        .filter_map(|path| path.rsplit('/').next())
        .collect();
    let first_unfilled = filled.iter().position(|f| !f).expect("not all filled yet");
    let out_of_order: Vec<&str> = files[first_unfilled..]
        .iter()
        .zip(&filled[first_unfilled..])
        .filter(|(_, filled)| **filled)
        .map(|((_, path), _)| path.as_str())
        .filter(|path| !filled_first.contains(&path.rsplit('/').next().unwrap_or(path)))
        .collect();
    assert!(
        out_of_order.len() <= 1,
        "filled out of stream order, after {}: {out_of_order:?}",
        files[first_unfilled].1
    );
}

#[test]
fn a_daemon_started_on_demand_exits_once_nothing_is_lazy() {
    if !require_root("a_daemon_started_on_demand_exits_once_nothing_is_lazy") {
        return;
    }
    let image = format!("{}/test/debian:bookworm", indexed_registry());
    let lazy = Lazy::new("ext4");
    // pull starts the daemon on demand (it exits when idle).
    lazy.ll(&["pull", "--mode", "fanotify", &image]);
    let status = lazy.status();
    assert_eq!(status["daemon_running"], true, "{status}");
    let holder = status["pid"].as_u64().unwrap();
    let worker = status["worker_pid"].as_u64().unwrap();
    lazy.ll(&["detach", "--wait", &image]);
    wait_for_status(&lazy, "the daemon did not exit once detached", |s| {
        s["daemon_running"] == false
    });
    for pid in [holder, worker] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "process {pid} is still there");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let status = lazy.status();
    assert_eq!(status["layers"][0]["state"], "detached", "{status}");
    // status IMAGE: that image's layers; an image not pulled is an error that names it.
    let only: serde_json::Value =
        serde_json::from_str(&lazy.ll(&["status", "--json", &image])).unwrap();
    assert_eq!(only["layers"].as_array().unwrap().len(), 1, "{only}");
    let other = crate::common::run(&[
        "--root",
        &lazy.root_arg(),
        "status",
        "example.com/not/pulled",
    ]);
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("example.com/not/pulled"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    // With no daemon, status still tells what the layer cost: the whole 60 MiB blob.
    let fetched = status["layers"][0]["bytes_fetched"].as_u64().unwrap();
    assert!(fetched > 60 << 20, "{status}");
}
