//! The store survives what happens to machines: the disk filling up during population (clear
//! errors, EIO and never zeros for readers, resumption once space is freed), and a reboot
//! (daemon and mounts gone at once), after which the next pull reuses the store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{
    Lazy, LoopFs, Reference, all_detached, assert_same_tree, indexed_registry, run, sh,
    wait_for_status, walk,
};
use lazylayer_testkit::require_root;

fn files_by_size(root: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u64, PathBuf)> = walk(root)
        .into_iter()
        .filter_map(|p| {
            let meta = std::fs::symlink_metadata(&p).unwrap();
            (meta.is_file() && meta.len() > 0)
                .then(|| (meta.len(), p.strip_prefix(root).unwrap().to_path_buf()))
        })
        .collect();
    files.sort();
    files.reverse();
    files.into_iter().map(|(_, p)| p).collect()
}

#[test]
fn a_full_disk_during_population_gives_errors_never_zeros_and_resumes_when_freed() {
    if !require_root(
        "a_full_disk_during_population_gives_errors_never_zeros_and_resumes_when_freed",
    ) {
        return;
    }
    let registry = indexed_registry();
    // 512 MiB: room for the image (164 MiB of files, a 60 MiB span cache) once the ballast goes.
    let mut lazy = Lazy::on(LoopFs::with_size("ext4", "512M"));
    lazy.serve(&["--fetch-deadline", "5"]);
    let reference = Reference::new("bookworm");
    let image = format!("{registry}/test/debian:bookworm");
    let mnt = lazy.pull_and_mount(&image, "debian");
    // Ballast leaving 8 MiB free.
    let free = rustix::fs::statvfs(lazy.fs.path()).unwrap();
    let available = free.f_bavail * free.f_frsize;
    let ballast = lazy.fs.path().join("ballast");
    sh(&format!(
        "fallocate -l {} {}",
        available.saturating_sub(8 << 20),
        ballast.display()
    ));

    wait_for_status(&lazy, "population never hit the full disk", |status| {
        status["layers"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left"))
    });
    // Large files are the last to fit: reading them now fails with EIO, or gives the right
    // bytes; never anything else.
    let mut denied = 0;
    for file in files_by_size(&reference.path()).iter().take(20) {
        match std::fs::read(mnt.join(file)) {
            Ok(data) => assert!(
                data == std::fs::read(reference.path().join(file)).unwrap(),
                "{} read wrong bytes on a full disk",
                file.display()
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", file.display());
                denied += 1;
            }
        }
    }
    assert!(denied > 0, "no read was refused on a full disk");

    std::fs::remove_file(&ballast).unwrap();
    wait_for_status(
        &lazy,
        "population did not resume after space was freed",
        all_detached,
    );
    assert_same_tree(&reference.path(), &mnt);
    lazy.ll(&["verify", &image]);
}

#[test]
fn after_a_simulated_reboot_the_next_pull_reuses_the_store() {
    if !require_root("after_a_simulated_reboot_the_next_pull_reuses_the_store") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
    // A slow background, so that the "reboot" finds the layer half populated.
    lazy.serve(&["--background-rate", "3000000"]);
    let reference = Reference::new("bookworm");
    let image = format!("{registry}/test/debian:bookworm");
    let mnt = lazy.pull_and_mount(&image, "debian");
    for file in ["etc/os-release", "usr/bin/perl5.36.0"] {
        assert!(
            std::fs::read(mnt.join(file)).unwrap()
                == std::fs::read(reference.path().join(file)).unwrap()
        );
    }
    std::thread::sleep(Duration::from_secs(5));

    // The reboot: both daemon processes and every mount gone at once.
    lazylayer_testkit::daemon::kill_from_status(&lazy.status());
    if let Some(mut holder) = lazy.serve.take() {
        let _ = holder.wait();
    }
    for target in lazy.mounts.drain(..) {
        sh(&format!("umount -l {}", target.display()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while lazy.status()["daemon_running"] == true {
        assert!(Instant::now() < deadline, "the daemon outlived the reboot");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after_reboot = lazy.status();
    let populated = after_reboot["layers"][0]["files_populated"]
        .as_u64()
        .unwrap();
    assert_eq!(after_reboot["layers"][0]["phase"], "lazy", "{after_reboot}");
    assert_eq!(
        after_reboot["layers"][0]["state"], "lazy",
        "no daemon fills it: {after_reboot}"
    );
    // What was persisted before the reboot shows without a daemon.
    assert!(populated >= 2, "{after_reboot}");

    // The next pull finds the layer in the store and the daemon carries on from its state.
    let output = run(&["--root", &lazy.root_arg(), "pull", &image]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("already in the store"), "{stderr}");
    let mnt = lazy.pull_and_mount(&image, "again");
    assert!(
        lazy.status()["layers"][0]["files_populated"]
            .as_u64()
            .unwrap()
            >= populated,
        "population persisted before the reboot was kept"
    );
    lazy.ll(&["detach", "--wait", &image]);
    wait_for_status(&lazy, "never detached after the reboot", all_detached);
    assert_same_tree(&reference.path(), &mnt);
    lazy.ll(&["verify", &image]);
}

/// A store too small for the image, with the daemon started on demand, so that its own log
/// (ROOT/serve.log) is on the disk that fills up. Logging must not take the daemon down: a
/// reader of a file not yet local gets EIO at the fetch deadline, `status` names the error,
/// and once space is freed, population resumes by itself. (Before, the log's failed write made
/// the logging thread panic, and with it the fill that was to answer the reader.)
#[test]
fn a_store_that_fills_up_with_its_own_log_on_it_gives_eio_and_resumes_when_freed() {
    if !require_root(
        "a_store_that_fills_up_with_its_own_log_on_it_gives_eio_and_resumes_when_freed",
    ) {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let registry = indexed_registry();
    // 512 MiB, of which ballast leaves 60 MiB free: too little for the image (164 MiB of files
    // and a 60 MiB span cache), as on a store of 120 MiB.
    let lazy = Lazy::on(LoopFs::with_size("ext4", "512M"));
    let free = rustix::fs::statvfs(lazy.fs.path()).unwrap();
    let ballast = lazy.fs.path().join("ballast");
    sh(&format!(
        "fallocate -l {} {}",
        (free.f_bavail * free.f_frsize).saturating_sub(60 << 20),
        ballast.display()
    ));
    let image = format!("{registry}/test/debian:bookworm");
    let pulled = std::process::Command::new(crate::common::EXE)
        .args(["--root", &lazy.root_arg(), "pull", &image])
        .env("LAZYLAYER_FETCH_DEADLINE", "5")
        .output()
        .unwrap();
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let mnt = lazy.fs.path().join("mnt-debian");
    std::fs::create_dir_all(&mnt).unwrap();
    lazy.ll(&["mount", &image, mnt.to_str().unwrap()]);
    let _unmount = Unmount(mnt.clone());
    wait_for_status(&lazy, "population never hit the full disk", |status| {
        status["layers"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left"))
    });
    // A file whose placeholder holds no data yet.
    let layer = lazy.layer_fs(&crate::common::layer_hexes("bookworm")[0]);
    let unfilled = walk(&layer)
        .into_iter()
        .find(|p| {
            let meta = std::fs::symlink_metadata(p).unwrap();
            meta.is_file() && meta.len() > 64 << 10 && meta.blocks() == 0
        })
        .expect("a file not filled on the full disk");
    let path = mnt.join(unfilled.strip_prefix(&layer).unwrap());
    let started = Instant::now();
    let read = std::process::Command::new("timeout")
        .arg("40")
        .arg("cat")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&read.stderr);
    assert_ne!(
        read.status.code(),
        Some(124),
        "the reader waited 40 s for {}",
        path.display()
    );
    assert!(
        stderr.contains("Input/output error"),
        "{}: {} {stderr}",
        path.display(),
        read.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );

    // Free the disk: population resumes by itself and the layer detaches, verified.
    std::fs::remove_file(&ballast).unwrap();
    wait_for_status(
        &lazy,
        "population did not resume after space was freed",
        all_detached,
    );
    assert_same_tree(&Reference::new("bookworm").path(), &mnt);
}

/// Unmounts an overlay when dropped (before the loop filesystem under it goes).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
