//! A layer directory made from the index and filled file by file must equal the layer
//! extracted by GNU tar with whiteouts converted: content, modes with setuid/setgid/sticky,
//! owners, sub-second times, xattrs (user.* and security.capability), symlinks, hardlinks,
//! devices, fifos, whiteouts and opaque directories; also hardlinks whose target is replaced
//! later in the layer.

use std::path::Path;
use std::sync::Arc;

use lazylayer_index::{BuildOptions, build};
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
            layer.populate(file).await.unwrap();
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
