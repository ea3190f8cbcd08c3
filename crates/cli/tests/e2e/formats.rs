//! Layer formats written for lazy reading, as other tools write them: eStargz and zstd:chunked
//! copies of the Debian test image, converted by stargz-snapshotter's `ctr-remote image
//! convert --estargz / --zstdchunked` in a private containerd, and by skopeo (containers/storage's
//! zstd:chunked), pushed to the shared registry. They run
//! lazily from their own table of contents (no `index --push`), in every frontend, equal the
//! GNU tar extraction of the converted blobs while lazy and after detach; a damaged chunk is
//! never served; a table of contents that does not match the manifest's annotation is refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use lazylayer_testkit::containerd::Containerd;
use lazylayer_testkit::fixtures::{shared_registry, skopeo_copy};
use lazylayer_testkit::proxy::{Fault, FaultProxy, Rule, Shaping};
use lazylayer_testkit::require_root;
use lazylayer_testkit::tree_diff::diff_trees;

use crate::common::{Lazy, Reference, all_detached, bytes_fetched, run, wait_for_status};

/// The copies of the test images: (source, copy, `ctr-remote image convert` flag). (`ctr-remote`
/// 0.12 cannot convert the multi-layer image: it fails on its sparse file.)
const CONVERTED: [(&str, &str, &str); 2] = [
    (SOURCE, "test/debian:esgz", "--estargz"),
    (SOURCE, "test/debian:zchunked", "--zstdchunked"),
];

/// The Debian image the copies are converted from: a tag of its own, which no `index --push`
/// of another test turns into an image index (the copies would then be image indexes too).
const SOURCE: &str = "test/debian-source:bookworm";

/// The shared registry with the converted copies pushed (converted once per test run).
pub fn chunked_registry() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let host = shared_registry().host();
        let unused = PathBuf::from("/nonexistent.sock");
        let containerd = Containerd::start_with(&[("unused", &unused)], None);
        // The eStargz copy puts perl before its prefetch landmark, as `ctr-remote image
        // optimize` would for a workload that runs it.
        let record = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(record.path(), format!(r#"{{"path":"{PRIORITIZED}"}}"#)).unwrap();
        let record = record.path().to_str().unwrap();
        skopeo_copy(
            &format!(
                "oci:{}:bookworm",
                lazylayer_testkit::fixtures::layout_dir().display()
            ),
            &format!("docker://{host}/{SOURCE}"),
            &[],
        );
        for (from, to, flag) in CONVERTED {
            let (from, to) = (format!("{host}/{from}"), format!("{host}/{to}"));
            containerd.ctr_remote_ok(&["image", "pull", "--plain-http", &from]);
            let mut args = vec!["image", "convert", flag, "--oci"];
            if flag == "--estargz" {
                args.extend(["--estargz-record-in", record]);
            }
            args.extend([from.as_str(), to.as_str()]);
            containerd.ctr_remote_ok(&args);
            containerd.ctr_remote_ok(&["image", "push", "--plain-http", &to]);
        }
        // containers/storage's own zstd:chunked writer, through skopeo.
        let plain = plain_debian_layout();
        skopeo_copy(
            &format!("oci:{}:plain", plain.path().display()),
            &format!("docker://{host}/{SKOPEO_COPY}"),
            &["--dest-compress-format", "zstd:chunked"],
        );
        host
    })
    .clone()
}

/// The file the eStargz copy prioritizes.
const PRIORITIZED: &str = "usr/bin/perl";

/// The zstd:chunked copy skopeo (containers/storage) writes.
pub const SKOPEO_COPY: &str = "test/debian:skopeo-zchunked";

/// Every chunked copy: the converted ones, then skopeo's.
fn copies() -> Vec<&'static str> {
    CONVERTED
        .iter()
        .map(|(_, copy, _)| *copy)
        .chain([SKOPEO_COPY])
        .collect()
}

/// An OCI layout of the Debian image with its layer uncompressed and ended by the two zero
/// blocks of a tar archive: skopeo 1.9 compresses an uncompressed layer to zstd:chunked, and
/// waits forever on a tar without them (umoci writes none).
fn plain_debian_layout() -> tempfile::TempDir {
    use sha2::Digest as _;
    let layout = tempfile::tempdir().unwrap();
    let blobs = layout.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = format!("{:x}", sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let gzipped = &crate::common::layer_blobs("bookworm")[0];
    let unzipped = Command::new("gzip")
        .arg("-dc")
        .arg(gzipped)
        .output()
        .unwrap();
    assert!(unzipped.status.success(), "gzip -dc {}", gzipped.display());
    let mut tar = unzipped.stdout;
    if tar.len() < 1024 || tar[tar.len() - 1024..].iter().any(|b| *b != 0) {
        tar.extend_from_slice(&[0; 1024]);
    }
    let (layer, layer_size) = put(&tar);
    let fixture = lazylayer_testkit::fixtures::layout_dir();
    let manifest_digest = crate::common::fixture_manifest_hex("bookworm");
    let read_json = |hex: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixture.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let original = read_json(&manifest_digest);
    let mut config = read_json(
        original["config"]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    config["rootfs"]["diff_ids"] = serde_json::json!([layer]);
    let (config, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer,
            "size": layer_size,
        }],
    });
    let (manifest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "plain"},
        }],
    });
    std::fs::write(
        layout.path().join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    layout
}

/// Whether directory times of `image`'s GNU tar extraction are the layer's. Not for the eStargz
/// copy: its prioritized file's parent directories come first in its tar and again later, and
/// GNU tar leaves a directory listed twice with the time of its extraction.
pub fn dir_times_comparable(image: &str) -> bool {
    !image.ends_with(":esgz")
}

fn curl(url: &str, accept: &str) -> Vec<u8> {
    let output = Command::new("curl")
        .args(["-fsS", "-H", &format!("Accept: {accept}"), url])
        .output()
        .expect("curl");
    assert!(
        output.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The manifest of `image` (`repository:tag`) in `host`.
pub fn manifest(host: &str, image: &str) -> serde_json::Value {
    let (repository, tag) = image.split_once(':').unwrap();
    serde_json::from_slice(&curl(
        &format!("http://{host}/v2/{repository}/manifests/{tag}"),
        OCI_MANIFEST,
    ))
    .unwrap()
}

/// The layer blobs of `image`, downloaded whole into `dir`, bottom first.
pub fn download_layers(host: &str, image: &str, dir: &Path) -> Vec<PathBuf> {
    let repository = image.split_once(':').unwrap().0;
    manifest(host, image)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            let digest = layer["digest"].as_str().unwrap();
            let annotations = &layer["annotations"];
            assert!(
                annotations["containerd.io/snapshot/stargz/toc.digest"].is_string()
                    || annotations["io.containers.zstd-chunked.manifest-checksum"].is_string(),
                "{image} has no table of contents: {layer}"
            );
            let path = dir.join(digest.trim_start_matches("sha256:"));
            std::fs::write(
                &path,
                curl(
                    &format!("http://{host}/v2/{repository}/blobs/{digest}"),
                    "*/*",
                ),
            )
            .unwrap();
            path
        })
        .collect()
}

fn chunked_images_run_lazily_and_detach_to_the_extraction(kind: &str, mode: &'static str) {
    let host = chunked_registry();
    let blobs = tempfile::tempdir().unwrap();
    let mut lazy = Lazy::with_mode(kind, mode);
    // Background population held back, so reads find the layers lazy.
    lazy.serve(&["--background-rate", "1"]);
    let mut views = Vec::new();
    for image in copies() {
        let layers = download_layers(&host, image, blobs.path());
        let size: u64 = layers
            .iter()
            .map(|b| std::fs::metadata(b).unwrap().len())
            .sum();
        let reference = Reference::of_blobs(&layers);
        let name = image.replace(['/', ':'], "-");
        // inspect says that the layer needs no index of ours.
        let inspected = lazy.ll(&["inspect", "--json", &format!("{host}/{image}")]);
        let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
        let format = inspected["layers"][0]["tableOfContents"].clone();
        let expected = if image.contains("esgz") {
            "eStargz"
        } else {
            "zstd:chunked"
        };
        assert_eq!(format, expected, "{image}: {inspected}");
        let before = bytes_fetched(&lazy.status());
        let pulled = lazy.ll(&["pull", "--mode", lazy.mode, &format!("{host}/{image}")]);
        let mnt = lazy.fs.path().join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mnt).unwrap();
        lazy.ll(&["mount", &format!("{host}/{image}"), mnt.to_str().unwrap()]);
        lazy.mounts.push(mnt.clone());
        let status = lazy.status();
        assert!(
            status["layers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["phase"] == "lazy"),
            "{pulled}\n{status}"
        );
        // Nothing was downloaded whole to index it: a few ranged reads of the table.
        let fetched = bytes_fetched(&status) - before;
        assert!(
            fetched * 10 < size,
            "{image}: {fetched} of {size} bytes fetched by the pull\n{pulled}"
        );
        let differences = diff_trees(&reference.path(), &mnt, dir_times_comparable(image));
        assert!(
            differences.is_empty(),
            "{kind} {mode} {image} (lazy): {:#?}",
            &differences[..differences.len().min(20)]
        );
        views.push((image, reference, mnt));
    }
    // `lazylayer run` starts a container on each while the layers are lazy.
    for (image, _, _) in &views {
        let out = lazy.ll(&[
            "run",
            &format!("{host}/{image}"),
            "--",
            "cat",
            "/etc/debian_version",
        ]);
        assert!(out.starts_with("12."), "{image}: {out:?}");
    }
    // Detach checks each layer against its tar stream and leaves plain directories.
    for (image, _, _) in &views {
        lazy.ll(&["detach", "--wait", &format!("{host}/{image}")]);
    }
    wait_for_status(&lazy, "the layers never detached", all_detached);
    for (image, reference, mnt) in &views {
        let differences = diff_trees(&reference.path(), mnt, dir_times_comparable(image));
        assert!(
            differences.is_empty(),
            "{kind} {mode} {image} (detached): {:#?}",
            &differences[..differences.len().min(20)]
        );
    }
}

on_every_store!(chunked_images_run_lazily_and_detach_to_the_extraction);

/// A registry that damages every chunk of the layer after the pull: a reader gets EIO, never
/// the damaged bytes, and never zeros.
#[test]
fn a_damaged_chunk_is_never_served() {
    if !require_root("a_damaged_chunk_is_never_served") {
        return;
    }
    let host = chunked_registry();
    for copy in copies() {
        let proxy = FaultProxy::start(host.parse().unwrap(), Shaping::default()).unwrap();
        let image = format!("{}/{copy}", proxy.host());
        let digest = manifest(&host, copy)["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let mut lazy = Lazy::new("ext4");
        lazy.serve(&["--background-rate", "1", "--fetch-deadline", "5"]);
        lazy.ll(&["pull", &image]);
        // From now on, a byte inside the compressed data of every ranged read is flipped.
        proxy.add_rule(
            Rule::new(Fault::CorruptAt { at: 40 })
                .on_path(&format!("/blobs/{digest}"))
                .always(),
        );
        let mnt = lazy.fs.path().join("mnt-debian");
        std::fs::create_dir_all(&mnt).unwrap();
        lazy.ll(&["mount", &image, mnt.to_str().unwrap()]);
        lazy.mounts.push(mnt.clone());
        // Not prioritized (perl is, and is fetched at pull), not a startup file, and near the
        // layer's end: the capped background's first run (fetched at once, with 1 MiB read
        // ahead, before the fault is set) can reach into usr/bin, so usr/bin/bash was read
        // whole in some runs.
        let read = std::fs::read(mnt.join("var/log/bootstrap.log"));
        assert_eq!(
            read.as_ref().err().and_then(|e| e.raw_os_error()),
            Some(libc::EIO),
            "{copy}: {:?}",
            read.map(|bytes| bytes.len())
        );
        assert!(proxy.faults_injected() > 0);
    }
}

/// A manifest whose annotation names another table of contents than the layer's: the pull is
/// refused and says why, and nothing is mounted from the lying table.
#[test]
fn a_table_of_contents_that_does_not_match_its_annotation_is_refused() {
    if !require_root("a_table_of_contents_that_does_not_match_its_annotation_is_refused") {
        return;
    }
    let host = chunked_registry();
    for (copy, annotation) in [
        (
            "test/debian:esgz",
            "containerd.io/snapshot/stargz/toc.digest",
        ),
        (
            "test/debian:zchunked",
            "io.containers.zstd-chunked.manifest-checksum",
        ),
        (SKOPEO_COPY, "io.containers.zstd-chunked.manifest-checksum"),
    ] {
        let mut lying = manifest(&host, copy);
        lying["layers"][0]["annotations"][annotation] =
            format!("sha256:{}", "ab".repeat(32)).into();
        let body = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(body.path(), serde_json::to_vec(&lying).unwrap()).unwrap();
        let tag = format!("{}-lying", copy.split_once(':').unwrap().1);
        let put = Command::new("curl")
            .args(["-fsS", "-X", "PUT", "-H"])
            .arg(format!("Content-Type: {OCI_MANIFEST}"))
            .arg("--data-binary")
            .arg(format!("@{}", body.path().display()))
            .arg(format!("http://{host}/v2/test/debian/manifests/{tag}"))
            .output()
            .unwrap();
        assert!(put.status.success(), "{put:?}");
        let lazy = Lazy::new("ext4");
        let pulled = run(&[
            "--root",
            &lazy.root_arg(),
            "pull",
            &format!("{host}/test/debian:{tag}"),
        ]);
        let stderr = String::from_utf8_lossy(&pulled.stderr);
        assert!(!pulled.status.success(), "{copy}: {stderr}");
        assert!(
            stderr.contains("table of contents") && stderr.contains("annotation"),
            "{copy}: {stderr}"
        );
    }
}

/// The files an eStargz layer puts before its prefetch landmark are fetched first, before any
/// reader asks, as stargz-snapshotter does: with the background held back, perl (the
/// prioritized file) is filled and a file of the same size that is not prioritized is not.
#[test]
fn prioritized_estargz_files_are_fetched_first() {
    use std::os::unix::fs::MetadataExt;
    if !require_root("prioritized_estargz_files_are_fetched_first") {
        return;
    }
    let host = chunked_registry();
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&["--background-rate", "1"]);
    let image = format!("{host}/test/debian:esgz");
    lazy.ll(&["pull", &image]);
    let digest = manifest(&host, "test/debian:esgz")["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let fs = lazy.layer_fs(digest.trim_start_matches("sha256:"));
    assert!(fs.join(".prefetch.landmark").exists(), "{}", fs.display());
    let filled = |path: &str| {
        std::fs::symlink_metadata(fs.join(path)).is_ok_and(|m| m.blocks() * 512 >= m.len())
    };
    wait_for_status(&lazy, "the prioritized file was never filled", |_| {
        filled(PRIORITIZED)
    });
    // Not prioritized, not a startup file, not read: still a placeholder.
    assert!(!filled("usr/bin/bash"), "the background was not held back");
}
