//! lazylayer as podman's additional layer store: a private podman (Debian's 4.3, its own
//! storage.conf naming `lazylayer layerstore`'s mount) runs images from the shared registry,
//! reached through a proxy that logs every request, so that a whole-blob download by podman
//! (a GET of a layer blob without a Range header: lazylayer's own reads are ranged) is seen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::podman::Podman;
use lazylayer_testkit::proxy::{FaultProxy, Shaping};

use crate::common::*;

/// A `lazylayer layerstore` process serving a store at a mountpoint.
struct LayerStoreProcess {
    service: Service,
    mountpoint: PathBuf,
}

impl LayerStoreProcess {
    fn start(lazy: &Lazy) -> LayerStoreProcess {
        let dir = lazy.fs.dir.path();
        let mountpoint = dir.join("layerstore");
        let args = vec![
            "--root".to_string(),
            lazy.root_arg(),
            "layerstore".to_string(),
            "--mode".to_string(),
            lazy.mode.to_string(),
            mountpoint.display().to_string(),
        ];
        let mut process = LayerStoreProcess {
            service: Service::new(args, dir.join("layerstore.log")),
            mountpoint,
        };
        process.launch();
        process
    }

    fn launch(&mut self) {
        let mountpoint = self.mountpoint.clone();
        // Mounted and answering (a dead mount left by a killed store answers ENOTCONN).
        self.service.launch(|| {
            lazylayer_testkit::is_mounted(&mountpoint) && std::fs::metadata(&mountpoint).is_ok()
        });
    }

    /// `kill -9`, as a crash would: the mount is left, dead.
    fn kill(&mut self) {
        self.service.kill();
    }

    fn log(&self) -> String {
        self.service.log()
    }
}

impl Drop for LayerStoreProcess {
    fn drop(&mut self) {
        self.service.kill_gently();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// podman over a lazylayer store and its layer store, with the registry behind a logging
/// proxy; torn down podman first (its `rmi` ends the store's uses), then the store.
struct Setup {
    podman: Podman,
    store: LayerStoreProcess,
    lazy: Lazy,
    proxy: FaultProxy,
}

impl Setup {
    /// With `slow_fill`, the daemon is started first with (almost) no background population:
    /// a file the daemon fills shows the fill's mtime until its times are set again, which a
    /// tree walk could catch (the lazy tests do the same). Otherwise the layer store starts
    /// the daemon when it pulls, and the daemon leaves once nothing is lazy.
    fn new(mode: &'static str, slow_fill: bool) -> Setup {
        let proxy =
            FaultProxy::start(indexed_registry().parse().unwrap(), Shaping::default()).unwrap();
        let mut lazy = Lazy::with_mode("ext4", mode);
        if slow_fill {
            lazy.serve(&["--background-rate", "1"]);
        } else {
            std::fs::create_dir_all(lazy.root()).unwrap();
        }
        let store = LayerStoreProcess::start(&lazy);
        let podman = Podman::new(Some(&store.mountpoint));
        Setup {
            podman,
            store,
            lazy,
            proxy,
        }
    }

    /// `name` (REPOSITORY:TAG) in the registry, through the proxy.
    fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.proxy.host())
    }

    /// The layer blobs (hex) podman fetched whole: GETs without a Range header.
    fn whole_downloads(&self, hexes: &[String]) -> Vec<String> {
        self.proxy
            .exchanges()
            .iter()
            .filter(|e| e.method == "GET" && e.range.is_none())
            .filter_map(|e| hexes.iter().find(|hex| e.target.contains(hex.as_str())))
            .cloned()
            .collect()
    }

    /// Layers podman took from the additional layer store (their `diff` is a symlink there).
    fn layers_from_the_store(&self) -> Vec<PathBuf> {
        let overlay = self.podman.graphroot().join("overlay");
        let mut layers: Vec<PathBuf> = std::fs::read_dir(&overlay)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|dir| dir.join("additionallayer").exists())
            .collect();
        for layer in &layers {
            let target = std::fs::read_link(layer.join("diff")).unwrap();
            assert!(
                target.starts_with(&self.store.mountpoint),
                "{} points at {}",
                layer.display(),
                target.display()
            );
        }
        layers.sort();
        layers
    }

    /// The store's use counts file.
    fn uses(&self) -> serde_json::Value {
        let path = self.lazy.root().join("layerstore/uses.json");
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }
}

pub fn require_podman(test: &str) -> bool {
    if !lazylayer_testkit::require_root(test) {
        return false;
    }
    for tool in ["podman", "runc", "umoci", "skopeo"] {
        lazylayer_testkit::require_tool(tool);
    }
    true
}

/// `podman run` takes every layer from the store: podman downloads no layer blob, the
/// container reads the image, `podman image mount` shows the extraction, and `podman save`
/// writes layers that hash to the config's diff IDs (the store's `blob` and `info`).
fn podman_runs_lazily_without_layer_downloads(mode: &'static str) {
    let setup = Setup::new(mode, true);
    let image = setup.image("test/debian:bookworm");
    // Two podmans (two graph roots) on one layer store, started together on an image not
    // pulled yet: one lazy pull serves both.
    let second = Podman::new(Some(&setup.store.mountpoint));
    let (out, second_out) = std::thread::scope(|scope| {
        let first = scope.spawn(|| setup.podman.run(&image, &["cat", "/etc/debian_version"]));
        let other = scope.spawn(|| second.run(&image, &["cat", "/etc/debian_version"]));
        (first.join().unwrap(), other.join().unwrap())
    });
    assert!(out.starts_with("12."), "{out:?}");
    assert_eq!(out, second_out);
    drop(second);
    assert!(
        setup
            .proxy
            .exchanges()
            .iter()
            .any(|e| e.target.contains("/manifests/")),
        "podman did not go through the proxy"
    );
    let hexes = layer_hexes("bookworm");
    assert_eq!(
        setup.whole_downloads(&hexes),
        Vec::<String>::new(),
        "layer blobs downloaded whole"
    );
    assert_eq!(setup.layers_from_the_store().len(), 1);
    let status = setup.lazy.status();
    for layer in status["layers"].as_array().unwrap() {
        assert_eq!(layer["mode"], mode, "{status}");
    }

    let mounted = setup.podman.ok(&["image", "mount", &image]);
    let reference = Reference::new("bookworm");
    assert_same_tree(&reference.path(), Path::new(mounted.trim()));
    setup.podman.ok(&["image", "unmount", &image]);

    // podman save reads each layer's `blob`, decompressed as `info` says, `diff-size` bytes.
    let saved = setup.lazy.fs.dir.path().join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    let archive = saved.join("image.tar");
    setup.podman.ok(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        archive.to_str().unwrap(),
        &image,
    ]);
    sh(&format!(
        "tar -C {} -xf {}",
        saved.display(),
        archive.display()
    ));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(saved.join("manifest.json")).unwrap()).unwrap();
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(saved.join(manifest[0]["Config"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layers: Vec<String> = manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| sha256_file(&saved.join(l.as_str().unwrap())))
        .collect();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers, diff_ids);

    // Once the layer is detached, `diff` is the plain layer directory (no FUSE mount of the
    // daemon left in the path) and new containers start from it.
    setup.lazy.ll(&["detach", "--wait", &image]);
    let diff = setup
        .store
        .mountpoint
        .join(lazylayer_layerstore::names::encode_reference(&image))
        .join(format!("sha256:{}", hexes[0]))
        .join("diff");
    assert_eq!(
        std::fs::read_link(&diff).unwrap(),
        setup.lazy.layer_fs(&hexes[0])
    );
    let out = setup.podman.run(&image, &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");
}

fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut hasher).unwrap();
    format!("sha256:{:x}", hasher.finalize())
}

mod podman_runs_lazily_without_layer_downloads {
    #[test]
    fn ext4() {
        if super::require_podman("podman::podman_runs_lazily::ext4") {
            super::podman_runs_lazily_without_layer_downloads("fanotify");
        }
    }

    #[test]
    fn fuse() {
        if super::require_podman("podman::podman_runs_lazily::fuse") {
            super::podman_runs_lazily_without_layer_downloads("fuse");
        }
    }
}

/// Pushes (indexed) an image of the Debian image plus one layer made by umoci, as `name`.
fn push_debian_plus_one_layer(name: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("oci");
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("oci:{}:app", layout.display()),
        &[],
    );
    let content = scratch.path().join("content");
    std::fs::create_dir_all(content.join("app")).unwrap();
    std::fs::write(content.join("app/hello"), "hello from the app layer\n").unwrap();
    let tar = scratch.path().join("app.tar");
    sh(&format!(
        "tar -C {} -cf {} app && umoci raw add-layer --image {}:app {}",
        content.display(),
        tar.display(),
        layout.display(),
        tar.display()
    ));
    push_indexed_from(&layout, "app", &indexed_registry(), name);
}

/// Two images sharing the Debian layer: one lazy layer in lazylayer's store and one layer in
/// podman's serve both; while podman has them `lazylayer rmi` refuses; `podman rmi` of both
/// and `lazylayer gc` leave nothing behind.
#[test]
fn images_sharing_a_layer_share_it_and_nothing_is_left_behind() {
    if !require_podman("podman::images_sharing_a_layer_share_it") {
        return;
    }
    push_debian_plus_one_layer("test/podman-app:1");
    let setup = Setup::new("fanotify", false);
    let debian = setup.image("test/debian:bookworm");
    let app = setup.image("test/podman-app:1");
    let out = setup.podman.run(&debian, &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}");
    let out = setup
        .podman
        .run(&app, &["sh", "-c", "cat /app/hello /etc/debian_version"]);
    assert!(out.starts_with("hello from the app layer\n12."), "{out:?}");
    let hexes = layer_digests(&setup.lazy, &app);
    assert_eq!(hexes.len(), 2);
    assert_eq!(setup.whole_downloads(&hexes), Vec::<String>::new());
    // One Debian layer in each store.
    assert_eq!(setup.lazy.status()["layers"].as_array().unwrap().len(), 2);
    assert_eq!(setup.layers_from_the_store().len(), 2);

    // Held while podman has them.
    let refused = run(&["--root", &setup.lazy.root_arg(), "rmi", &debian]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("podman"), "{stderr}");

    setup.podman.ok(&["rmi", &app]);
    // The Debian layer is still podman's (the Debian image has it).
    let uses = setup.uses();
    assert!(
        uses["paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["uses"] != 0),
        "{uses}"
    );
    setup.podman.ok(&["rmi", &debian]);
    let uses = setup.uses();
    assert_eq!(uses["paths"], serde_json::json!([]), "{uses}");
    assert_eq!(uses["owned"], serde_json::json!([]), "{uses}");
    // gc keeps a layer the daemon is filling; the daemon leaves once nothing is lazy.
    let root = setup.lazy.root();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gc = run(&["--root", &setup.lazy.root_arg(), "gc"]);
        assert!(gc.status.success());
        let left: Vec<_> = ["images", "layers/sha256", "indexes/sha256"]
            .iter()
            .flat_map(|dir| {
                std::fs::read_dir(root.join(dir))
                    .map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {left:?}; gc said: {}",
            String::from_utf8_lossy(&gc.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The layer store killed with SIGKILL while a container runs: the container reads on (its
/// layers are the store's directories, served by the daemon); a new store on the same
/// mountpoint serves new containers, and `podman rmi` after the restart still ends the uses
/// counted before it.
#[test]
fn the_store_restarted_serves_on() {
    if !require_podman("podman::the_store_restarted_serves_on") {
        return;
    }
    let mut setup = Setup::new("fanotify", false);
    let image = setup.image("test/debian:bookworm");
    let mut args = vec!["run", "-d"];
    args.extend(Podman::run_args());
    args.extend([image.as_str(), "sleep", "600"]);
    let container = setup.podman.ok(&args).trim().to_string();
    setup.store.kill();
    setup.store.launch();
    let reference = Reference::new("bookworm");
    for file in [
        "usr/bin/perl",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "etc/passwd",
    ] {
        let inside = setup
            .podman
            .ok(&["exec", &container, "sha256sum", &format!("/{file}")]);
        let outside = Command::new("sha256sum")
            .arg(reference.path().join(file))
            .output()
            .unwrap();
        assert_eq!(
            inside.split_whitespace().next(),
            String::from_utf8_lossy(&outside.stdout)
                .split_whitespace()
                .next(),
            "{file}"
        );
    }
    let out = setup.podman.run(&image, &["cat", "/etc/debian_version"]);
    assert!(out.starts_with("12."), "{out:?}\n{}", setup.store.log());
    setup
        .podman
        .ok(&["rm", "--force", "--time", "0", &container]);
    setup.podman.ok(&["rmi", &image]);
    let uses = setup.uses();
    assert_eq!(uses["paths"], serde_json::json!([]), "{uses}");
    assert!(
        setup
            .lazy
            .root()
            .join("images")
            .read_dir()
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains("held-by")),
        "an image is still held"
    );
}

/// An image without a lazy index is "not here" to podman, which downloads and stores it as
/// usual: it equals the extraction, and nothing lazy is made for it.
/// eStargz (made by `ctr-remote image convert`) and zstd:chunked (made by skopeo) images need
/// no pushed index: the layer store indexes their layers from the table of contents, podman
/// downloads no layer blob, runs them, and each mounted image equals the GNU tar extraction of
/// its layer.
#[test]
fn chunked_images_run_lazily_without_an_index() {
    if !require_podman("podman::chunked_images_run_lazily_without_an_index") {
        return;
    }
    let host = crate::formats::chunked_registry();
    let setup = Setup::new("fanotify", true);
    for (i, copy) in ["test/debian:esgz", crate::formats::SKOPEO_COPY]
        .into_iter()
        .enumerate()
    {
        let image = setup.image(copy);
        let out = setup.podman.run(&image, &["cat", "/etc/debian_version"]);
        assert!(out.starts_with("12."), "{copy}: {out:?}");
        let blobs = tempfile::tempdir().unwrap();
        let layers = crate::formats::download_layers(&host, copy, blobs.path());
        let hexes: Vec<String> = layers
            .iter()
            .map(|b| b.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            setup.whole_downloads(&hexes),
            Vec::<String>::new(),
            "{copy}: layer blobs downloaded whole"
        );
        assert_eq!(setup.layers_from_the_store().len(), i + 1, "{copy}");
        let status = setup.lazy.status();
        let shown = status["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["digest"] == format!("sha256:{}", hexes[0]))
            .unwrap_or_else(|| panic!("{copy} is not served: {status}"));
        assert_eq!(shown["phase"], "lazy", "{status}");
        let mounted = setup.podman.ok(&["image", "mount", &image]);
        let differences = lazylayer_testkit::tree_diff::diff_trees(
            &Reference::of_blobs(&layers).path(),
            Path::new(mounted.trim()),
            crate::formats::dir_times_comparable(copy),
        );
        assert!(differences.is_empty(), "{copy}: {differences:#?}");
        setup.podman.ok(&["image", "unmount", &image]);
    }
}

#[test]
fn images_without_an_index_are_downloaded_by_podman() {
    if !require_podman("podman::images_without_an_index_are_downloaded_by_podman") {
        return;
    }
    let name = "test/podman-plain:layers";
    skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{}/{name}", indexed_registry()),
        &[],
    );
    let setup = Setup::new("fanotify", false);
    let image = setup.image(name);
    setup.podman.ok(&["pull", "--tls-verify=false", &image]);
    let hexes = layer_hexes("layers");
    let mut downloaded = setup.whole_downloads(&hexes);
    downloaded.sort();
    downloaded.dedup();
    assert_eq!(
        downloaded.len(),
        3,
        "podman should have downloaded the layers"
    );
    assert_eq!(setup.layers_from_the_store(), Vec::<PathBuf>::new());
    let log = setup.store.log();
    assert!(log.contains("not serving"), "{log}");
    let status = setup.lazy.status();
    assert_eq!(status["layers"], serde_json::json!([]), "{status}");
    let mounted = setup.podman.ok(&["image", "mount", &image]);
    assert_same_tree(&Reference::new("layers").path(), Path::new(mounted.trim()));
    setup.podman.ok(&["image", "unmount", &image]);
}

/// The layer store refuses a mountpoint where something else is mounted (it would hide it),
/// and one containers/storage cannot name.
#[test]
fn the_layer_store_refuses_mountpoints_it_must_not_use() {
    if !lazylayer_testkit::require_root("podman::the_layer_store_refuses_mountpoints") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let root = root.path().to_str().unwrap();
    let occupied = run(&["--root", root, "layerstore", "/proc"]);
    assert!(!occupied.status.success());
    let stderr = String::from_utf8_lossy(&occupied.stderr);
    assert!(
        stderr.contains("is a mountpoint already (proc)"),
        "{stderr}"
    );
    assert!(lazylayer_testkit::is_mounted(Path::new("/proc")));
    let unnameable = run(&["--root", root, "layerstore", "/tmp/a:b"]);
    assert!(!unnameable.status.success());
    let stderr = String::from_utf8_lossy(&unnameable.stderr);
    assert!(stderr.contains("':' or ','"), "{stderr}");
}
