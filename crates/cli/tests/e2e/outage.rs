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

    // The outage lasts; the daemon reports it and does not give up.
    std::thread::sleep(Duration::from_secs(40));
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
