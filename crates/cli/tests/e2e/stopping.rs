//! Stopping the daemon on purpose (SIGTERM to `lazylayer serve`): it leaves no lazy layer
//! behind, whatever path uses it (here a bind mount the daemon cannot tell from nothing), it
//! keeps what it filled, and it leaves no dead FUSE mount behind.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::require_root;

use crate::common::{
    Lazy, Reference, all_detached, assert_same_tree, files_populated, indexed_registry,
    layer_hexes, sh,
};

fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a pid");
    rustix::process::kill_process(pid, signal).expect("signal the daemon");
}

/// Waits for the daemon to exit (within `limit`); returns its exit code.
fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// FUSE mounts of the store at `root` that the kernel still has.
fn fuse_mounts_under(root: &Path) -> Vec<String> {
    let root = root.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.contains(" - fuse") && line.contains(&root))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_stop_fills_a_lazy_layer_used_only_through_a_bind_mount() {
    if !require_root("a_stop_fills_a_lazy_layer_used_only_through_a_bind_mount") {
        return;
    }
    let image = format!("{}/test/debian:bookworm", indexed_registry());
    let mut lazy = Lazy::new("ext4");
    // The background barely moves: the layer is lazy when the daemon is told to stop.
    lazy.serve(&["--background-rate", "1"]);
    lazy.ll(&["pull", &image]);
    // What containerd's overlay snapshotter hands out for a one-layer view: a bind mount of the
    // layer directory; the container's overlay names the bind mount, not the layer.
    let work = lazy.fs.path().join("view");
    let (bind, upper, scratch, merged) = (
        work.join("bind"),
        work.join("upper"),
        work.join("work"),
        work.join("merged"),
    );
    for dir in [&bind, &upper, &scratch, &merged] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let layer = lazy.layer_fs(&layer_hexes("bookworm")[0]);
    sh(&format!(
        "mount --bind {} {}",
        layer.display(),
        bind.display()
    ));
    lazy.mounts.push(bind.clone());
    sh(&format!(
        "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
        bind.display(),
        upper.display(),
        scratch.display(),
        merged.display()
    ));
    lazy.mounts.insert(0, merged.clone());
    assert_eq!(lazy.status()["layers"][0]["phase"], "lazy");

    let mut holder = lazy.serve.take().unwrap();
    signal(&holder, rustix::process::Signal::TERM);
    assert_eq!(
        wait_for_exit(&mut holder, Duration::from_secs(240)),
        Some(0)
    );
    let status = lazy.status();
    assert_eq!(status["daemon_running"], false, "{status}");
    assert!(all_detached(&status), "stopped with a lazy layer: {status}");
    // No daemon, and every file reads right through the view: nothing was left to read zeros.
    assert_same_tree(&Reference::new("bookworm").path(), &merged);
}

#[test]
fn a_stop_keeps_what_was_filled_and_leaves_no_fuse_mount() {
    if !require_root("a_stop_keeps_what_was_filled_and_leaves_no_fuse_mount") {
        return;
    }
    // Through a proxy that goes down before each stop: the first signal's fill (at full
    // speed) cannot complete the small layers before the second signal stops it, however
    // fast the machine is.
    let registry: std::net::SocketAddr = indexed_registry().parse().unwrap();
    let proxy = FaultProxy::start(
        registry,
        Shaping {
            bytes_per_second: None,
            latency: Duration::ZERO,
        },
    )
    .unwrap();
    let image = format!("{}/test/layers:latest", proxy.host());
    let mut lazy = Lazy::with_mode("ext4", "fuse");
    for round in 0..20 {
        proxy.set_down(false);
        lazy.serve(&["--background-rate", "1"]);
        // After the first round the layers are still lazy (each stop below is a stop-now):
        // the pull has the new daemon take them up, which mounts them again.
        lazy.ll(&["pull", "--mode", "fuse", &image]);
        let status = lazy.status();
        assert!(
            !status["fuse_mounts"].as_array().unwrap().is_empty(),
            "round {round}: no FUSE mount to stop: {status}"
        );
        if round == 0 {
            // Fill a few files through a FUSE mount: their state must outlive the stop.
            let mnt = lazy.fs.path().join("mnt-layers");
            std::fs::create_dir_all(&mnt).unwrap();
            lazy.ll(&["mount", &image, mnt.to_str().unwrap()]);
            let output = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "find {} -type f -size +0 | head -5 | xargs cat > /dev/null",
                    mnt.display()
                ))
                .status()
                .unwrap();
            assert!(output.success());
            lazy.ll(&["umount", mnt.to_str().unwrap()]);
        }
        let filled_before = files_populated(&lazy.status());
        proxy.set_down(true);
        let mut holder = lazy.serve.take().unwrap();
        // Told twice: stop now, lazy layers and all.
        signal(&holder, rustix::process::Signal::TERM);
        std::thread::sleep(Duration::from_millis(200));
        signal(&holder, rustix::process::Signal::TERM);
        wait_for_exit(&mut holder, Duration::from_secs(30));
        let left = fuse_mounts_under(&lazy.root());
        assert!(
            left.is_empty(),
            "round {round}: FUSE mounts left behind: {left:?}"
        );
        if round == 0 {
            let status = lazy.status();
            assert_eq!(status["daemon_running"], false);
            assert!(filled_before >= 3, "the reads filled nothing: {status}");
            assert!(
                files_populated(&status) >= filled_before,
                "the stop lost what was filled ({filled_before} files before): {status}"
            );
        }
    }
}
