//! `lazylayer rmi` and `lazylayer gc`: what no image and no mount references goes; layers
//! shared with another image, used by a mount (also one in a container's own mount
//! namespace) or still being filled stay; the store is reusable afterwards.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    EXE, Lazy, Reference, all_detached, assert_same_tree, indexed_registry, layer_digests, run,
    wait_for_status, walk,
};
use lazylayer_testkit::require_root;

/// Layer directories in the store, by digest hex.
fn stored_layers(root: &Path) -> Vec<String> {
    let mut layers: Vec<String> = std::fs::read_dir(root.join("layers/sha256"))
        .map(|l| {
            l.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    layers.sort();
    layers
}

/// Files under a store directory (indexes, spans, mounts ...).
fn files_under(dir: &Path) -> usize {
    if dir.exists() { walk(dir).len() } else { 0 }
}

#[test]
fn gc_removes_only_what_no_image_or_mount_uses() {
    if !require_root("gc_removes_only_what_no_image_or_mount_uses") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
    let root = lazy.root();
    let debian = format!("{registry}/test/debian:bookworm");
    let config = format!("{registry}/test/debian:config");
    let layers = format!("{registry}/test/layers:latest");
    lazy.ll(&["pull", &debian]);
    lazy.ll(&["pull", &config]);
    let mnt = lazy.pull_and_mount(&layers, "layers");
    wait_for_status(&lazy, "the layers never detached", all_detached);
    let shared = layer_digests(&lazy, &debian);
    assert_eq!(
        shared,
        layer_digests(&lazy, &config),
        "the two images share their layer"
    );
    let small = layer_digests(&lazy, &layers);
    assert_eq!(stored_layers(&root).len(), 1 + small.len());

    // A writable layer left by a mount that is gone (as after a reboot).
    let stale = root.join("mounts/0123456789abcdef/upper");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("left-behind"), b"x").unwrap();

    // The shared layer stays while another image has it.
    let out = lazy.ll(&["rmi", &debian]);
    assert!(out.contains("forgot"), "{out}");
    assert!(out.contains("gc: 0 layers"), "{out}");
    assert!(stored_layers(&root).contains(&shared[0]));
    assert!(!stale.exists(), "the stale writable layer was kept: {out}");
    let gone = run(&["--root", &lazy.root_arg(), "mount", &debian, "/mnt"]);
    assert!(!gone.status.success(), "a forgotten image still mounts");

    // The last image using it goes: so do the layer, its index and its spans.
    let out = lazy.ll(&["rmi", &config]);
    assert!(out.contains("gc: 1 layers, 1 indexes"), "{out}");
    assert!(!stored_layers(&root).contains(&shared[0]), "{out}");
    assert!(!root.join("indexes/sha256").join(&shared[0]).exists());

    // A mounted image's layers stay after its image is forgotten, and keep reading right.
    let out = lazy.ll(&["rmi", &layers]);
    assert_eq!(
        out.matches("an overlay mount still uses it").count(),
        small.len(),
        "{out}"
    );
    assert_eq!(stored_layers(&root), {
        let mut small = small.clone();
        small.sort();
        small
    });
    let reference = Reference::new("layers");
    assert_same_tree(&reference.path(), &mnt);

    // Unmounted, they go; a dry run first only says so.
    lazy.ll(&["umount", mnt.to_str().unwrap()]);
    lazy.mounts.clear();
    let out = lazy.ll(&["gc", "--dry-run"]);
    assert!(out.contains("gc (dry run): 3 layers"), "{out}");
    assert_eq!(stored_layers(&root).len(), 3);
    let out = lazy.ll(&["gc"]);
    assert!(out.contains("gc: 3 layers, 3 indexes"), "{out}");
    assert!(stored_layers(&root).is_empty(), "{out}");
    for dir in ["indexes", "spans", "mounts", "profiles", "images", "trash"] {
        assert_eq!(
            files_under(&root.join(dir)),
            if dir == "indexes" { 1 } else { 0 },
            "{dir} after gc: {out}"
        );
    }

    // The store is as good as new: the image pulls and reads again.
    let mnt = lazy.pull_and_mount(&layers, "again");
    assert_same_tree(&reference.path(), &mnt);
}

#[test]
fn gc_keeps_layers_of_running_containers_and_layers_being_filled() {
    if !require_root("gc_keeps_layers_of_running_containers_and_layers_being_filled") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
    let root = lazy.root();
    // Background filling at one byte a second: the layer stays lazy; demand is not capped.
    lazy.serve(&["--background-rate", "1"]);
    let debian = format!("{registry}/test/debian:bookworm");
    lazy.ll(&["pull", &debian]);
    let digest = layer_digests(&lazy, &debian).remove(0);

    // A container whose overlay lives in its own mount namespace.
    let mut container = Command::new(EXE)
        .args([
            "--root",
            &lazy.root_arg(),
            "run",
            &debian,
            "--",
            "/bin/sleep",
            "600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sleeping_in_container() {
        assert!(Instant::now() < deadline, "the container never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let host_table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layer_dir = lazy.layer_fs(&digest).display().to_string();
    assert!(
        !host_table.contains(&layer_dir),
        "the container's overlay shows in the host's namespace: the test would prove nothing"
    );

    let out = lazy.ll(&["rmi", &debian]);
    assert!(
        out.contains(&format!(
            "kept layer sha256:{digest}: an overlay mount still uses it"
        )),
        "{out}"
    );
    assert!(stored_layers(&root).contains(&digest));

    // The container ends; the daemon is still filling the layer, which therefore stays.
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(container.id() as i32, libc::SIGTERM);
    }
    let status = container.wait().unwrap();
    assert_eq!(status.code(), Some(143), "the workload did not get SIGTERM");
    let out = lazy.ll(&["gc"]);
    assert!(
        out.contains(&format!(
            "kept layer sha256:{digest}: the daemon is still filling it"
        )),
        "{out}"
    );
    assert!(stored_layers(&root).contains(&digest));
    assert!(
        files_under(&root.join("run")) == 0,
        "the ended container's directory is left"
    );
}

/// Whether a `sleep 600` runs (in the container: the host runs none).
fn sleeping_in_container() -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c == b"/bin/sleep\x00600\x00")
    })
}
