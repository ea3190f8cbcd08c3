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
