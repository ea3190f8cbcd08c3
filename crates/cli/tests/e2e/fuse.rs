//! Lazy layers served through FUSE (`pull --mode fuse`, and `--mode auto` on a store that
//! cannot take fanotify marks): the overlay reads exactly what a full extraction holds; files
//! are filled on open and then passed through (the daemon sees no READ); detached layers are
//! mounted without FUSE, and a FUSE mount goes once no overlay uses it.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    Lazy, Reference, all_detached, assert_same_tree, indexed_registry, wait_for_status,
};
use lazylayer_testkit::require_root;

fn overlay_lowers_of(target: &Path) -> String {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not mounted", target.display()))
        .to_string()
}

#[test]
fn fuse_layers_read_like_the_extraction_and_pass_through_once_local() {
    if !require_root("fuse_layers_read_like_the_extraction_and_pass_through_once_local") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&[]);
    let image = format!("{registry}/test/debian:bookworm");
    lazy.ll(&["pull", "--mode", "fuse", &image]);
    let status = lazy.status();
    assert_eq!(status["layers"][0]["mode"], "fuse", "{status}");
    let mnt = lazy.pull_and_mount(&image, "debian");
    assert!(
        overlay_lowers_of(&mnt).contains("/fuse/"),
        "a lazy FUSE layer is not the lower: {}",
        overlay_lowers_of(&mnt)
    );

    // Every file, its content and metadata, through overlay and FUSE.
    let reference = Reference::new("bookworm");
    assert_same_tree(&reference.path(), &mnt);
    let status = lazy.status();
    assert_eq!(
        status["fuse_reads"], 0,
        "reads reached the daemon instead of passing through: {status}"
    );

    wait_for_status(&lazy, "the layer never detached", all_detached);
    // Still read right through the FUSE hop the mount was made with, and still passed through.
    assert_same_tree(&reference.path(), &mnt);
    let status = lazy.status();
    assert_eq!(status["fuse_reads"], 0, "{status}");
    let digest = status["layers"][0]["digest"].as_str().unwrap().to_string();
    assert_eq!(status["fuse_mounts"][0], digest, "{status}");

    // A new mount of the detached layer has no FUSE hop.
    let plain = lazy.fs.path().join("mnt-plain");
    std::fs::create_dir(&plain).unwrap();
    lazy.ll(&["mount", &image, plain.to_str().unwrap()]);
    lazy.mounts.push(plain.clone());
    assert!(
        !overlay_lowers_of(&plain).contains("/fuse/"),
        "{}",
        overlay_lowers_of(&plain)
    );
    assert_same_tree(&reference.path(), &plain);

    // Once no overlay uses the FUSE mount, it goes.
    lazy.ll(&["umount", mnt.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = lazy.status();
        if status["fuse_mounts"]
            .as_array()
            .is_some_and(|m| m.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "the FUSE mount stayed: {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // (Only this store's: other tests of the run may have FUSE mounts of their own.)
    let root = lazy.root().display().to_string();
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(" - fuse.lazylayer ") && l.contains(&root)),
        "a FUSE mount is left"
    );
}

#[test]
fn a_store_on_tmpfs_is_served_with_fuse() {
    if !require_root("a_store_on_tmpfs_is_served_with_fuse") {
        return;
    }
    let registry = indexed_registry();
    let dir = tempfile::tempdir().unwrap();
    crate::common::sh(&format!(
        "mount -t tmpfs -o size=1G tmpfs {}",
        dir.path().display()
    ));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.path());
    let root = dir.path().join("root");
    let root_arg = root.to_str().unwrap();
    let image = format!("{registry}/test/layers:latest");
    let out = crate::common::run(&["--root", root_arg, "pull", &image]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("(fuse, "),
        "auto did not choose FUSE on tmpfs: {stderr}"
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    crate::common::ok(&["--root", root_arg, "mount", &image, mnt.to_str().unwrap()]);
    let reference = Reference::new("layers");
    assert_same_tree(&reference.path(), &mnt);
    crate::common::ok(&["--root", root_arg, "umount", mnt.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_str(&crate::common::ok(&[
        "--root", root_arg, "status", "--json",
    ]))
    .unwrap();
    lazylayer_testkit::daemon::kill_from_status(&status);
}

#[test]
fn a_dead_holder_fails_fuse_reads_closed() {
    if !require_root("a_dead_holder_fails_fuse_reads_closed") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode("ext4", "fuse");
    lazy.serve(&["--background-rate", "1"]);
    let image = format!("{registry}/test/debian:bookworm");
    let mnt = lazy.pull_and_mount(&image, "debian");
    let reference = Reference::new("bookworm");
    let probe = "usr/bin/bash";
    assert_eq!(
        std::fs::read(mnt.join(probe)).unwrap(),
        std::fs::read(reference.path().join(probe)).unwrap()
    );
    // The holder serves the FUSE mounts: when it dies, their connections end.
    let mut holder = lazy.serve.take().unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Files not local and files local alike give an error, never the placeholder's zeros.
    for file in [
        "usr/bin/perl5.36.0",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        probe,
    ] {
        match std::fs::read(mnt.join(file)) {
            Ok(data) => assert!(
                data == std::fs::read(reference.path().join(file)).unwrap(),
                "{file}: wrong bytes after the holder died"
            ),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::EIO)),
                "{file}: {e}"
            ),
        }
    }
}
