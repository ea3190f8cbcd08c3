//! The registry goes away for a long while in the middle of population: readers of files not
//! yet local get EIO after the deadline (never zeros), the daemon keeps retrying by itself, and
//! when the registry is back, population resumes and the layers detach, equal to the extraction.

use std::time::{Duration, Instant};

use crate::common::{
    Lazy, Reference, all_detached, assert_same_tree, indexed_registry, run, wait_for_status, walk,
};
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::require_root;

#[test]
fn population_resumes_by_itself_after_an_outage() {
    if !require_root("population_resumes_by_itself_after_an_outage") {
        return;
    }
    let registry = indexed_registry();
    let proxy = FaultProxy::start(registry.parse().unwrap(), Shaping::default()).unwrap();
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&["--fetch-deadline", "3"]);
    let reference = Reference::new("bookworm");
    let image = format!("{}/test/debian:bookworm", proxy.host());
    lazy.ll(&["pull", &image]);
    proxy.set_down(true);
    let mnt = lazy.fs.path().join("mnt-debian");
    std::fs::create_dir_all(&mnt).unwrap();
    lazy.ll(&["mount", &image, mnt.to_str().unwrap()]);
    lazy.mounts.push(mnt.clone());

    // Files late in the layer are not local yet: the first such read waits, then gets EIO.
    // Whatever reads succeed must be right.
    let mut files: Vec<_> = walk(&reference.path())
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).unwrap().len() > 0)
        .filter(|p| std::fs::symlink_metadata(p).unwrap().is_file())
        .map(|p| p.strip_prefix(reference.path()).unwrap().to_path_buf())
        .collect();
    files.reverse();
    let mut denied = None;
    for file in files.iter().take(200) {
        let started = Instant::now();
        match std::fs::read(mnt.join(file)) {
            Ok(data) => assert!(
                data == std::fs::read(reference.path().join(file)).unwrap(),
                "{} read wrong bytes during the outage",
                file.display()
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", file.display());
                assert!(started.elapsed() < Duration::from_secs(30));
                denied = Some(file.clone());
                break;
            }
        }
    }
    let file = denied.expect("some file late in the layer was not local during the outage");

    // The outage lasts; the daemon reports it (a background transfer caught in flight by the
    // outage fails only after its read timeout and retries, up to about 50 s) and does not give
    // up.
    wait_for_status(&lazy, "the outage never showed in status", |s| {
        s["layers"][0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    });
    std::thread::sleep(Duration::from_secs(10));
    let status = lazy.status();
    let layer = &status["layers"][0];
    assert_eq!(layer["phase"], "lazy", "{status}");
    assert_eq!(
        layer["state"], "populating",
        "the daemon keeps at it: {status}"
    );
    let text = run(&["--root", &lazy.root_arg(), "status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("populating") && text.contains("error: "),
        "the text status names the state and the error: {text}"
    );
    assert!(
        layer["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the outage shows in status: {status}"
    );

    proxy.set_down(false);
    wait_for_status(&lazy, "population did not resume", all_detached);
    assert!(lazy.status()["layers"][0]["error"].is_null());
    assert!(
        std::fs::read(mnt.join(&file)).unwrap()
            == std::fs::read(reference.path().join(&file)).unwrap(),
        "{} after the outage",
        file.display()
    );
    assert_same_tree(&reference.path(), &mnt);
}

/// A registry that always sends one wrong byte in the layer's blob: every span it touches fails
/// its digest. The layer is given up after a few fetches (not refetched without end), `status`
/// says why, and a reader of a file not yet local gets EIO at once, never zeros.
#[test]
fn a_span_that_never_matches_its_digest_fails_the_layer_instead_of_refetching_it() {
    if !require_root(
        "a_span_that_never_matches_its_digest_fails_the_layer_instead_of_refetching_it",
    ) {
        return;
    }
    use lazylayer_testkit::proxy::{Fault, Rule};
    let registry = indexed_registry();
    let proxy = FaultProxy::start(registry.parse().unwrap(), Shaping::default()).unwrap();
    let hex = crate::common::layer_hexes("bookworm")[0].clone();
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&["--fetch-deadline", "5"]);
    let image = format!("{}/test/debian:bookworm", proxy.host());
    // The index is fetched right; from now on every ranged read of the layer is damaged.
    proxy.add_rule(
        Rule::new(Fault::CorruptAt { at: 0 })
            .on_path(&format!("/blobs/sha256:{hex}"))
            .always(),
    );
    lazy.ll(&["pull", &image]);
    let failed = |status: &serde_json::Value| status["layers"][0]["failed"] == true;
    wait_for_status(&lazy, "the layer never failed", failed);
    let status = lazy.status();
    let error = status["layers"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("did not match its digest"), "{status}");
    let fetched = status["layers"][0]["bytes_fetched"].as_u64().unwrap();
    let gets = || {
        proxy
            .exchanges()
            .iter()
            .filter(|e| e.method == "GET" && e.target.ends_with(&format!("/blobs/sha256:{hex}")))
            .count()
    };
    let requests = gets();
    // Nothing fetches the layer again.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(gets(), requests, "the layer is still being fetched");
    assert_eq!(
        lazy.status()["layers"][0]["bytes_fetched"]
            .as_u64()
            .unwrap(),
        fetched
    );
    // The background gave up on the first span (it starts there, in stream order). A reader of
    // a file in it gets EIO at once: the span is not fetched again for it.
    assert!(error.contains("span 0 "), "{status}");
    let first_file = String::from_utf8(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -tvzf {} | awk '$1 ~ /^-/ && $3 > 0 {{print $6; exit}}'",
                crate::common::layer_blobs("bookworm")[0].display()
            ))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mnt = lazy.fs.path().join("mnt-debian");
    std::fs::create_dir_all(&mnt).unwrap();
    lazy.ll(&["mount", &image, mnt.to_str().unwrap()]);
    lazy.mounts.push(mnt.clone());
    let started = Instant::now();
    let read = std::fs::read(mnt.join(first_file.trim()));
    assert_eq!(read.err().and_then(|e| e.raw_os_error()), Some(libc::EIO));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gets(), requests, "a reader made the layer be fetched again");
    // `detach --wait` says the layer cannot be detached instead of waiting for ever.
    let detach = run(&["--root", &lazy.root_arg(), "detach", "--wait", &image]);
    assert!(!detach.status.success());
}
