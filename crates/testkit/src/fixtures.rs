//! The test images: built once by `scripts/build-fixtures` with debootstrap, umoci, skopeo
//! and GNU tar (cached by recipe), and pushed with skopeo into a registry for the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::registry::{RegistryAuth, TestRegistry};
use crate::{repo_root, require_tool};

/// Builds the fixtures if the cache lacks them and returns their directory (holds `oci/`, the
/// layout, and `push-list`). Panics with the script's output if the build fails.
pub fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("LAZYLAYER_FIXTURES") {
            return PathBuf::from(dir);
        }
        let script = repo_root().join("scripts/build-fixtures");
        let output = Command::new(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed (see its output above)",
            script.display()
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        PathBuf::from(stdout.lines().last().expect("fixture directory").trim())
    })
}

/// The fixtures' OCI layout directory (for `oci:` references).
pub fn layout_dir() -> PathBuf {
    fixtures_dir().join("oci")
}

/// A registry shared by the tests of one test binary, holding every fixture image at the
/// names in `push-list` (e.g. `test/debian:bookworm`). It lives as long as the process.
pub fn shared_registry() -> &'static TestRegistry {
    static REGISTRY: OnceLock<TestRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        // Started from a thread that never exits: the registry is tied to its parent thread's
        // life (PR_SET_PDEATHSIG), and test threads come and go.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let registry = TestRegistry::start(RegistryAuth::Anonymous).expect("start registry");
            push_fixtures(&registry.host());
            sender.send(registry).expect("hand over registry");
            loop {
                std::thread::park();
            }
        });
        receiver.recv().expect("registry started")
    })
}

/// Pushes every fixture image into the registry at `host` with skopeo.
pub fn push_fixtures(host: &str) {
    let dir = fixtures_dir();
    let list = std::fs::read_to_string(dir.join("push-list")).expect("push-list");
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let (tag, dest) = (
            words.next().expect("tag"),
            words.next().expect("destination"),
        );
        let flags: Vec<&str> = words.collect();
        skopeo_copy(
            &format!("oci:{}:{tag}", dir.join("oci").display()),
            &format!("docker://{host}/{dest}"),
            &flags,
        );
    }
}

/// `skopeo copy` for loopback registries (plain HTTP, no signature policy).
pub fn skopeo_copy(from: &str, to: &str, flags: &[&str]) {
    require_tool("skopeo");
    let output = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(flags)
        .args([from, to])
        .output()
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo copy {from} {to} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `skopeo inspect` output as JSON (the independent view of an image).
pub fn skopeo_inspect(image: &str, flags: &[&str]) -> serde_json::Value {
    require_tool("skopeo");
    let output = Command::new("skopeo")
        .args(["--insecure-policy", "inspect", "--tls-verify=false"])
        .args(flags)
        .arg(image)
        .output()
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo inspect {image} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("skopeo inspect JSON")
}

/// The layer digests of `skopeo inspect` output.
pub fn skopeo_layers(value: &serde_json::Value) -> Vec<String> {
    value["Layers"]
        .as_array()
        .expect("Layers")
        .iter()
        .map(|v| v.as_str().expect("digest").to_string())
        .collect()
}

/// An uncompressed layer made by GNU tar in two passes, whose hardlinks outlive their targets:
/// `a` (with links `b` and `c`, and `a` archived twice, which GNU tar writes as a link to
/// itself), `l1` (link `l2`), `m1` (link `m2`) and a symlink `s` (link `s2`) are archived;
/// then `tar --append` adds a new `a`, a directory `l1/` with `l1/x`, and `m1` as a symlink.
/// Extraction leaves `b`, `c` with the old `a`, `l2` and `m2` with the old files.
pub fn relinked_targets_tar() -> Vec<u8> {
    require_tool("tar");
    let work = tempfile::tempdir().expect("temporary directory");
    let script = r#"
        set -e
        mkdir tree && cd tree
        printf 'old a\n' > a && ln a b && ln a c
        printf 'old l1\n' > l1 && ln l1 l2
        printf 'old m1\n' > m1 && ln m1 m2
        ln -s a s && ln s s2
        touch -h -d @1700000000 a l1 m1 s
        tar --format=gnu -cf ../layer.tar a b c a l1 l2 m1 m2 s s2
        rm a l1 m1
        printf 'new a, longer\n' > a
        mkdir l1 && printf 'inside l1\n' > l1/x
        ln -s a m1
        touch -h -d @1700000100 a l1 l1/x m1
        tar --format=gnu -rf ../layer.tar a l1 m1
    "#;
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(work.path())
        .output()
        .expect("run sh");
    assert!(
        output.status.success(),
        "making the relinked layer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(work.path().join("layer.tar")).expect("read layer.tar")
}
