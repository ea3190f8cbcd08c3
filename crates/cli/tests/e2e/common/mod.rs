//! What the end-to-end tests of lazy layers share: the lazylayer binary, ext4/XFS loop
//! filesystems for stores, a store with its daemon and mounts (cleaned up on drop), registries
//! with pushed indexes, and reference extractions of the fixture images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::{layout_dir, shared_registry, skopeo_copy};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};
use lazylayer_testkit::tree_diff::{diff_trees, extract_layer};

pub const EXE: &str = env!("CARGO_BIN_EXE_lazylayer");

pub fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env_remove("LAZYLAYER_LOG")
        .output()
        .expect("run lazylayer")
}

pub fn ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "lazylayer {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn sh(command: &str) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .expect("sh");
    assert!(status.success(), "{command}");
}

/// A filesystem image (ext4 or xfs) loop-mounted for a store.
pub struct LoopFs {
    pub dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(kind: &str) -> LoopFs {
        LoopFs::with_size(kind, "3G")
    }

    /// A loop filesystem of `size` (as `truncate -s` takes it).
    pub fn with_size(kind: &str, size: &str) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("lazylayer-fs.")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        sh(&format!("truncate -s {size} {}", image.display()));
        match kind {
            "xfs" => sh(&format!("mkfs.xfs -q -f {}", image.display())),
            _ => sh(&format!("mkfs.ext4 -q -F {}", image.display())),
        }
        sh(&format!(
            "mount -o loop {} {}",
            image.display(),
            mnt.display()
        ));
        LoopFs { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A store on a loop filesystem, its daemon and its mounts; all cleaned up on drop.
pub struct Lazy {
    pub fs: LoopFs,
    pub serve: Option<Child>,
    pub mounts: Vec<PathBuf>,
    /// `pull --mode`: auto, fanotify or fuse.
    pub mode: &'static str,
}

impl Lazy {
    pub fn new(kind: &str) -> Lazy {
        Lazy::on(LoopFs::new(kind))
    }

    /// A store on the given filesystem.
    pub fn on(fs: LoopFs) -> Lazy {
        Lazy {
            fs,
            serve: None,
            mounts: Vec::new(),
            mode: "auto",
        }
    }

    /// A store on a fresh loop filesystem whose pulls serve lazy layers in `mode`.
    pub fn with_mode(kind: &str, mode: &'static str) -> Lazy {
        let mut lazy = Lazy::new(kind);
        lazy.mode = mode;
        lazy
    }

    pub fn root(&self) -> PathBuf {
        self.fs.path().join("root")
    }

    pub fn root_arg(&self) -> String {
        self.root().display().to_string()
    }

    /// Starts the daemon with these extra options (before any pull starts one on demand).
    pub fn serve(&mut self, extra: &[&str]) {
        std::fs::create_dir_all(self.root()).unwrap();
        let child = Command::new(EXE)
            .args(["--root", &self.root_arg(), "serve"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.serve = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.root().join("lazylayer.sock").exists() {
            assert!(Instant::now() < deadline, "serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ll(&self, args: &[&str]) -> String {
        let root = self.root_arg();
        let mut all = vec!["--root", root.as_str()];
        all.extend_from_slice(args);
        ok(&all)
    }

    pub fn pull_and_mount(&mut self, image: &str, name: &str) -> PathBuf {
        self.ll(&["pull", "--mode", self.mode, image]);
        let target = self.fs.path().join(format!("mnt-{name}"));
        std::fs::create_dir_all(&target).unwrap();
        self.ll(&["mount", image, target.to_str().unwrap()]);
        self.mounts.push(target.clone());
        target
    }

    /// The directory of the layer whose blob digest is `sha256:<hex>` (the overlay lower).
    pub fn layer_fs(&self, hex: &str) -> PathBuf {
        self.root().join("layers/sha256").join(hex).join("fs")
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ll(&["status", "--json"])).unwrap()
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        for target in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
        if let Some(mut child) = self.serve.take() {
            lazylayer_testkit::daemon::stop(&mut child);
        }
        // A daemon started on demand, or a worker that outlived its holder.
        if let Ok(status) = serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(
            &run(&["--root", &self.root_arg(), "status", "--json"]).stdout,
        )) {
            lazylayer_testkit::daemon::kill_from_status(&status);
        }
    }
}

/// Compressed bytes fetched for every layer so far, from `status --json`.
pub fn bytes_fetched(status: &serde_json::Value) -> u64 {
    status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bytes_fetched"].as_u64().unwrap())
        .sum()
}

/// The shared registry, with lazy indexes pushed for the Debian and multi-layer images.
pub fn indexed_registry() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let host = shared_registry().host();
        let scratch = tempfile::tempdir().unwrap();
        for image in ["test/debian:bookworm", "test/layers:latest"] {
            ok(&[
                "--root",
                scratch.path().to_str().unwrap(),
                "index",
                "--push",
                &format!("{host}/{image}"),
            ]);
        }
        host
    })
    .clone()
}

/// The hex digest of a fixture image's manifest (by its tag in the fixture layout).
pub fn fixture_manifest_hex(tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout_dir().join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string()
}

/// The layer blobs of a fixture image, bottom first.
pub fn layer_blobs(tag: &str) -> Vec<PathBuf> {
    let manifest_digest = fixture_manifest_hex(tag);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout_dir().join("blobs/sha256").join(manifest_digest)).unwrap(),
    )
    .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            layout_dir()
                .join("blobs/sha256")
                .join(l["digest"].as_str().unwrap().trim_start_matches("sha256:"))
        })
        .collect()
}

/// The hex digests of a fixture image's layer blobs, bottom first.
pub fn layer_hexes(tag: &str) -> Vec<String> {
    layer_blobs(tag)
        .iter()
        .map(|b| b.file_name().unwrap().to_str().unwrap().to_string())
        .collect()
}

/// The reference view of an image: an overlay (mounted by util-linux mount) over GNU tar
/// extractions of its layers. Unmounted on drop.
pub struct Reference {
    pub dir: tempfile::TempDir,
}

impl Reference {
    pub fn new(tag: &str) -> Reference {
        Reference::of_blobs(&layer_blobs(tag))
    }

    /// The reference view of the layer blobs `blobs`, bottom first.
    pub fn of_blobs(blobs: &[PathBuf]) -> Reference {
        let dir = tempfile::Builder::new()
            .prefix("lazylayer-ref.")
            .tempdir()
            .unwrap();
        let mut lowers = Vec::new();
        for (i, blob) in blobs.iter().enumerate() {
            let layer = dir.path().join(format!("layer{i}"));
            extract_layer(blob, &layer);
            lowers.push(layer.display().to_string());
        }
        lowers.reverse();
        let mnt = dir.path().join("mnt");
        if lowers.len() == 1 {
            // overlayfs needs two lowers without an upper; one layer is its own view.
            std::os::unix::fs::symlink(&lowers[0], &mnt).unwrap();
        } else {
            std::fs::create_dir(&mnt).unwrap();
            sh(&format!(
                "mount -t overlay overlay -o lowerdir={} {}",
                lowers.join(":"),
                mnt.display()
            ));
        }
        Reference { dir }
    }

    pub fn path(&self) -> PathBuf {
        let mnt = self.dir.path().join("mnt");
        std::fs::read_link(&mnt).unwrap_or(mnt)
    }

    pub fn layer(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("layer{i}"))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A registry of its own (to stop it), holding the Debian image and its pushed index.
pub fn own_registry() -> TestRegistry {
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    push_indexed(&registry.host(), "bookworm", "test/debian:bookworm");
    registry
}

/// Pushes the fixture image `tag` to `host/name` with skopeo, then its lazy indexes.
pub fn push_indexed(host: &str, tag: &str, name: &str) {
    push_indexed_from(&layout_dir(), tag, host, name);
}

/// Pushes the image `tag` of the OCI layout `layout` to `host/name` with skopeo, then its
/// lazy indexes.
pub fn push_indexed_from(layout: &Path, tag: &str, host: &str, name: &str) {
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{host}/{name}"),
        &[],
    );
    let scratch = tempfile::tempdir().unwrap();
    ok(&[
        "--root",
        scratch.path().to_str().unwrap(),
        "index",
        "--push",
        &format!("{host}/{name}"),
    ]);
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// Polls `lazylayer status --json` until `done` holds (four minutes at most; then fails,
/// saying `what`).
pub fn wait_for_status(lazy: &Lazy, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let status = lazy.status();
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Files filled in all layers, as `status --json` counts them.
pub fn files_populated(status: &serde_json::Value) -> u64 {
    status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["files_populated"].as_u64().unwrap())
        .sum()
}

/// Whether every layer in a `status --json` is detached.
pub fn all_detached(status: &serde_json::Value) -> bool {
    status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["phase"] == "detached")
}

/// Asserts that `tree` equals `reference`, content and metadata, showing the first differences.
pub fn assert_same_tree(reference: &Path, tree: &Path) {
    let differences = diff_trees(reference, tree, true);
    assert!(
        differences.is_empty(),
        "{:#?}",
        &differences[..differences.len().min(20)]
    );
}

/// Runs the check `fn $check(kind: &str, mode: &'static str)` as three root tests in a module
/// of its name: fanotify mode on an ext4 store (`$check::ext4`), fanotify mode on an XFS store
/// (`$check::xfs`) and FUSE mode on an ext4 store (`$check::fuse`).
macro_rules! on_every_store {
    ($($check:ident),+ $(,)?) => {$(
        mod $check {
            #[test]
            fn ext4() {
                if lazylayer_testkit::require_root(concat!(stringify!($check), "::ext4")) {
                    super::$check("ext4", "fanotify");
                }
            }

            #[test]
            fn xfs() {
                if lazylayer_testkit::require_root(concat!(stringify!($check), "::xfs")) {
                    super::$check("xfs", "fanotify");
                }
            }

            #[test]
            fn fuse() {
                if lazylayer_testkit::require_root(concat!(stringify!($check), "::fuse")) {
                    super::$check("ext4", "fuse");
                }
            }
        }
    )+};
}

/// A long-running `lazylayer` service a test starts (the snapshotter, the layer store), its
/// output in a log file; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Service {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Service {
    /// The service `lazylayer ARGS`, logging to `log`; not started yet.
    pub fn new(args: Vec<String>, log: PathBuf) -> Service {
        Service {
            child: None,
            args,
            log,
        }
    }

    /// Starts it and waits (20 s at most) until `ready` says it serves.
    pub fn launch(&mut self, ready: impl Fn() -> bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(EXE)
            .args(&self.args)
            .env("LAZYLAYER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "lazylayer {:?} did not start: {}",
                self.args,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it: SIGTERM, then SIGKILL if it has not exited within 10 s.
    pub fn kill_gently(&mut self) {
        if let Some(mut child) = self.child.take() {
            lazylayer_testkit::daemon::stop(&mut child);
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill_gently();
    }
}

/// The hex digests of `image`'s layer blobs, bottom first, as `lazylayer inspect` sees them.
pub fn layer_digests(lazy: &Lazy, image: &str) -> Vec<String> {
    let inspect: serde_json::Value =
        serde_json::from_str(&lazy.ll(&["inspect", "--json", image])).unwrap();
    inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}
