//! The hostile-layer corpus (`lazylayer_testkit::hostile`), each layer an image in an OCI
//! layout, pulled into a store on a loop filesystem: every layer is refused with an error naming
//! the problem, or contained in its layer directory. After each pull, nothing exists outside
//! the store: the loop filesystem outside the store's root is unchanged, and none of the host
//! paths an escape would create exists. Pull's memory stays bounded on a decompression bomb.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{EXE, Lazy};
use lazylayer_testkit::hostile::{self, Expect, HOST_CANARIES};
use lazylayer_testkit::require_root;

/// Every path on the loop filesystem, except under the store root (not even entered: a
/// contained layer may hold paths longer than PATH_MAX).
fn outside_the_store(dir: &Path, root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path == root || path.ends_with("lost+found") {
            continue;
        }
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(outside_the_store(&path, root));
        }
        out.insert(path);
    }
    out
}

/// Runs `lazylayer pull` under GNU time and returns its success, its stderr and its peak RSS
/// in KiB (measured in a process that never held this test's memory).
fn pull(lazy: &Lazy, image: &str) -> (bool, String, u64) {
    measured(&["--root", &lazy.root_arg(), "pull", image])
}

/// Runs `lazylayer ARGS` under GNU time: its success, its stderr and its peak RSS in KiB.
fn measured(args: &[&str]) -> (bool, String, u64) {
    let measure = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(measure.path())
        .arg(EXE)
        .args(args)
        .output()
        .expect("GNU time (scripts/install-deps installs it)");
    let rss = std::fs::read_to_string(measure.path()).unwrap();
    let rss = rss
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        rss,
    )
}

#[test]
fn hostile_layers_are_refused_or_contained() {
    if !require_root("hostile_layers_are_refused_or_contained") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    let mut corpus = hostile::corpus(256 << 20);
    hostile::write_layout(&layout, &corpus).unwrap();
    // The tar bytes (the bomb's 256 MiB) leave this process before it forks the pulls, whose
    // peak RSS would otherwise count them.
    for layer in &mut corpus {
        layer.tar = Vec::new();
    }
    let mut lazy = Lazy::new("ext4");
    // The background held back: the bomb's 256 MiB are not the point here.
    lazy.serve(&["--background-rate", "1"]);
    let before = outside_the_store(&lazy.fs.path(), &lazy.root());
    let mut contained = Vec::new();
    for layer in &corpus {
        let image = format!("oci:{}:{}", layout.display(), layer.name);
        let (success, stderr, rss_kib) = pull(&lazy, &image);
        let what = format!("{} ({}): {stderr}", layer.name, layer.attack);
        eprintln!(
            "{:<22} {:<9} peak {:>6} KiB  {}",
            layer.name,
            if success { "contained" } else { "refused" },
            rss_kib,
            stderr.lines().last().unwrap_or_default()
        );
        assert!(!stderr.contains("panicked"), "{what}");
        match layer.expect {
            Expect::Refused(words) => {
                assert!(!success, "{what}: accepted");
                assert!(
                    stderr.contains(words),
                    "{what}: the error does not say `{words}`"
                );
            }
            Expect::Contained => {
                assert!(success, "{what}: refused");
                contained.push(layer.name);
            }
            Expect::RefusedOrContained => {
                if !success {
                    assert!(stderr.contains("error:"), "{what}: no clear error");
                }
            }
        }
        assert!(
            rss_kib < 256 * 1024,
            "{}: pull peaked at {rss_kib} KiB",
            layer.name
        );
        for canary in HOST_CANARIES {
            assert!(
                !Path::new(canary).exists(),
                "{}: {canary} exists",
                layer.name
            );
        }
        assert_eq!(
            outside_the_store(&lazy.fs.path(), &lazy.root()),
            before,
            "{}: something appeared outside the store",
            layer.name
        );
    }
    assert_eq!(contained, ["absolute", "duplicates", "bomb"]);

    // What the contained layers created is inside their layer directories.
    let layer_dirs: Vec<PathBuf> = std::fs::read_dir(lazy.root().join("layers/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs"))
        .collect();
    let has = |path: &str| layer_dirs.iter().any(|d| d.join(path).exists());
    assert!(
        has("etc/lazylayer-hostile-escape"),
        "the absolute path, inside"
    );
    assert!(has("twice"), "the duplicate, inside");
    assert!(has("zeros"), "the bomb's file, inside");
}

#[test]
fn indexing_a_large_layer_holds_bounded_memory() {
    // 256 MiB of incompressible data: 256 spans, each with its digest and a 32 KiB window.
    const BYTES: usize = 256 << 20;
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    let mut layer = hostile::large_random_file(BYTES);
    hostile::write_layout(&layout, std::slice::from_ref(&layer)).unwrap();
    layer.tar = Vec::new();
    let root = scratch.path().join("root");
    let image = format!("oci:{}:{}", layout.display(), layer.name);
    let (success, stderr, rss_kib) = measured(&["--root", root.to_str().unwrap(), "index", &image]);
    eprintln!("index of a {BYTES}-byte layer: peak {rss_kib} KiB");
    assert!(success, "{stderr}");
    assert!(
        rss_kib < 64 * 1024,
        "indexing a layer of {BYTES} bytes peaked at {rss_kib} KiB (the aim is < 64 MiB)"
    );
}

#[test]
fn a_million_empty_files_in_one_layer_pull_and_detach_in_bounded_memory() {
    if !require_root("a_million_empty_files_in_one_layer_pull_and_detach_in_bounded_memory") {
        return;
    }
    const FILES: usize = 1_000_000;
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    let mut layer = hostile::many_empty_files(FILES);
    hostile::write_layout(&layout, std::slice::from_ref(&layer)).unwrap();
    layer.tar = Vec::new();
    // XFS: its inodes are allocated as needed (an ext4 of this size has too few).
    let mut lazy = Lazy::on(crate::common::LoopFs::with_size("xfs", "4G"));
    let image = format!("oci:{}:{}", layout.display(), layer.name);
    let started = std::time::Instant::now();
    let (success, stderr, rss_kib) = pull(&lazy, &image);
    eprintln!(
        "{FILES} empty files: pull {} in {:?}, peak {rss_kib} KiB",
        if success { "succeeded" } else { "failed" },
        started.elapsed()
    );
    assert!(success, "{stderr}");
    assert!(
        rss_kib < 448 * 1024,
        "pull of {FILES} empty files peaked at {rss_kib} KiB"
    );
    let mnt = lazy.fs.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    lazy.ll(&["mount", &image, mnt.to_str().unwrap()]);
    lazy.mounts.push(mnt.clone());
    let mut files = 0;
    for dir in std::fs::read_dir(&mnt).unwrap() {
        for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let meta = file.unwrap().metadata().unwrap();
            assert!(meta.is_file() && meta.len() == 0);
            files += 1;
        }
    }
    assert_eq!(files, FILES);
    crate::common::wait_for_status(
        &lazy,
        "the layer never detached",
        crate::common::all_detached,
    );
}
