//! POSIX conformance of a container's filesystem over FUSE-served lazy layers: pjdfstest (the
//! Rust rewrite, built by `scripts/install-deps`) runs in an overlay whose lower is a lazy
//! layer served through FUSE, and in the same overlay over a plain extraction of the same
//! layer. lazylayer must add no failure of its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Lazy, Reference, indexed_registry, sh};
use lazylayer_testkit::require_root;

const PJDFSTEST: &str = "/var/cache/lazylayer-test/pjdfstest-0.2.2/bin/pjdfstest";

/// Runs pjdfstest in a fresh directory under `mnt`; returns the failed test cases and the
/// summary line.
fn pjdfstest(mnt: &Path, config: &Path) -> (BTreeSet<String>, String) {
    let dir = mnt.join("tmp/pjdfstest");
    std::fs::create_dir_all(&dir).unwrap();
    let output = Command::new(PJDFSTEST)
        .env("NO_COLOR", "1")
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("{PJDFSTEST}: {e} (scripts/install-deps builds it)"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let failed = stdout
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED") || l.contains("PASSED UNEXPECTEDLY"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("Summary"))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary: {stdout}"))
        .to_string();
    (failed, summary)
}

/// An overlay with the options lazylayer uses, over `lower`, at `dir/mnt`; unmounted on drop.
struct PlainOverlay(PathBuf);

impl PlainOverlay {
    fn mount(lower: &Path, dir: &Path, mnt: &Path) -> PlainOverlay {
        let (upper, work, mnt) = (dir.join("upper"), dir.join("work"), mnt.to_path_buf());
        for d in [&upper, &work, &mnt] {
            std::fs::create_dir_all(d).unwrap();
        }
        sh(&format!(
            "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={},metacopy=on,redirect_dir=on,index=on,xino=auto {}",
            lower.display(),
            upper.display(),
            work.display(),
            mnt.display()
        ));
        PlainOverlay(mnt)
    }
}

impl Drop for PlainOverlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn pjdfstest_finds_nothing_over_fuse_layers_that_a_plain_extraction_does_not_show() {
    if !require_root(
        "pjdfstest_finds_nothing_over_fuse_layers_that_a_plain_extraction_does_not_show",
    ) {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode("ext4", "fuse");
    // The layer stays lazy: pjdfstest runs over a FUSE lower that is still being served.
    lazy.serve(&["--background-rate", "1"]);
    // Short mount points of equal length: sockets' paths are limited to 108 bytes, and
    // pjdfstest's socket tests bind long names under the directory it is given.
    let short = tempfile::Builder::new()
        .prefix("llp.")
        .tempdir_in("/tmp")
        .unwrap();
    let (fuse_mnt, plain_mnt) = (short.path().join("f"), short.path().join("p"));
    std::fs::create_dir(&fuse_mnt).unwrap();
    let image = format!("{registry}/test/debian:bookworm");
    lazy.ll(&["pull", "--mode", "fuse", &image]);
    lazy.ll(&["mount", &image, fuse_mnt.to_str().unwrap()]);
    lazy.mounts.push(fuse_mnt.clone());
    assert_eq!(lazy.status()["layers"][0]["mode"], "fuse");

    let reference = Reference::new("bookworm");
    let plain_dir = lazy.fs.path().join("plain");
    let plain = PlainOverlay::mount(&reference.layer(0), &plain_dir, &plain_mnt);

    // naptime: the pause before checking that a call changed a timestamp. 1 ms is below the
    // kernel's coarse timestamp granularity (a jiffy), which made those checks pass or fail
    // by chance, on either mount.
    let config = lazy.fs.path().join("pjdfstest.toml");
    std::fs::write(
        &config,
        "[settings]\nnaptime = 0.02\nallow_remount = false\n\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    let (plain_failed, plain_summary) = pjdfstest(&plain.0, &config);
    let (fuse_failed, fuse_summary) = pjdfstest(&fuse_mnt, &config);
    eprintln!("plain extraction: {plain_summary}");
    eprintln!("lazy FUSE layer:  {fuse_summary}");
    let ours: Vec<&String> = fuse_failed.difference(&plain_failed).collect();
    assert!(
        ours.is_empty(),
        "failures over FUSE layers only: {ours:?}\n(plain: {plain_summary}; FUSE: {fuse_summary})"
    );
    // The suite ran (a summary with passes), and the layer was still lazy throughout.
    assert!(fuse_summary.contains("passed"), "{fuse_summary}");
    assert_eq!(lazy.status()["layers"][0]["phase"], "lazy");
}
