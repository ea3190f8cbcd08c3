//! A layer directory made from the index and filled file by file must equal the layer
//! extracted by GNU tar with whiteouts converted: content, modes with setuid/setgid/sticky,
//! owners, sub-second times, xattrs (user.* and security.capability), symlinks, hardlinks,
//! devices, fifos, whiteouts and opaque directories.

use std::sync::Arc;

use lazylayer_index::{BuildOptions, build};
use lazylayer_source::{ImageReference, ImageSource, PlatformChoice, RegistryClient};
use lazylayer_store::{Phase, Store};
use lazylayer_testkit::fixtures::layout_dir;
use lazylayer_testkit::require_root;
use lazylayer_testkit::tree_diff::{diff_trees, extract_layer};

#[tokio::test]
async fn populated_layers_equal_tar_extraction() {
    if !require_root("populated_layers_equal_tar_extraction") {
        return;
    }
    let client = RegistryClient::new(Default::default()).unwrap();
    // Last, the multi-layer image again with every span streamed rather than held whole (what
    // a span too large for memory gets).
    for (tag, streamed) in [
        ("layers", false),
        ("layers-zstd", false),
        ("bookworm", false),
        ("layers", true),
    ] {
        let reference: ImageReference = format!("oci:{}:{tag}", layout_dir().display())
            .parse()
            .unwrap();
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
            let blob_path = layout_dir().join("blobs/sha256").join(blob.digest.hex());
            extract_layer(&blob_path, expected.path());
            let differences = diff_trees(expected.path(), &store.layer_fs(&blob.digest), true);
            assert!(
                differences.is_empty(),
                "{tag} layer {i}: {:#?}",
                &differences[..differences.len().min(20)]
            );
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
}
