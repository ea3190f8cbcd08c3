//! lazylayer as containerd's remote snapshotter: a private containerd (Debian's 1.6) with the
//! `lazylayer snapshotter` proxy plugin, images pulled with stargz's `ctr-remote image rpull`
//! (which sends the layer labels) from the shared registry, containers run with `ctr run`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lazylayer_testkit::containerd::{Containerd, NAMESPACE};
use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};

use crate::common::*;

/// A `lazylayer snapshotter` process serving a store.
pub struct SnapshotterProcess {
    service: Service,
    pub socket: PathBuf,
}

impl SnapshotterProcess {
    pub fn start(lazy: &Lazy) -> SnapshotterProcess {
        let dir = lazy.fs.dir.path();
        let socket = dir.join("snapshotter.sock");
        let args = vec![
            "--root".to_string(),
            lazy.root_arg(),
            "snapshotter".to_string(),
            "--mode".to_string(),
            lazy.mode.to_string(),
            "--address".to_string(),
            socket.display().to_string(),
        ];
        let mut process = SnapshotterProcess {
            service: Service::new(args, dir.join("snapshotter.log")),
            socket,
        };
        process.launch();
        process
    }

    fn launch(&mut self) {
        let socket = self.socket.clone();
        self.service
            .launch(|| std::os::unix::net::UnixStream::connect(&socket).is_ok());
    }

    /// `kill -9`, as a crash would.
    fn kill(&mut self) {
        self.service.kill();
    }

    pub fn log(&self) -> String {
        self.service.log()
    }
}

/// A store, its snapshotter and a containerd using it; torn down in the right order.
struct Setup {
    containerd: Containerd,
    snapshotter: SnapshotterProcess,
    lazy: Lazy,
}

impl Setup {
    fn new(kind: &str, mode: &'static str) -> Setup {
        let lazy = Lazy::with_mode(kind, mode);
        std::fs::create_dir_all(lazy.root()).unwrap();
        let snapshotter = SnapshotterProcess::start(&lazy);
        let containerd = Containerd::start(&snapshotter.socket);
        Setup {
            containerd,
            snapshotter,
            lazy,
        }
    }

    fn rpull(&self, image: &str) {
        self.containerd.ctr_remote_ok(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "lazylayer",
            image,
        ]);
    }

    /// `ctr run --rm` of `command` in `image`; its stdout.
    fn run(&self, image: &str, id: &str, command: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "lazylayer", image, id];
        args.extend_from_slice(command);
        self.containerd.ctr_ok(&args)
    }

    /// The snapshotter's snapshots: (name, parent, kind).
    fn snapshots(&self) -> Vec<(String, String, String)> {
        self.containerd
            .ctr_ok(&["snapshots", "--snapshotter", "lazylayer", "ls"])
            .lines()
            .skip(1)
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    [key, kind] => (key.to_string(), String::new(), kind.to_string()),
                    [key, parent, kind] => (key.to_string(), parent.to_string(), kind.to_string()),
                    _ => panic!("unexpected snapshot line {line:?}"),
                }
            })
            .collect()
    }

    /// The committed snapshot of the image's top layer (the one no other has as parent).
    fn top_snapshot(&self) -> String {
        self.top_snapshot_besides(&[])
    }

    /// The committed snapshot nothing stands on that is not among `earlier` (the top of the
    /// image pulled since `earlier` was listed: an earlier image's top has no child either).
    fn top_snapshot_besides(&self, earlier: &[(String, String, String)]) -> String {
        let all = self.snapshots();
        all.iter()
            .find(|(name, _, kind)| {
                kind == "Committed"
                    && !all.iter().any(|(_, parent, _)| parent == name)
                    && !earlier.iter().any(|(old, _, _)| old == name)
            })
            .unwrap_or_else(|| panic!("no top snapshot among {all:?}"))
            .0
            .clone()
    }

    /// Mounts a read-only view of the snapshot `parent` (through the snapshotter's View and
    /// the mounts it answers) at a new directory; unmounted by the returned guard.
    ///
    /// `ctr snapshots view` takes no lease, so containerd's garbage collector (run after the
    /// lease of a pull ends) may remove the view at any time: the view is labelled a GC root
    /// at once, and made again if the collector took it before the label.
    fn view(&self, key: &str, parent: &str) -> ViewMount {
        let mut attempts = 0;
        let json = loop {
            attempts += 1;
            let json = self.containerd.ctr_ok(&[
                "snapshots",
                "--snapshotter",
                "lazylayer",
                "view",
                "--mounts",
                key,
                parent,
            ]);
            let labelled = self.containerd.ctr(&[
                "snapshots",
                "--snapshotter",
                "lazylayer",
                "label",
                key,
                "containerd.io/gc.root=e2e",
            ]);
            if labelled.status.success() {
                break json;
            }
            assert!(
                attempts < 5,
                "labelling view {key}: {}",
                String::from_utf8_lossy(&labelled.stderr)
            );
        };
        let mounts: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mount = &mounts.as_array().unwrap()[0];
        let target = self.lazy.fs.dir.path().join(format!("view-{key}"));
        std::fs::create_dir_all(&target).unwrap();
        let options: Vec<&str> = mount["Options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        let source = mount["Source"].as_str().unwrap();
        match mount["Type"].as_str().unwrap() {
            "bind" => sh(&format!(
                "mount --rbind -o ro {source} {}",
                target.display()
            )),
            "overlay" => sh(&format!(
                "mount -t overlay overlay -o {} {}",
                options.join(","),
                target.display()
            )),
            other => panic!("unexpected mount type {other}"),
        }
        ViewMount { target }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.containerd.remove_containers();
    }
}

struct ViewMount {
    target: PathBuf,
}

impl Drop for ViewMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).status();
    }
}

pub fn require_containerd(test: &str) -> bool {
    if !lazylayer_testkit::require_root(test) {
        return false;
    }
    for tool in ["containerd", "ctr", "ctr-remote", "runc"] {
        lazylayer_testkit::require_tool(tool);
    }
    true
}

/// Whether containerd's content store holds any of `tag`'s layer blobs.
pub fn holds_layer_blobs(containerd: &Containerd, namespace: &str, tag: &str) -> Vec<String> {
    let content = containerd.content_digests_in(namespace);
    layer_hexes(tag)
        .into_iter()
        .filter(|hex| content.iter().any(|d| d.ends_with(hex.as_str())))
        .collect()
}

/// The size column of `ctr snapshots usage` (e.g. `12.5 MiB`), in bytes.
fn usage_bytes(output: &str) -> u64 {
    let line = output.lines().nth(1).unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let number: f64 = words
        .get(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::MAX);
    let unit = match words.get(2).copied().unwrap_or("") {
        "B" => 1.0,
        "kB" | "KiB" => 1024.0,
        "MB" | "MiB" => 1048576.0,
        "GB" | "GiB" => 1073741824.0,
        other => panic!("unexpected unit {other:?} in {output:?}"),
    };
    (number * unit) as u64
}

/// rpull + run through containerd with the layers lazy: containerd downloads no layer blob,
/// the container reads the image, and a view of each image equals the extraction.
fn rpull_runs_lazily_without_layer_downloads(kind: &str, mode: &'static str) {
    let registry = indexed_registry();
    let mut setup = Setup::new(kind, mode);
    // No background population: a file the daemon fills shows the fill's mtime until its
    // times are set again, which a tree walk could catch (the lazy tests do the same).
    setup.lazy.serve(&["--background-rate", "1"]);
    for (tag, name) in [
        ("bookworm", "test/debian:bookworm"),
        ("layers", "test/layers:latest"),
    ] {
        let image = format!("{registry}/{name}");
        let earlier = setup.snapshots();
        setup.rpull(&image);
        assert_eq!(
            holds_layer_blobs(&setup.containerd, NAMESPACE, tag),
            Vec::<String>::new(),
            "containerd downloaded layer blobs of {image}"
        );
        let top = setup.top_snapshot_besides(&earlier);
        if tag == "bookworm" {
            // Usage counts what the layer holds on disk: unfilled placeholders hold nothing.
            let usage = setup.containerd.ctr_ok(&[
                "snapshots",
                "--snapshotter",
                "lazylayer",
                "usage",
                &top,
            ]);
            let bytes = usage_bytes(&usage);
            assert!(
                bytes < 64 << 20,
                "a lazy layer of 200 MiB uses {bytes} bytes: {usage}"
            );
        }
        let view = setup.view(&format!("view-{tag}"), &top);
        let reference = Reference::new(tag);
        assert_same_tree(&reference.path(), &view.target);
        drop(view);
        let _ = setup.containerd.ctr(&[
            "snapshots",
            "--snapshotter",
            "lazylayer",
            "rm",
            &format!("view-{tag}"),
        ]);
    }
    let image = format!("{registry}/test/debian:bookworm");
    let out = setup.run(&image, "c1", &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");
    let status = setup.lazy.status();
    for layer in status["layers"].as_array().unwrap() {
        assert_eq!(layer["mode"], mode, "{status}");
    }
    // Every layer snapshot stands for a lazy layer.
    for (name, _, kind) in setup.snapshots() {
        assert_eq!(kind, "Committed", "{name}");
        let info =
            setup
                .containerd
                .ctr_ok(&["snapshots", "--snapshotter", "lazylayer", "info", &name]);
        assert!(
            info.contains("containerd.io/snapshot/lazylayer.layer"),
            "{name}: {info}"
        );
    }
}

mod rpull_runs_lazily_without_layer_downloads {
    #[test]
    fn ext4() {
        if super::require_containerd("containerd::rpull_runs_lazily::ext4") {
            super::rpull_runs_lazily_without_layer_downloads("ext4", "fanotify");
        }
    }

    #[test]
    fn fuse() {
        if super::require_containerd("containerd::rpull_runs_lazily::fuse") {
            super::rpull_runs_lazily_without_layer_downloads("ext4", "fuse");
        }
    }
}

/// eStargz and zstd:chunked images (made by `ctr-remote image convert`) need no pushed index:
/// the snapshotter indexes their layers from the table of contents, containerd downloads no
/// layer blob, and a container runs while the layer is lazy, having fetched a small part of it.
#[test]
fn chunked_images_rpull_lazily_without_an_index() {
    if !require_containerd("containerd::chunked_images_rpull_lazily_without_an_index") {
        return;
    }
    let host = crate::formats::chunked_registry();
    let mut setup = Setup::new("ext4", "fanotify");
    // Background population held back, so the layer is still lazy when the container ran.
    setup.lazy.serve(&["--background-rate", "1"]);
    for (i, copy) in ["test/debian:esgz", "test/debian:zchunked"]
        .iter()
        .enumerate()
    {
        let image = format!("{host}/{copy}");
        let layer = crate::formats::manifest(&host, copy)["layers"][0].clone();
        let (digest, size) = (
            layer["digest"].as_str().unwrap().to_string(),
            layer["size"].as_u64().unwrap(),
        );
        setup.rpull(&image);
        let content = setup.containerd.content_digests_in(NAMESPACE);
        assert!(
            !content.iter().any(|d| d == &digest),
            "containerd downloaded the layer {digest} of {copy}: {content:?}"
        );
        let out = setup.run(
            &image,
            &format!("chunked{i}"),
            &["cat", "/etc/debian_version"],
        );
        assert!(out.starts_with("12."), "{copy}: {out:?}");
        let status = setup.lazy.status();
        let shown = status["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["digest"] == digest.as_str())
            .unwrap_or_else(|| panic!("{digest} of {copy} is not served: {status}"));
        assert_eq!(shown["phase"], "lazy", "{status}");
        assert!(
            shown["bytes_fetched"].as_u64().unwrap() * 10 < size,
            "{status}"
        );
    }
}

/// An image with no lazy index is downloaded and unpacked by containerd into ordinary
/// snapshots (and so is every image `ctr image pull` unpacks): it runs, and equals the
/// extraction.
#[test]
fn images_without_an_index_are_unpacked_by_containerd() {
    if !require_containerd("containerd::images_without_an_index_are_unpacked_by_containerd") {
        return;
    }
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    let image = format!("{}/test/plain:layers", registry.host());
    let debian = format!("{}/test/plain:bookworm", registry.host());
    for (tag, to) in [("layers", &image), ("bookworm", &debian)] {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout_dir().display()),
            &format!("docker://{to}"),
            &[],
        );
    }
    let setup = Setup::new("ext4", "fanotify");
    setup.rpull(&image);
    assert_eq!(
        holds_layer_blobs(&setup.containerd, NAMESPACE, "layers").len(),
        3,
        "containerd should have downloaded the layers itself"
    );
    let log = setup.snapshotter.log();
    assert!(log.contains("has no usable lazy index"), "{log}");
    let top = setup.top_snapshot();
    let view = setup.view("view-plain", &top);
    assert_same_tree(&Reference::new("layers").path(), &view.target);
    drop(view);
    setup.rpull(&debian);
    let out = setup.run(&debian, "c1", &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");
    // Nothing lazy was made for it.
    let layers = setup.lazy.root().join("layers");
    assert!(
        !layers.exists() || walk(&layers).iter().all(|p| !p.ends_with("fs")),
        "lazy layers were made for an image without an index"
    );
    // `ctr image pull` (no labels at all) unpacks through the same snapshotter.
    let debian = format!("{}/test/debian:bookworm", indexed_registry());
    setup.containerd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazylayer",
        &debian,
    ]);
    let out = setup.run(&debian, "c2", &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");
}

/// The snapshotter killed with SIGKILL while a container runs: the next snapshotter serves
/// the same snapshots and new containers start; both daemon processes killed after that: the
/// snapshotter's keeper and guardian keep the container's readers from zeros; containerd
/// restarted keeps the snapshots too.
#[test]
fn snapshotter_and_containerd_restarts_keep_containers_and_snapshots() {
    if !require_containerd("containerd::snapshotter_and_containerd_restarts") {
        return;
    }
    let registry = indexed_registry();
    let image = format!("{registry}/test/debian:bookworm");
    let mut setup = Setup::new("ext4", "fanotify");
    // Slow background population, so that most of the layer is still lazy when the daemon
    // is killed.
    setup.lazy.serve(&["--background-rate", "100000"]);
    setup.rpull(&image);
    setup.containerd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "lazylayer",
        &image,
        "long",
        "sleep",
        "600",
    ]);
    let before = setup.snapshots();
    setup.snapshotter.kill();
    setup.snapshotter.launch();
    // containerd dials again with a backoff of up to 3 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !setup
        .containerd
        .ctr(&["snapshots", "--snapshotter", "lazylayer", "ls"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "containerd did not reconnect");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(setup.snapshots(), before, "{}", setup.snapshotter.log());
    let out = setup.run(&image, "after-kill", &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");

    // The new snapshotter keeps the daemon's fanotify group...
    let keepers = setup.lazy.root().join("keepers");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_dir(&keepers)
        .map(|mut l| l.any(|e| e.unwrap().path().extension().is_some_and(|x| x == "sock")))
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "no keeper: {}",
            setup.snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...so killing both daemon processes leaves readers waiting for the next daemon, which
    // the snapshotter starts.
    lazylayer_testkit::daemon::kill_from_status(&setup.lazy.status());
    if let Some(mut serve) = setup.lazy.serve.take() {
        let _ = serve.wait();
    }
    let reference = Reference::new("bookworm");
    let files = [
        "usr/bin/perl",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/share/doc/bash/copyright",
        "etc/passwd",
    ];
    let command = format!("cd / && sha256sum {}", files.join(" "));
    let sums = setup.containerd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "sum",
        "long",
        "sh",
        "-c",
        &command,
    ]);
    assert_eq!(sums.lines().count(), files.len(), "{sums}");
    for line in sums.lines() {
        let (sum, path) = line.split_once("  ").unwrap();
        assert_eq!(
            sum,
            sha256_of(&reference.path().join(path)),
            "{path} read wrong through the running container"
        );
    }

    setup.containerd.remove_containers();
    setup.containerd.restart();
    let committed: Vec<_> = before.into_iter().filter(|s| s.2 == "Committed").collect();
    assert_eq!(setup.snapshots(), committed);
    let out = setup.run(&image, "after-restart", &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");
    assert_eq!(
        holds_layer_blobs(&setup.containerd, NAMESPACE, "bookworm").len(),
        0
    );
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex_of(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removing the image in containerd releases its snapshots, and the snapshotter's cleanup
/// removes the layers from the store: nothing is left behind.
#[test]
fn removing_the_image_leaves_nothing_behind() {
    if !require_containerd("containerd::removing_the_image_leaves_nothing_behind") {
        return;
    }
    let registry = indexed_registry();
    let image = format!("{registry}/test/layers:latest");
    let setup = Setup::new("ext4", "fanotify");
    setup.rpull(&image);
    // A container's writable snapshot (the image has no program to run).
    setup.containerd.ctr_ok(&[
        "containers",
        "create",
        "--snapshotter",
        "lazylayer",
        &image,
        "c1",
    ]);
    assert_eq!(setup.snapshots().len(), 4, "{:?}", setup.snapshots());
    setup.containerd.ctr_ok(&["containers", "delete", "c1"]);
    setup.lazy.ll(&["detach", "--wait", &image]);
    // The snapshots hold the image and its layers against lazylayer's own rmi and gc.
    let root = setup.lazy.root_arg();
    let refused = run(&["--root", &root, "rmi", &image]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("in use by containerd"),
        "{said}"
    );
    setup.lazy.ll(&["gc"]);
    let layers = std::fs::read_dir(setup.lazy.root().join("layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(layers, 3, "gc removed layers containerd's snapshots use");
    let top = setup.top_snapshot();
    let view = setup.view("after-gc", &top);
    assert!(
        std::fs::read_dir(&view.target).unwrap().count() > 0,
        "the image's tree is still whole after gc"
    );
    drop(view);
    setup
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", "lazylayer", "rm", "after-gc"]);
    setup.containerd.ctr_ok(&["image", "rm", "--sync", &image]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snapshots = setup.snapshots();
        let layers = std::fs::read_dir(setup.lazy.root().join("layers/sha256"))
            .map(|l| l.count())
            .unwrap_or(0);
        let dirs = std::fs::read_dir(setup.lazy.root().join("snapshotter/snapshots"))
            .unwrap()
            .count();
        let images = std::fs::read_dir(setup.lazy.root().join("images"))
            .map(|l| l.count())
            .unwrap_or(0);
        if snapshots.is_empty() && layers == 0 && dirs == 0 && images == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: snapshots {snapshots:?}, {layers} layers, {dirs} snapshot \
             directories, {images} image records\n{}",
            setup.snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An image of 60 layers (the Debian layer and 59 small ones, added by umoci): containerd
/// mounts its container with every layer a lower, within the one page mount(2) takes for
/// options, and the container sees each layer's file.
#[test]
fn a_sixty_layer_image_runs() {
    if !require_containerd("containerd::a_sixty_layer_image_runs") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("oci");
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("oci:{}:many", layout.display()),
        &[],
    );
    for i in 1..60 {
        let dir = scratch.path().join(format!("l{i}"));
        std::fs::create_dir_all(dir.join("layers")).unwrap();
        std::fs::write(
            dir.join("layers").join(format!("{i}")),
            format!("layer {i}\n"),
        )
        .unwrap();
        let tar = scratch.path().join(format!("l{i}.tar"));
        sh(&format!(
            "tar -C {} -cf {} layers && umoci raw add-layer --image {}:many {}",
            dir.display(),
            tar.display(),
            layout.display(),
            tar.display()
        ));
    }
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    push_indexed_from(&layout, "many", &registry.host(), "test/many:layers");
    let image = format!("{}/test/many:layers", registry.host());
    let setup = Setup::new("ext4", "fanotify");
    setup.rpull(&image);
    assert_eq!(setup.snapshots().len(), 60);
    let out = setup.run(
        &image,
        "many",
        &["sh", "-c", "cat /layers/* | wc -l; cat /layers/59"],
    );
    assert_eq!(out, "59\nlayer 59\n");
}
