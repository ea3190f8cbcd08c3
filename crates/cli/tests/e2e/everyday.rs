//! What users do first, on a store that is not fresh: run the same image again (lazy, then
//! after its layers detached), pull and run one image (and two images sharing a layer) many
//! times at once into one root, and pull while another pull of the same image is half done.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{EXE, Lazy, Reference, all_detached, assert_same_tree, indexed_registry, run};
use crate::common::{layer_hexes, wait_for_status};
use lazylayer_testkit::fixtures::layout_dir;
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::require_root;

/// `lazylayer run IMAGE -- cat /etc/debian_version` in `lazy`'s store; returns what it printed.
fn run_cat(lazy: &Lazy, image: &str) -> String {
    let output = run(&[
        "--root",
        &lazy.root_arg(),
        "run",
        image,
        "--",
        "/bin/cat",
        "/etc/debian_version",
    ]);
    assert!(
        output.status.success(),
        "run {image} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until no daemon answers for `lazy`'s store (one started on demand leaves once idle).
fn wait_for_daemon_to_leave(lazy: &Lazy) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while lazy.root().join("lazylayer.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not leave when idle"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_same_image_runs_again_while_lazy_and_after_detach() {
    if !require_root("the_same_image_runs_again_while_lazy_and_after_detach") {
        return;
    }
    let image = format!("{}/test/debian:bookworm", indexed_registry());
    let version =
        std::fs::read_to_string(Reference::new("bookworm").path().join("etc/debian_version"))
            .unwrap();
    let lazy = Lazy::new("ext4");
    for _ in 0..2 {
        assert_eq!(run_cat(&lazy, &image), version);
    }
    lazy.ll(&["detach", "--wait", &image]);
    wait_for_daemon_to_leave(&lazy);
    // Every layer is local: no daemon is needed, and none may be taken for a failure.
    for _ in 0..2 {
        assert_eq!(run_cat(&lazy, &image), version);
        assert!(!lazy.root().join("lazylayer.sock").exists());
    }
    let pulled = run(&["--root", &lazy.root_arg(), "pull", &image]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    // A profile recorded on a local image would be empty: it is not written.
    let recorded = run(&[
        "--root",
        &lazy.root_arg(),
        "run",
        "--record",
        &image,
        "--",
        "/bin/true",
    ]);
    assert!(recorded.status.success());
    assert!(
        String::from_utf8_lossy(&recorded.stderr).contains("not recording a profile"),
        "{}",
        String::from_utf8_lossy(&recorded.stderr)
    );
    let profiles = std::fs::read_dir(lazy.root().join("profiles")).map_or(0, |d| d.count());
    assert_eq!(profiles, 0, "a profile was written");
    assert!(all_detached(&lazy.status()));
}

/// Starts `lazylayer --root ROOT ARGS...`, its output captured.
fn spawn(lazy: &Lazy, args: &[&str]) -> std::process::Child {
    Command::new(EXE)
        .args(["--root", &lazy.root_arg()])
        .args(args)
        .env_remove("LAZYLAYER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn concurrent_pulls_and_runs_into_one_root_all_succeed() {
    if !require_root("concurrent_pulls_and_runs_into_one_root_all_succeed") {
        return;
    }
    let registry = indexed_registry();
    // test/debian:config is the Debian image with another config: the two share their layer.
    let images = [
        format!("{registry}/test/debian:bookworm"),
        format!("{registry}/test/debian:config"),
    ];
    let lazy = Lazy::new("ext4");
    let children: Vec<_> = (0..8)
        .map(|i| {
            let image = images[i % 2].as_str();
            let child = if i < 4 {
                spawn(&lazy, &["pull", image])
            } else if i % 2 == 0 {
                spawn(
                    &lazy,
                    &["run", image, "--", "/bin/cat", "/etc/debian_version"],
                )
            } else {
                // This image's Entrypoint is `/bin/sh -c`: the command is its script.
                spawn(&lazy, &["run", image, "--", "cat /etc/debian_version"])
            };
            (i, child)
        })
        .collect();
    for (i, child) in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "process {i} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        if i >= 4 {
            assert!(!output.stdout.is_empty(), "run {i} printed nothing");
        }
    }
    let status = lazy.status();
    let layers = status["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{status}");
    assert_eq!(
        layers[0]["digest"],
        format!("sha256:{}", layer_hexes("bookworm")[0])
    );
    // No temporary file of the writers is left behind.
    let leftovers: Vec<_> = crate::common::walk(&lazy.root().join("indexes"))
        .into_iter()
        .chain(crate::common::walk(&lazy.root().join("images")))
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    lazy.ll(&["detach", "--wait", &images[0]]);
    assert_same_tree(
        &Reference::new("bookworm").layer(0),
        &lazy.layer_fs(&layer_hexes("bookworm")[0]),
    );
    lazy.ll(&["verify", &images[1]]);
}

#[test]
fn a_pull_while_another_is_half_done_waits_and_fetches_nothing_again() {
    if !require_root("a_pull_while_another_is_half_done_waits_and_fetches_nothing_again") {
        return;
    }
    // The multi-layer image without lazy indexes: each pull must fetch a layer whole to index
    // it, over a slow link, so the first pull is still at it when the second starts.
    let registry = lazylayer_testkit::registry::TestRegistry::start(
        lazylayer_testkit::registry::RegistryAuth::Anonymous,
    )
    .unwrap();
    lazylayer_testkit::fixtures::skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{}/test/layers:latest", registry.host()),
        &[],
    );
    let proxy = FaultProxy::start(registry.addr(), Shaping::link(100, 5)).unwrap();
    let image = format!("{}/test/layers:latest", proxy.host());
    let lazy = Lazy::new("ext4");
    let first = spawn(&lazy, &["pull", &image]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy
        .exchanges()
        .iter()
        .any(|e| e.method == "GET" && e.target.contains("/blobs/sha256:") && e.status == 200)
    {
        assert!(Instant::now() < deadline, "the first pull fetched no layer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = spawn(&lazy, &["pull", &image]);
    for (name, child) in [("first", first), ("second", second)] {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "the {name} pull failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Each layer blob went over the link once: the second pull waited for the first's work.
    let exchanges = proxy.exchanges();
    for hex in layer_hexes("layers") {
        let gets = exchanges
            .iter()
            .filter(|e| e.method == "GET" && e.target.ends_with(&format!("/blobs/sha256:{hex}")))
            .count();
        assert_eq!(gets, 1, "layer {hex} was fetched {gets} times");
    }
    let target = lazy.fs.path().join("mnt-layers");
    std::fs::create_dir_all(&target).unwrap();
    lazy.ll(&["mount", &image, target.to_str().unwrap()]);
    let reference = Reference::new("layers");
    let same = lazylayer_testkit::tree_diff::diff_trees(&reference.path(), &target, true);
    let _ = Command::new("umount").arg(&target).status();
    assert!(same.is_empty(), "{:?}", &same[..same.len().min(10)]);
    wait_for_status(&lazy, "layers detached", all_detached);
}

/// An index fetched head first gets its windows from the repository it came from, even when
/// the only image left using the layer is in a repository without the index (a copy pushed
/// elsewhere without its artifact): its daemon, started again, still reads every file.
#[test]
fn windows_come_from_the_index_s_repository_when_another_image_shares_the_layer() {
    if !require_root("windows_come_from_the_index_s_repository_when_another_image_shares_the_layer")
    {
        return;
    }
    let registry = crate::common::own_registry();
    let host = registry.host();
    let indexed = format!("{host}/test/debian:bookworm");
    let plain = format!("{host}/test/plain:bookworm");
    lazylayer_testkit::fixtures::skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("docker://{plain}"),
        &[],
    );
    let mut lazy = Lazy::new("ext4");
    lazy.ll(&["pull", &indexed]);
    lazylayer_testkit::daemon::kill_from_status(&lazy.status());
    // The windows not fetched yet (zeroed, should the daemon have fetched some already).
    let hex = &layer_hexes("bookworm")[0];
    let stored = lazy.root().join("indexes/sha256").join(hex);
    assert!(
        stored.with_extension("windows").exists(),
        "the index was fetched head first"
    );
    let index = lazylayer_index::LayerIndex::open(&stored).unwrap();
    let head = index.head_len().unwrap();
    let size = std::fs::metadata(&stored).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0; (size - head) as usize], head)
        .unwrap();
    drop(file);
    let missing = lazylayer_index::LayerIndex::open(&stored)
        .unwrap()
        .missing_windows();
    assert!(missing > 10, "{missing} windows missing");
    // The copy without an index shares the lazy layer (the same manifest: its record now
    // names the copy, which the daemon takes the layer up for).
    let mounted = lazy.pull_and_mount(&plain, "plain");
    // Every regular file reads as extracted (contents only: a fill the kill above cut short
    // leaves its placeholder's mtime changed until the file is filled again).
    let extraction = Reference::new("bookworm");
    let reference = extraction.path();
    let mut files = 0;
    for path in crate::common::walk(&reference) {
        if !std::fs::symlink_metadata(&path).unwrap().is_file() {
            continue;
        }
        let relative = path.strip_prefix(&reference).unwrap();
        let read = std::fs::read(mounted.join(relative));
        assert!(
            read.as_ref().ok() == Some(&std::fs::read(&path).unwrap()),
            "{} reads wrong: {:?}",
            relative.display(),
            read.err()
        );
        files += 1;
    }
    assert!(files > 1000, "{files} files");
}
