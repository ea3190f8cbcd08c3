//! A layer directory made from the index and filled file by file must equal the layer
//! extracted by GNU tar with whiteouts converted: content, modes with setuid/setgid/sticky,
//! owners, sub-second times, xattrs (user.* and security.capability), symlinks, hardlinks,
//! devices, fifos, whiteouts and opaque directories; also hardlinks whose target is replaced
//! later in the layer. And a tree the pull did not sync is made again after a machine crash.

use std::path::Path;
use std::sync::Arc;

use lazylayer_index::{BuildOptions, InflatedFor, build};
use lazylayer_source::{ImageReference, ImageSource, PlatformChoice, RegistryClient};
use lazylayer_store::verify::verify_layer;
use lazylayer_store::{LayerTree, Phase, Store};
use lazylayer_testkit::fixtures::{layout_dir, relinked_targets_tar};
use lazylayer_testkit::hostile::{Expect, HostileLayer, write_layout};
use lazylayer_testkit::require_root;
use lazylayer_testkit::tree_diff::{diff_trees, extract_layer};

#[tokio::test]
async fn populated_layers_equal_tar_extraction() {
    if !require_root("populated_layers_equal_tar_extraction") {
        return;
    }
    // Last, the multi-layer image again with every span streamed rather than held whole (what
    // a span too large for memory gets).
    for (tag, streamed) in [
        ("layers", false),
        ("layers-zstd", false),
        ("bookworm", false),
        ("layers", true),
    ] {
        populate_and_compare(&layout_dir(), tag, streamed).await;
    }
}

#[tokio::test]
async fn hardlinks_whose_target_is_replaced_populate_like_tar() {
    if !require_root("hardlinks_whose_target_is_replaced_populate_like_tar") {
        return;
    }
    // A layer GNU tar wrote in two passes: links first, then their targets replaced by a new
    // file, a directory and a symlink. The placeholders are links made in index order.
    let layout = tempfile::tempdir().unwrap();
    let layer = HostileLayer {
        name: "relinked",
        attack: "hardlinks that outlive their targets (not hostile: GNU tar --append)",
        tar: relinked_targets_tar(),
        expect: Expect::Contained,
    };
    write_layout(layout.path(), &[layer]).unwrap();
    populate_and_compare(layout.path(), "relinked", false).await;
}

/// Prepares every layer of `oci:LAYOUT:TAG` in a new store, fills every file, and compares the
/// layer directories with GNU tar's extraction of the blobs.
async fn populate_and_compare(layout: &Path, tag: &str, streamed: bool) {
    let client = RegistryClient::new(Default::default()).unwrap();
    let reference: ImageReference = format!("oci:{}:{tag}", layout.display()).parse().unwrap();
    let source = ImageSource::open(&reference, &client).unwrap();
    let image = source.resolve(&PlatformChoice::host()).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(root.path());
    for (i, blob) in image.layers.iter().enumerate() {
        let diff_id = &image.config_summary.rootfs.diff_ids[i];
        let index = Arc::new(
            build(&source, blob, Some(diff_id), BuildOptions::default())
                .await
                .unwrap(),
        );
        assert_eq!(
            store
                .prepare_layer(&index, lazylayer_store::FrontendMode::Fanotify)
                .unwrap(),
            Phase::Lazy
        );
        let layer = store.open_layer(index.clone(), source.clone()).unwrap();
        if streamed {
            layer.reader().set_large_span_output(0);
        }
        for file in layer.pending_files() {
            layer.populate(file, InflatedFor::Reader).await.unwrap();
        }
        layer.persist().unwrap();
        assert!(layer.pending_files().is_empty());
        let expected = tempfile::tempdir().unwrap();
        let blob_path = layout.join("blobs/sha256").join(blob.digest.hex());
        extract_layer(&blob_path, expected.path());
        let differences = diff_trees(expected.path(), &store.layer_fs(&blob.digest), true);
        assert!(
            differences.is_empty(),
            "{tag} layer {i}: {:#?}",
            &differences[..differences.len().min(20)]
        );
        // `lazylayer verify` agrees (hardlinks of symlinks included).
        let tree = LayerTree::open(&store.layer_fs(&blob.digest)).unwrap();
        let problems = verify_layer(&tree, &index, &|_| true);
        assert!(problems.is_empty(), "{tag} layer {i}: {problems:#?}");
        // The population record survives a reopen.
        drop(layer);
        let again = store.open_layer(index.clone(), source.clone()).unwrap();
        assert!(
            again.pending_files().is_empty(),
            "{tag} layer {i}: state was durable"
        );
        // Preparing again keeps the populated tree.
        assert_eq!(
            store
                .prepare_layer(&index, lazylayer_store::FrontendMode::Fanotify)
                .unwrap(),
            Phase::Lazy
        );
    }
}

/// The pull does not sync the tree it makes (the daemon's first persist does): its record names
/// the boot, and read in another boot, which is what a crash of the machine before that sync
/// leaves, the layer counts as half-made and the next pull makes it again. Once persisted, the
/// record no longer depends on the boot.
#[tokio::test]
async fn a_tree_not_synced_before_the_machine_stopped_is_made_again() {
    if !require_root("a_tree_not_synced_before_the_machine_stopped_is_made_again") {
        return;
    }
    let client = RegistryClient::new(Default::default()).unwrap();
    let reference: ImageReference = format!("oci:{}:bookworm", layout_dir().display())
        .parse()
        .unwrap();
    let source = ImageSource::open(&reference, &client).unwrap();
    let image = source.resolve(&PlatformChoice::host()).await.unwrap();
    let blob = &image.layers[0];
    let index = Arc::new(
        build(&source, blob, None, BuildOptions::default())
            .await
            .unwrap(),
    );
    let root = tempfile::tempdir().unwrap();
    let store = Store::new(root.path());
    let mode = lazylayer_store::FrontendMode::Fanotify;
    assert_eq!(store.prepare_layer(&index, mode).unwrap(), Phase::Lazy);
    let record_path = root
        .path()
        .join("layers/sha256")
        .join(blob.digest.hex())
        .join("record");
    let record = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap()
    };
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(
        record()["unsynced_in_boot"],
        this_boot.trim(),
        "{}",
        record()
    );

    // The machine stopped before the tree reached the disk: a placeholder is missing, and
    // the record is read in another boot.
    let passwd = store.layer_fs(&blob.digest).join("etc/passwd");
    std::fs::remove_file(&passwd).unwrap();
    let mut crashed = record();
    crashed["unsynced_in_boot"] = "an-earlier-boot".into();
    std::fs::write(&record_path, serde_json::to_vec(&crashed).unwrap()).unwrap();
    assert_eq!(store.phase(&blob.digest).unwrap(), Some(Phase::Creating));
    assert_eq!(store.prepare_layer(&index, mode).unwrap(), Phase::Lazy);
    assert!(passwd.exists(), "the tree was made again");

    // The daemon syncs the tree when it takes the layer up: from then on the record stands
    // in any boot. A persist does the same.
    let layer = store.open_layer(index.clone(), source.clone()).unwrap();
    assert!(record().get("unsynced_in_boot").is_some());
    layer.make_tree_durable().unwrap();
    assert!(record().get("unsynced_in_boot").is_none(), "{}", record());
    assert_eq!(store.phase(&blob.digest).unwrap(), Some(Phase::Lazy));
    drop(layer);
    std::fs::remove_dir_all(root.path().join("layers")).unwrap();
    assert_eq!(store.prepare_layer(&index, mode).unwrap(), Phase::Lazy);
    let layer = store.open_layer(index.clone(), source.clone()).unwrap();
    layer.persist().unwrap();
    assert!(record().get("unsynced_in_boot").is_none(), "{}", record());
}
