//! Trust in lazy indexes (issue 14): a referrer whose file table lies (every span digest true,
//! so every fetched byte verifies) is ignored by default, and when the user opts into referrer
//! indexes the lie is caught at detach and the layer fails for good; an index bound to the
//! image by `index --push` is used lazily; an image pulled by its original manifest digest
//! still runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use lazylayer_index::LayerIndex;
use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy, skopeo_inspect};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};
use lazylayer_testkit::require_root;

use crate::common::{Lazy, indexed_registry, ok, run, wait_for_status};

/// What a lie changes in the Debian image's index.
type Lie = fn(&mut LayerIndex);

/// `etc/passwd` gets `etc/shadow`'s data (its digest too, so the fill verifies).
fn passwd_is_shadow(index: &mut LayerIndex) {
    let secret = index.entries[position(index, "etc/shadow")].clone();
    let i = position(index, "etc/passwd");
    let lie = &mut index.entries[i];
    lie.data_offset = secret.data_offset;
    lie.size = secret.size;
    lie.digest = secret.digest;
    lie.sparse = secret.sparse;
}

/// `usr/bin/find` is setuid root.
fn find_is_setuid(index: &mut LayerIndex) {
    let i = position(index, "usr/bin/find");
    index.entries[i].mode |= 0o4000;
    index.entries[i].uid = 0;
}

/// Entries without data: `etc/os-release` links to the shadow file, `etc` is world-writable.
fn symlink_and_directory(index: &mut LayerIndex) {
    let i = position(index, "etc/os-release");
    index.entries[i].link = Some(b"shadow".to_vec());
    let i = position(index, "etc");
    index.entries[i].mode = 0o777;
}

fn every_lie(index: &mut LayerIndex) {
    passwd_is_shadow(index);
    find_is_setuid(index);
    symlink_and_directory(index);
}

fn position(index: &LayerIndex, name: &str) -> usize {
    index
        .entries
        .iter()
        .position(|e| e.path == name.as_bytes())
        .unwrap_or_else(|| panic!("{name} in the index"))
}

/// A registry holding the Debian image with a lying index attached as a referrer: a correct
/// index with `lie` applied to its file table (every span digest untouched, so every fetched
/// byte still verifies). Returns the registry and the image (by tag).
fn lying_referrer(lie: Lie) -> (TestRegistry, String) {
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    let image = format!("{}/trust/debian:bookworm", registry.host());
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("docker://{image}"),
        &[],
    );
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().to_str().unwrap();
    ok(&["--root", root, "index", &image]);
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(&["--root", root, "inspect", "--json", &image])).unwrap();
    let hex = inspected["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let path = scratch.path().join("indexes/sha256").join(&hex);
    let mut index = LayerIndex::open(&path).unwrap();
    lie(&mut index);
    std::fs::write(&path, index.encode().unwrap()).unwrap();
    // Pushed by manifest digest: attached as a referrer only, bound to nothing.
    let manifest = inspected["manifest"]["digest"].as_str().unwrap();
    let by_digest = format!("{}/trust/debian@{manifest}", registry.host());
    let pushed = ok(&["--root", root, "index", "--push", &by_digest]);
    assert!(pushed.contains("not bound"), "{pushed}");
    (registry, image)
}

/// A store that pulled `image` with the referrer policy opted into, and a mount of it.
fn opted_in(image: &str) -> (Lazy, PathBuf) {
    let mut lazy = Lazy::new("ext4");
    let pulled = in_store(
        &lazy,
        &[
            "pull",
            "--mode",
            "fanotify",
            "--index-trust",
            "referrer",
            image,
        ],
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(
        stderr(&pulled).contains("referrer index"),
        "{}",
        stderr(&pulled)
    );
    let mnt = mount(&mut lazy, image, "lied-to");
    (lazy, mnt)
}

fn assert_eio(path: &Path) {
    let read = std::fs::read(path);
    assert_eq!(
        read.as_ref().map(|_| ()).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "{}",
        path.display()
    );
}

/// The layer failed for good, for a reason that mentions `why`; nothing new may use it.
fn assert_failed_for_good(lazy: &Lazy, image: &str, mnt: &Path, why: &str) {
    // `failed` is shown once the daemon has denied the layer's files (the state, as soon as
    // the failure is recorded).
    wait_for_status(lazy, "the layer did not fail", |s| {
        s["layers"][0]["state"] == "failed" && s["layers"][0]["failed"] == true
    });
    let status = lazy.status();
    let layer = &status["layers"][0];
    assert_eq!(layer["failed"], true, "{status}");
    assert!(layer["error"].as_str().unwrap().contains(why), "{status}");
    // Readers of the mount made before get EIO, on every file of the layer, filled or not.
    assert_eio(&mnt.join("usr/lib/os-release"));
    assert_eio(&mnt.join("etc/passwd"));
    let verify = in_store(lazy, &["verify", image]);
    assert!(!verify.status.success());
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("failed:"),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let other = lazy.root().parent().unwrap().join("mnt-refused");
    std::fs::create_dir_all(&other).unwrap();
    let refused = in_store(lazy, &["mount", image, other.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("lazylayer rmi"),
        "{}",
        stderr(&refused)
    );
    let again = in_store(lazy, &["pull", "--index-trust", "referrer", image]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("failed"), "{}", stderr(&again));
}

fn in_store(lazy: &Lazy, args: &[&str]) -> Output {
    let root = lazy.root_arg();
    let mut all = vec!["--root", root.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn mount(lazy: &mut Lazy, image: &str, name: &str) -> std::path::PathBuf {
    let target = lazy.root().parent().unwrap().join(format!("mnt-{name}"));
    std::fs::create_dir_all(&target).unwrap();
    lazy.ll(&["mount", image, target.to_str().unwrap()]);
    lazy.mounts.push(target.clone());
    target
}

/// The mount shows the image, not the lies: Debian's `etc/passwd` starts with root's entry
/// (its shadow file with root's locked password), `find` is not setuid, `etc/os-release`
/// links to `../usr/lib/os-release`, `etc` is 0755.
fn assert_is_image(mnt: &Path) {
    let passwd = std::fs::read_to_string(mnt.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    let find = std::fs::metadata(mnt.join("usr/bin/find")).unwrap();
    assert_eq!(find.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(mnt.join("etc/os-release")).unwrap(),
        Path::new("../usr/lib/os-release")
    );
    let etc = std::fs::metadata(mnt.join("etc")).unwrap();
    assert_eq!(etc.permissions().mode() & 0o7777, 0o755);
}

#[test]
fn a_lying_referrer_index_is_not_used_by_default() {
    if !require_root("a_lying_referrer_index_is_not_used_by_default") {
        return;
    }
    let (_registry, image) = lying_referrer(every_lie);
    let mut lazy = Lazy::new("ext4");
    let pulled = in_store(&lazy, &["pull", "--mode", "fanotify", &image]);
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(
        stderr(&pulled).contains("unbound referrer") && stderr(&pulled).contains("local index"),
        "{}",
        stderr(&pulled)
    );
    let mnt = mount(&mut lazy, &image, "default");
    assert_is_image(&mnt);
    let inspected: serde_json::Value =
        serde_json::from_str(&lazy.ll(&["inspect", "--json", &image])).unwrap();
    assert_eq!(inspected["layers"][0]["index"]["origin"], "local");
    assert_eq!(inspected["layers"][0]["index"]["stored"], true);
}

#[test]
fn a_referrer_lying_about_file_data_is_refused_at_the_first_read() {
    if !require_root("a_referrer_lying_about_file_data_is_refused_at_the_first_read") {
        return;
    }
    let (_registry, image) = lying_referrer(passwd_is_shadow);
    let (mut lazy, mnt) = opted_in(&image);
    // Its tar header says etc/shadow: the reader gets EIO, never the shadow file.
    assert_eio(&mnt.join("etc/passwd"));
    assert_failed_for_good(&lazy, &image, &mnt, "etc/shadow");

    // The way out: remove the image, collect the layer, pull again by default.
    lazy.ll(&["umount", mnt.to_str().unwrap()]);
    lazy.mounts.clear();
    lazy.ll(&["rmi", &image]);
    lazy.ll(&["gc"]);
    let pulled = in_store(&lazy, &["pull", "--mode", "fanotify", &image]);
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    let mnt = mount(&mut lazy, &image, "after");
    assert_is_image(&mnt);
}

#[test]
fn a_referrer_lying_about_a_setuid_bit_is_refused_when_the_file_is_read() {
    if !require_root("a_referrer_lying_about_a_setuid_bit_is_refused_when_the_file_is_read") {
        return;
    }
    let (_registry, image) = lying_referrer(find_is_setuid);
    let (lazy, mnt) = opted_in(&image);
    assert_eio(&mnt.join("usr/bin/find"));
    assert_failed_for_good(&lazy, &image, &mnt, "mode");
}

#[test]
fn a_referrer_lying_about_entries_without_data_is_refused_at_detach() {
    if !require_root("a_referrer_lying_about_entries_without_data_is_refused_at_detach") {
        return;
    }
    let (_registry, image) = lying_referrer(symlink_and_directory);
    let (lazy, mnt) = opted_in(&image);
    // No event tells of a readlink or a stat: the lie shows until the layer is complete, when
    // the index rebuilt from the verified blob differs.
    let detach = in_store(&lazy, &["detach", "--wait", &image]);
    assert!(!detach.status.success(), "{}", stderr(&detach));
    assert!(
        stderr(&detach).contains("cannot be detached"),
        "{}",
        stderr(&detach)
    );
    assert_failed_for_good(&lazy, &image, &mnt, "differs");
}

#[test]
fn a_bound_index_is_used_lazily_and_the_original_manifest_still_runs() {
    if !require_root("a_bound_index_is_used_lazily_and_the_original_manifest_still_runs") {
        return;
    }
    let host = indexed_registry();
    let image = format!("{host}/test/debian:bookworm");
    // The tag names an image index: the unchanged manifest, and the index artifact.
    let raw = skopeo_inspect(&format!("docker://{image}"), &["--raw"]);
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout_dir().join("index.json")).unwrap()).unwrap();
    let original = original["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "bookworm")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(raw["manifests"][0]["digest"], original.as_str(), "{raw}");
    assert_eq!(
        raw["manifests"][1]["artifactType"],
        "application/vnd.lazylayer.index.v1"
    );

    let lazy = Lazy::new("ext4");
    let pulled = in_store(&lazy, &["pull", &image]);
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(
        stderr(&pulled).contains("bound index"),
        "{}",
        stderr(&pulled)
    );
    assert!(
        !stderr(&pulled).contains("fetching the layer once"),
        "{}",
        stderr(&pulled)
    );

    // By the original manifest's digest nothing binds the index: it is built here, and the
    // image runs.
    let other = Lazy::new("ext4");
    let pinned = format!("{host}/test/debian@{original}");
    let output = in_store(
        &other,
        &["run", &pinned, "--", "/bin/cat", "/etc/debian_version"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("unbound referrer") && stderr(&output).contains("local index"),
        "{}",
        stderr(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("12."),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
