//! Reads through the index must give the bytes a full `tar -x` gives: every file of the
//! Debian image (gzip and zstd) and of the multi-layer image (gzip, zstd, plain), random ranges,
//! multi-member gzip and multi-frame zstd made by the gzip and zstd tools; and wrong bytes or
//! broken indexes must be errors; runs of missing spans are one request; an index serves only
//! its own layer and a complete layer is checked against its blob; a blob that does not match
//! its digest never gets an index; hardlinks whose target is replaced later read as tar
//! extracts them.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lazylayer_index::{
    BuildOptions, Entry, EntryKind, Error, InflatedFor, LayerIndex, LayerReader, build,
    build_from_reader,
};
use lazylayer_source::registry::auth::credentials::CredentialSource;
use lazylayer_source::{
    BlobDescriptor, ClientOptions, Digest, ImageReference, ImageSource, PlatformChoice,
    RegistryClient, ResolvedImage,
};
use lazylayer_testkit::fixtures::{layout_dir, shared_registry};
use lazylayer_testkit::proxy::{Fault, FaultProxy, Rule, Shaping};

fn client() -> RegistryClient {
    RegistryClient::new(ClientOptions {
        credentials: CredentialSource::None,
        ..ClientOptions::default()
    })
    .unwrap()
}

async fn open(image: &str) -> (ImageSource, ResolvedImage) {
    let reference: ImageReference = image.parse().unwrap();
    let source = ImageSource::open(&reference, &client()).unwrap();
    let resolved = source.resolve(&PlatformChoice::host()).await.unwrap();
    (source, resolved)
}

/// The Debian image's layout, its layer and the layer's index built from the layout.
async fn debian_layer() -> (ImageSource, BlobDescriptor, Arc<LayerIndex>) {
    debian_layer_with(BuildOptions::default()).await
}

/// The Debian layer indexed with checkpoint spans only (no continuation spans): for tests that
/// count whole spans.
async fn debian_layer_in_checkpoint_spans() -> (ImageSource, BlobDescriptor, Arc<LayerIndex>) {
    debian_layer_with(BuildOptions::spans_of(lazylayer_index::DEFAULT_SPACING)).await
}

async fn debian_layer_with(
    options: BuildOptions,
) -> (ImageSource, BlobDescriptor, Arc<LayerIndex>) {
    let (layout, image) = open(&format!("oci:{}:bookworm", layout_dir().display())).await;
    let layer = image.layers[0].clone();
    let index = build(&layout, &layer, None, options).await.unwrap();
    (layout, layer, Arc::new(index))
}

/// Uncompressed bytes `range` of the layer read from the local layout (what a registry read
/// must equal).
async fn read_from_layout(
    layout: ImageSource,
    index: &Arc<LayerIndex>,
    range: std::ops::Range<u64>,
) -> Vec<u8> {
    let cache = tempfile::tempdir().unwrap();
    LayerReader::new(index.clone(), layout, cache.path())
        .unwrap()
        .read_uncompressed(range)
        .await
        .unwrap()
}

fn blob_path(digest: &Digest) -> PathBuf {
    layout_dir().join("blobs/sha256").join(digest.hex())
}

/// Extracts a layer blob with GNU tar (which detects gzip and zstd itself).
fn extract(blob: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .args(["--numeric-owner", "-xf"])
        .arg(blob)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "tar -x {}", blob.display());
    dir
}

fn on_disk(root: &Path, entry: &Entry) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(&entry.path))
}

/// Reads every regular file through the reader and compares it with the extraction.
async fn sweep(reader: &LayerReader, extracted: &Path) -> usize {
    let mut files = 0;
    for entry in reader
        .index()
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
    {
        let expected = std::fs::read(on_disk(extracted, entry)).unwrap();
        let got = reader.read(entry, 0, entry.size).await.unwrap();
        assert!(
            got == expected,
            "{} differs ({} vs {} bytes)",
            entry.display_path(),
            got.len(),
            expected.len()
        );
        files += 1;
    }
    files
}

#[tokio::test]
async fn every_file_reads_back_as_tar_extracts_it() {
    let registry = shared_registry().host();
    for (tag, remote) in [
        ("bookworm", "test/debian:bookworm"),
        ("bookworm-zstd", "test/debian:bookworm-zstd"),
        ("layers", "test/layers:latest"),
        ("layers-zstd", "test/layers:zstd"),
        ("layers-plain", "test/layers:plain"),
    ] {
        let (layout, image) = open(&format!("oci:{}:{tag}", layout_dir().display())).await;
        let (registry_source, _) = open(&format!("{registry}/{remote}")).await;
        for (i, layer) in image.layers.iter().enumerate() {
            let diff_id = &image.config_summary.rootfs.diff_ids[i];
            let index = build(&layout, layer, Some(diff_id), BuildOptions::default())
                .await
                .unwrap();
            let encoded = index.encode().unwrap();
            let index = Arc::new(LayerIndex::decode("test", &encoded).unwrap());
            let cache = tempfile::tempdir().unwrap();
            let reader =
                LayerReader::new(index.clone(), registry_source.clone(), cache.path()).unwrap();
            let extracted = extract(&blob_path(&layer.digest));
            let files = sweep(&reader, extracted.path()).await;
            eprintln!(
                "{tag} layer {i}: {files} files, {} entries, {} spans, index {} bytes for a {}-byte blob, fetched {:?}",
                index.entries.len(),
                index.spans.len(),
                encoded.len(),
                layer.size,
                reader.stats()
            );
            assert!(files > 0 || i > 0);
            assert_eq!(&index.diff_id, diff_id);
            let stats = reader.stats();
            assert!(
                stats.bytes_fetched <= layer.size + index.spans.len() as u64,
                "spans fetched once"
            );
            if tag == "bookworm" {
                assert!(index.spans.len() > 20, "{} spans", index.spans.len());
                assert!(
                    (encoded.len() as u64) * 20 < layer.size,
                    "index under 5% of the layer"
                );
            }
            if tag == "bookworm-zstd" {
                eprintln!("zstd layer from skopeo: {} span(s)", index.spans.len());
            }
        }
    }
}

#[tokio::test]
async fn the_multi_layer_image_keeps_its_metadata() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let mut indexes = Vec::new();
    for (i, layer) in image.layers.iter().enumerate() {
        let diff_id = &image.config_summary.rootfs.diff_ids[i];
        indexes.push(
            build(&layout, layer, Some(diff_id), BuildOptions::default())
                .await
                .unwrap(),
        );
    }
    let by_path = |i: usize| -> HashMap<Vec<u8>, Entry> {
        indexes[i]
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect()
    };
    let l1 = by_path(0);
    let get = |path: &str| {
        l1.get(path.as_bytes())
            .unwrap_or_else(|| panic!("{path} missing"))
    };
    assert_eq!(get("bin/suid-true").mode, 0o4755);
    assert_eq!(get("bin/sgid-true").mode, 0o2755);
    assert_eq!(get("tmp").mode, 0o1777);
    assert_eq!(
        (
            get("etc/secret").uid,
            get("etc/secret").gid,
            get("etc/secret").mode
        ),
        (1234, 5678, 0o600)
    );
    assert!(
        get("bin/cap-true")
            .xattrs
            .iter()
            .any(|(n, _)| n == b"security.capability")
    );
    assert_eq!(
        get("etc/hello.txt").xattrs,
        vec![(b"user.lazylayer.test".to_vec(), b"hello xattr".to_vec())]
    );
    assert_eq!(get("data/one-byte").xattrs[0].1, vec![0x00, 0xff, 0x10]);
    assert_eq!(
        (
            get("data/one-byte").mtime_nsec,
            get("data/abs-link").mtime_nsec
        ),
        (123456789, 500000000)
    );
    assert_eq!(get("data/abs-link").kind, EntryKind::Symlink);
    assert_eq!(
        get("data/abs-link").link.as_deref(),
        Some(&b"/etc/hello.txt"[..])
    );
    assert_eq!(
        get("data/rel-link").link.as_deref(),
        Some(&b"../etc/hello.txt"[..])
    );
    let hardlinks: Vec<&Entry> = l1
        .values()
        .filter(|e| e.kind == EntryKind::Hardlink)
        .collect();
    assert_eq!(hardlinks.len(), 2, "three names, one file");
    let target = hardlinks[0].link.clone().unwrap();
    assert!(hardlinks.iter().all(|h| h.link.as_ref() == Some(&target)));
    assert_eq!(l1[&target].kind, EntryKind::File);
    assert_eq!(get("dev-nodes/null").device, Some((1, 3)));
    assert_eq!(get("dev-nodes/null").kind, EntryKind::CharDevice);
    assert_eq!(get("dev-nodes/loop7").kind, EntryKind::BlockDevice);
    assert_eq!(get("dev-nodes/fifo").kind, EntryKind::Fifo);
    let sparse = get("data/sparse.img");
    assert_eq!(sparse.size, 64 << 20);
    assert!(
        sparse.stored_size() < 1 << 20,
        "holes are not stored: {}",
        sparse.stored_size()
    );
    let long = l1
        .keys()
        .find(|p| p.len() > 300)
        .expect("a path over 300 bytes");
    assert!(long.starts_with(b"names/long-name-"));
    assert!(
        l1.contains_key(&b"names/caf\xe9-latin1"[..]),
        "non-UTF-8 name"
    );
    assert!(l1.contains_key("names/héllo-世界-🦀".as_bytes()));
    assert!(l1.keys().any(|p| p.ends_with(b"d48/bottom.txt")));
    // Layer 2: whiteouts and an opaque directory.
    let l2 = by_path(1);
    assert_eq!(l2[&b"remove-me.txt"[..]].kind, EntryKind::Whiteout);
    assert_eq!(l2[&b"remove-dir"[..]].kind, EntryKind::Whiteout);
    assert!(l2[&b"opaque-dir"[..]].opaque);
    assert!(
        !l2.keys().any(|p| p.windows(4).any(|w| w == b".wh.")),
        "no .wh. names remain"
    );
    // Reading the sparse file gives its holes as zeros and its data where it was written.
    let cache = tempfile::tempdir().unwrap();
    let index = Arc::new(
        build(&layout, &image.layers[0], None, BuildOptions::default())
            .await
            .unwrap(),
    );
    let reader = LayerReader::new(index, layout.clone(), cache.path()).unwrap();
    let sparse = reader.index().entry(b"data/sparse.img").unwrap().clone();
    assert_eq!(reader.read(&sparse, 0, 4).await.unwrap(), b"head");
    assert_eq!(reader.read(&sparse, 32 << 20, 6).await.unwrap(), b"middle");
    assert_eq!(
        reader.read(&sparse, (64 << 20) - 4, 100).await.unwrap(),
        b"tail"
    );
    assert_eq!(
        reader.read(&sparse, 1 << 20, 4096).await.unwrap(),
        vec![0; 4096]
    );
}

#[tokio::test]
async fn random_ranges_agree_with_the_extraction() {
    let rng = &mut fastrand::Rng::with_seed(7);
    // Debian: large files, many spans.
    let index = random_ranges("bookworm", 0, rng, 400).await;
    // The multi-layer image in every compression: small files, sparse files, links.
    for tag in ["layers", "layers-zstd", "layers-plain"] {
        for layer in 0..3 {
            random_ranges(tag, layer, rng, 60).await;
        }
    }
    // Ranges of the raw stream across many spans.
    let (layout, _) = open(&format!("oci:{}:bookworm", layout_dir().display())).await;
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), layout, cache.path()).unwrap();
    let whole = reader
        .read_uncompressed(1_000_000..9_000_000)
        .await
        .unwrap();
    assert_eq!(whole.len(), 8_000_000);
    assert!(
        reader
            .read_uncompressed(index.uncompressed_size - 1..index.uncompressed_size + 1)
            .await
            .is_err()
    );
}

/// Reads `count` random ranges (some running past the end) of random files of layer `layer`
/// of fixture image `tag` through a reader with small spans, and compares each with the bytes
/// GNU tar extracts. Returns the index.
async fn random_ranges(
    tag: &str,
    layer: usize,
    rng: &mut fastrand::Rng,
    count: usize,
) -> Arc<LayerIndex> {
    let (layout, image) = open(&format!("oci:{}:{tag}", layout_dir().display())).await;
    let layer = &image.layers[layer];
    // Small spans, so reads cross span boundaries often.
    let index = Arc::new(
        build(&layout, layer, None, BuildOptions::spans_of(192 << 10))
            .await
            .unwrap(),
    );
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), layout, cache.path()).unwrap();
    let extracted = extract(&blob_path(&layer.digest));
    let files: Vec<&Entry> = index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.size > 0)
        .collect();
    for _ in 0..count {
        let entry = files[rng.usize(..files.len())];
        let offset = rng.u64(0..entry.size);
        let len = rng.u64(0..=(entry.size - offset + 10).min(3 << 20));
        let got = reader.read(entry, offset, len).await.unwrap();
        let all = std::fs::read(on_disk(extracted.path(), entry)).unwrap();
        let end = (offset + len).min(entry.size) as usize;
        assert!(
            got == all[offset as usize..end],
            "{tag}: {} @{offset}+{len}",
            entry.display_path()
        );
    }
    index
}

/// Puts a blob into a minimal OCI layout, so the reader can take ranges of it.
fn layout_with_blob(
    bytes: &[u8],
    media_type: &str,
) -> (tempfile::TempDir, ImageSource, BlobDescriptor) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let digest = Digest::sha256(bytes);
    std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
    std::fs::write(dir.path().join("blobs/sha256").join(digest.hex()), bytes).unwrap();
    let reference: ImageReference = format!("oci:{}", dir.path().display()).parse().unwrap();
    let source = ImageSource::open(&reference, &client()).unwrap();
    let descriptor = BlobDescriptor {
        digest,
        media_type: media_type.to_string(),
        size: bytes.len() as u64,
    };
    (dir, source, descriptor)
}

fn run(command: &str, input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "{command}");
    output.stdout
}

#[tokio::test]
async fn multi_member_gzip_and_multi_frame_zstd() {
    // A tar of part of the Debian tree, made by GNU tar, compressed in three pieces.
    let (_, image) = open(&format!("oci:{}:bookworm", layout_dir().display())).await;
    let tree = extract(&blob_path(&image.layers[0].digest));
    let tar = Command::new("tar")
        .args(["--format=pax", "-cf", "-", "-C"])
        .arg(tree.path())
        .args(["usr/bin", "usr/lib/x86_64-linux-gnu"])
        .output()
        .unwrap()
        .stdout;
    assert!(tar.len() > 8 << 20, "{}", tar.len());
    let work = tempfile::tempdir().unwrap();
    let tar_file = work.path().join("layer.tar");
    std::fs::write(&tar_file, &tar).unwrap();
    let extracted = extract(&tar_file);
    let diff_id = Digest::sha256(&tar);
    let third = tar.len() / 3;
    for (media_type, compress) in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip -c"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd -q -c"),
    ] {
        let mut blob = Vec::new();
        for part in [&tar[..third], &tar[third..2 * third], &tar[2 * third..]] {
            blob.extend(run(compress, part));
        }
        if media_type.ends_with("gzip") {
            blob.extend_from_slice(&[0u8; 100]); // zero padding after the last member
        }
        let (_dir, source, descriptor) = layout_with_blob(&blob, media_type);
        let index = build(
            &source,
            &descriptor,
            Some(&diff_id),
            BuildOptions::spans_of(1 << 20),
        )
        .await
        .unwrap();
        assert!(
            index.spans.len() >= 3,
            "{media_type}: {} spans",
            index.spans.len()
        );
        let index = Arc::new(index);
        let cache = tempfile::tempdir().unwrap();
        let reader = LayerReader::new(index.clone(), source, cache.path()).unwrap();
        let whole = reader
            .read_uncompressed(0..index.uncompressed_size)
            .await
            .unwrap();
        assert!(whole == tar, "{media_type}: whole stream");
        assert!(sweep(&reader, extracted.path()).await > 100);
    }
}

#[tokio::test]
async fn wrong_bytes_from_the_registry_are_errors_never_data() {
    let registry = shared_registry();
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let layer = &image.layers[0];
    let index = Arc::new(
        build(&layout, layer, None, BuildOptions::spans_of(256 << 10))
            .await
            .unwrap(),
    );
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    let (source, _) = open(&format!("{}/test/layers:latest", proxy.host())).await;
    proxy.add_rule(
        Rule::new(Fault::CorruptAt { at: 100 })
            .on_path(&layer.digest.to_string())
            .always(),
    );
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source, cache.path()).unwrap();
    let entry = index.entry(b"data/random-3m").unwrap().clone();
    let err = reader.read(&entry, 0, 4096).await.unwrap_err();
    assert!(matches!(err, Error::SpanMismatch { .. }), "{err}");
    assert_eq!(reader.spans_present(), 0, "nothing unverified was kept");
    proxy.clear_rules();
    let good = reader.read(&entry, 0, entry.size).await.unwrap();
    let extracted = extract(&blob_path(&layer.digest));
    assert!(good == std::fs::read(extracted.path().join("data/random-3m")).unwrap());
    // A cached span damaged on disk is detected and fetched again.
    let spans_file = cache.path().join(format!("{}.spans", layer.digest.hex()));
    let mut damaged = std::fs::read(&spans_file).unwrap();
    let first_span = index.span_at(entry.data_offset);
    damaged[index.spans[first_span].compressed_start as usize + 10] ^= 0x40;
    std::fs::write(&spans_file, damaged).unwrap();
    let reader = LayerReader::new(index.clone(), layout, cache.path()).unwrap();
    assert!(matches!(
        reader.read(&entry, 0, 10).await.unwrap_err(),
        Error::SpanMismatch { .. }
    ));
    assert_eq!(
        reader.read(&entry, 0, entry.size).await.unwrap(),
        good,
        "fetched again"
    );
}

#[tokio::test]
async fn spans_are_fetched_once_and_a_small_file_costs_a_span() {
    let (_, layer, index) = debian_layer().await;
    let layer = &layer;
    let (source, _) = open(&format!(
        "{}/test/debian:bookworm",
        shared_registry().host()
    ))
    .await;
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source, cache.path()).unwrap();
    let entry = index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.size >= 48 << 10 && e.size <= 80 << 10)
        .min_by_key(|e| e.size.abs_diff(64 << 10))
        .unwrap()
        .clone();
    reader.read(&entry, 0, entry.size).await.unwrap();
    let first = reader.stats();
    reader.read(&entry, 0, entry.size).await.unwrap();
    assert_eq!(reader.stats(), first, "second read is local");
    eprintln!(
        "cold read of {} ({} bytes): fetched {} of {} bytes ({:.2}%) in {} request(s)",
        entry.display_path(),
        entry.size,
        first.bytes_fetched,
        layer.size,
        first.bytes_fetched as f64 * 100.0 / layer.size as f64,
        first.requests
    );
    assert!(first.bytes_fetched < 3 * index.spacing + (1 << 20));
    assert!(first.requests <= 2);
    // A reader on the same cache does not fetch again.
    let (source, _) = open(&format!(
        "{}/test/debian:bookworm",
        shared_registry().host()
    ))
    .await;
    let again = LayerReader::new(index, source, cache.path()).unwrap();
    again.read(&entry, 0, entry.size).await.unwrap();
    assert_eq!(again.stats().requests, 0);
}

#[tokio::test]
async fn content_that_does_not_match_the_manifest_or_config_is_refused() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let layer = &image.layers[2];
    let wrong = Digest::sha256(b"not the diff_id");
    let err = build(&layout, layer, Some(&wrong), BuildOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DiffIdMismatch { .. }), "{err}");
    let mut liar = layer.clone();
    liar.size += 1;
    assert!(
        build(&layout, &liar, None, BuildOptions::default())
            .await
            .is_err()
    );
    // Bytes that do not match the blob digest fail the build even through build_from_reader.
    let mut bytes = std::fs::read(blob_path(&layer.digest)).unwrap();
    let len = bytes.len();
    bytes[len / 2] ^= 1;
    assert!(
        build_from_reader(
            std::io::Cursor::new(bytes),
            layer,
            None,
            BuildOptions::default()
        )
        .is_err()
    );
}

#[tokio::test]
async fn broken_indexes_are_rejected_with_a_clear_error() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let index = build(
        &layout,
        &image.layers[0],
        None,
        BuildOptions::spans_of(64 << 10),
    )
    .await
    .unwrap();
    let good = index.encode().unwrap();
    assert!(LayerIndex::decode("good", &good).is_ok());
    let expect = |bytes: &[u8], needle: &str| {
        let err = LayerIndex::decode("x", bytes).unwrap_err().to_string();
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    };
    expect(&good[..good.len() - 1], "truncated");
    expect(&good[..20], "bad magic");
    expect(
        b"garbage garbage garbage garbage garbage garbage",
        "bad magic",
    );
    let mut version = good.clone();
    version[8] = 9;
    expect(&version, "format version 9");
    let mut scrambled = good.clone();
    for b in &mut scrambled[40..60] {
        *b ^= 0x5a;
    }
    assert!(LayerIndex::decode("x", &scrambled).is_err());
    // Well-formed indexes that lie.
    let lie = |change: &dyn Fn(&mut LayerIndex), needle: &str| {
        let mut index = LayerIndex::decode("good", &good).unwrap();
        change(&mut index);
        expect(&index.encode().unwrap(), needle);
    };
    lie(
        &|i| i.spans.last_mut().unwrap().compressed_end = i.blob_size + 4096,
        "of a",
    );
    lie(&|i| i.spans[1].compressed_start += 7, "not in order");
    lie(
        &|i| i.spans[0].start = lazylayer_index::SpanStart::Continue,
        "does not start at the beginning",
    );
    lie(
        &|i| {
            let end = i.uncompressed_size;
            let file = i
                .entries
                .iter_mut()
                .find(|e| e.kind == EntryKind::File)
                .unwrap();
            file.data_offset = end;
            file.size = 10;
        },
        "past the end",
    );
    lie(
        &|i| i.entries[3].path = b"../../etc/passwd".to_vec(),
        "invalid path",
    );
    lie(
        &|i| {
            let dup = i.entries[2].clone();
            i.entries.push(dup);
        },
        "twice",
    );
    // Hardlinks: the store creates each from its target, in order, so the target must be an
    // earlier entry that can be linked.
    let link_at = |i: &LayerIndex| {
        i.entries
            .iter()
            .position(|e| e.kind == EntryKind::Hardlink)
            .unwrap()
    };
    lie(
        &|i| {
            let at = link_at(i);
            i.entries[at].link = Some(b"no/such/file".to_vec());
        },
        "which is not in the layer",
    );
    lie(
        &|i| {
            let at = link_at(i);
            let dir = i
                .entries
                .iter()
                .find(|e| e.kind == EntryKind::Dir && !e.path.is_empty());
            i.entries[at].link = Some(dir.unwrap().path.clone());
        },
        "which is a Dir, not a file",
    );
    lie(
        &|i| {
            let at = link_at(i);
            let target = i.entries[at].link.clone().unwrap();
            let file = i.entries.iter().position(|e| e.path == target).unwrap();
            let moved = i.entries.remove(file);
            i.entries.insert(at, moved);
        },
        "comes before its target",
    );
}

/// The background fill keeps a quarter of the inflated output a waiting reader may keep: it
/// runs while the worker's memory peaks, and it needs little but the spans it just inflated.
#[tokio::test]
async fn the_background_fill_keeps_less_inflated_output_than_a_waiting_reader() {
    let (layout, _, index) = debian_layer_in_checkpoint_spans().await;
    let largest = (0..index.spans.len())
        .map(|i| (index.span_uncompressed_end(i) - index.spans[i].uncompressed_start) as usize)
        .max()
        .unwrap();
    let mut peaks = Vec::new();
    for whom in [InflatedFor::Background, InflatedFor::Reader] {
        let cache = tempfile::tempdir().unwrap();
        let reader = LayerReader::new(index.clone(), layout.clone(), cache.path()).unwrap();
        let mut peak = 0;
        for i in 0..index.spans.len() {
            let output = reader.span_output(i, whom).await.unwrap();
            let start = index.spans[i].uncompressed_start;
            assert_eq!(output.len() as u64, index.span_uncompressed_end(i) - start);
            peak = peak.max(reader.recent_bytes());
        }
        peaks.push(peak);
    }
    let (background, waiting) = (peaks[0], peaks[1]);
    assert!(
        background <= (4 << 20) + largest,
        "background kept {background}"
    );
    assert!(
        waiting <= (16 << 20) + largest,
        "a waiting reader kept {waiting}"
    );
    assert!(
        waiting > (8 << 20) + largest,
        "a waiting reader kept only {waiting}"
    );
}

#[tokio::test]
async fn concurrent_reads_of_one_span_fetch_it_once() {
    let (_, _, index) = debian_layer_in_checkpoint_spans().await;
    let (source, _) = open(&format!(
        "{}/test/debian:bookworm",
        shared_registry().host()
    ))
    .await;
    let cache = tempfile::tempdir().unwrap();
    let reader = Arc::new(LayerReader::new(index.clone(), source, cache.path()).unwrap());
    // Eight small files that all live in one span.
    let mut by_span: HashMap<usize, Vec<Entry>> = HashMap::new();
    for e in index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.size > 0 && e.size < 4096)
    {
        let span = index.span_at(e.data_offset);
        if index.span_at(e.data_offset + e.size - 1) == span {
            by_span.entry(span).or_default().push(e.clone());
        }
    }
    let files: Vec<Entry> = by_span
        .into_values()
        .max_by_key(|v| v.len())
        .unwrap()
        .into_iter()
        .take(8)
        .collect();
    assert!(files.len() >= 2, "{}", files.len());
    let reads = files.iter().map(|entry| {
        let reader = reader.clone();
        let entry = entry.clone();
        tokio::spawn(async move { reader.read(&entry, 0, entry.size).await.unwrap() })
    });
    for read in reads.collect::<Vec<_>>() {
        read.await.unwrap();
    }
    let stats = reader.stats();
    assert_eq!((stats.requests, stats.spans_fetched), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn hardlinks_keep_the_file_their_target_had_before_it_was_replaced() {
    let tar = lazylayer_testkit::fixtures::relinked_targets_tar();
    let work = tempfile::tempdir().unwrap();
    let tar_file = work.path().join("layer.tar");
    std::fs::write(&tar_file, &tar).unwrap();
    let extracted = extract(&tar_file);
    let blob = run("gzip -n -c", &tar);
    let (_dir, source, descriptor) =
        layout_with_blob(&blob, "application/vnd.oci.image.layer.v1.tar+gzip");
    let diff_id = Digest::sha256(&tar);
    let index = build(
        &source,
        &descriptor,
        Some(&diff_id),
        BuildOptions::default(),
    )
    .await
    .unwrap();
    // What an index from a registry must also be: decodes and validates.
    let index = Arc::new(LayerIndex::decode("relinked", &index.encode().unwrap()).unwrap());
    let table: Vec<(String, EntryKind, Option<String>)> = index
        .entries
        .iter()
        .map(|e| {
            let link = e.link.as_deref().map(|l| String::from_utf8_lossy(l).into());
            (e.display_path(), e.kind, link)
        })
        .collect();
    let entry =
        |path: &str, kind, link: Option<&str>| (path.to_string(), kind, link.map(Into::into));
    assert_eq!(
        table,
        vec![
            entry("b", EntryKind::File, None),
            entry("c", EntryKind::Hardlink, Some("b")),
            entry("l2", EntryKind::File, None),
            entry("m2", EntryKind::File, None),
            entry("s", EntryKind::Symlink, Some("a")),
            entry("s2", EntryKind::Hardlink, Some("s")),
            entry("a", EntryKind::File, None),
            entry("l1", EntryKind::Dir, None),
            entry("l1/x", EntryKind::File, None),
            entry("m1", EntryKind::Symlink, Some("a")),
        ]
    );
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source, cache.path()).unwrap();
    let b = index.entry(b"b").unwrap();
    assert_eq!(reader.read(b, 0, b.size).await.unwrap(), b"old a\n");
    assert_eq!(
        std::fs::read(extracted.path().join("b")).unwrap(),
        b"old a\n"
    );
    assert_eq!(sweep(&reader, extracted.path()).await, 5, "b l2 m2 a l1/x");
}

/// The ranged GETs of a layer blob the proxy has seen.
fn blob_gets(proxy: &FaultProxy, layer: &Digest) -> usize {
    let path = format!("/blobs/{layer}");
    proxy
        .exchanges()
        .iter()
        .filter(|e| e.method == "GET" && e.target.contains(&path))
        .count()
}

#[tokio::test]
async fn a_run_of_missing_spans_is_one_ranged_get() {
    let (layout, layer, index) = debian_layer_in_checkpoint_spans().await;
    let layer = &layer;
    let (first, last) = (4, 8);
    assert!(index.spans.len() > last + 1, "{} spans", index.spans.len());
    let range = index.spans[first].uncompressed_start..index.span_uncompressed_end(last);
    let proxy = FaultProxy::start(shared_registry().addr(), Shaping::default()).unwrap();
    let (source, _) = open(&format!("{}/test/debian:bookworm", proxy.host())).await;
    // The same bytes read from the local layout, to compare with.
    let expected = read_from_layout(layout, &index, range.clone()).await;

    // Cold: the five spans come in one request, each verified and kept.
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source.clone(), cache.path()).unwrap();
    let before = blob_gets(&proxy, &layer.digest);
    let got = reader.read_uncompressed(range.clone()).await.unwrap();
    assert!(got == expected);
    let stats = reader.stats();
    assert_eq!(blob_gets(&proxy, &layer.digest) - before, 1);
    assert_eq!((stats.requests, stats.spans_fetched), (1, 5), "{stats:?}");
    assert_eq!(
        stats.bytes_fetched,
        index.spans[last].compressed_end - index.spans[first].compressed_start
    );
    assert_eq!(reader.spans_present(), 5);

    // With the middle span already local, the run splits in two: before it and after it.
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source, cache.path()).unwrap();
    reader.ensure(6..=6).await.unwrap();
    let before = blob_gets(&proxy, &layer.digest);
    let got = reader.read_uncompressed(range).await.unwrap();
    assert!(got == expected);
    let stats = reader.stats();
    assert_eq!(blob_gets(&proxy, &layer.digest) - before, 2);
    assert_eq!((stats.requests, stats.spans_fetched), (3, 5), "{stats:?}");
}

/// With continuation spans, a cold read of a small file fetches and verifies the compressed
/// bytes from its span's checkpoint to the end of the file's span, not the whole checkpoint
/// span; a later file after it in the same checkpoint span fetches only the pieces between.
#[tokio::test]
async fn a_read_fetches_from_its_checkpoint_to_the_end_of_its_file_only() {
    // Checkpoints every 1 MiB: room for the two files below in one checkpoint span.
    let (layout, layer, index) = debian_layer_with(BuildOptions {
        spacing: 1 << 20,
        ..BuildOptions::default()
    })
    .await;
    let checkpoints = index
        .spans
        .iter()
        .filter(|s| s.start != lazylayer_index::SpanStart::Continue)
        .count();
    assert!(
        index.spans.len() > 8 * checkpoints,
        "{} spans, {checkpoints} checkpoints",
        index.spans.len()
    );
    // The end of the checkpoint span (the last continuation span after `checkpoint`).
    let group_end = |checkpoint: usize| {
        let mut last = checkpoint;
        while index
            .spans
            .get(last + 1)
            .is_some_and(|s| s.start == lazylayer_index::SpanStart::Continue)
        {
            last += 1;
        }
        last
    };
    // Two small files, each inside one continuation span, in the third and the sixth
    // continuation span after a checkpoint, with more continuation spans after both.
    let span_of = |e: &Entry| {
        let span = index.span_at(e.data_offset);
        (index.span_at(e.data_offset + e.size - 1) == span).then_some(span)
    };
    let small = |e: &&Entry| e.kind == EntryKind::File && e.size > 0 && e.size < 4096;
    let (early, late) = index
        .entries
        .iter()
        .filter(small)
        .find_map(|early| {
            let span = span_of(early)?;
            let checkpoint = index.checkpoint_of(span);
            if span != checkpoint + 3 || group_end(checkpoint) < span + 5 {
                return None;
            }
            let late = index
                .entries
                .iter()
                .filter(small)
                .find(|e| span_of(e) == Some(span + 3))?;
            Some((early.clone(), late.clone()))
        })
        .expect("two small files in one checkpoint span");
    let (early_span, late_span) = (
        index.span_at(early.data_offset),
        index.span_at(late.data_offset),
    );
    let checkpoint = index.checkpoint_of(early_span);
    let spans = &index.spans;
    let proxy = FaultProxy::start(shared_registry().addr(), Shaping::default()).unwrap();
    let (source, _) = open(&format!("{}/test/debian:bookworm", proxy.host())).await;
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source, cache.path()).unwrap();
    for (entry, from, to, requests) in [
        (&early, checkpoint, early_span, 1),
        (&late, early_span + 1, late_span, 2),
    ] {
        let before = reader.stats();
        let got = reader.read(entry, 0, entry.size).await.unwrap();
        let range = entry.data_offset..entry.data_offset + entry.size;
        assert!(
            got == read_from_layout(layout.clone(), &index, range).await,
            "{} read wrong",
            entry.display_path()
        );
        let stats = reader.stats();
        assert_eq!(
            stats.bytes_fetched - before.bytes_fetched,
            spans[to].compressed_end - spans[from].compressed_start,
            "{}: spans {from}..={to}",
            entry.display_path()
        );
        assert_eq!(stats.requests, requests);
    }
    assert_eq!(blob_gets(&proxy, &layer.digest), 2);
    let whole = spans[group_end(checkpoint)].compressed_end - spans[checkpoint].compressed_start;
    assert!(
        reader.stats().bytes_fetched < whole,
        "{} bytes fetched, the checkpoint span is {whole}",
        reader.stats().bytes_fetched
    );
}

/// Every file of a layer indexed with continuation spans reads right when the spans are
/// inflated one by one out of order (each from its checkpoint), and the layer passes the check
/// against its blob and the index rebuilt from it; an index whose continuation cut is moved
/// does not.
#[tokio::test]
async fn continuation_spans_read_right_in_any_order_and_are_checked_when_complete() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let layer = &image.layers[0];
    let options = BuildOptions {
        spacing: 256 << 10,
        continuation: 16 << 10,
    };
    let built = build(&layout, layer, None, options).await.unwrap();
    let good = built.encode().unwrap();
    let index = Arc::new(LayerIndex::decode("good", &good).unwrap());
    // Version 4 (it has windows, and their digests), and what decodes encodes to the same
    // bytes; without window digests it is version 3, and without continuation spans too
    // version 2, which builds from before read.
    assert_eq!(good[8..12], 4u32.to_le_bytes());
    assert!(index.encode().unwrap() == good);
    let mut older = LayerIndex::decode("good", &good).unwrap();
    older.window_digests.clear();
    let older = older.encode().unwrap();
    assert_eq!(older[8..12], 3u32.to_le_bytes());
    assert!(
        LayerIndex::decode("version 3", &older)
            .unwrap()
            .encode()
            .unwrap()
            == older
    );
    let mut plain = build(&layout, layer, None, BuildOptions::spans_of(256 << 10))
        .await
        .unwrap();
    plain.window_digests.clear();
    let plain = plain.encode().unwrap();
    assert_eq!(plain[8..12], 2u32.to_le_bytes());
    assert!(
        LayerIndex::decode("version 2", &plain)
            .unwrap()
            .encode()
            .unwrap()
            == plain
    );
    assert!(
        index
            .spans
            .iter()
            .filter(|s| s.start == lazylayer_index::SpanStart::Continue)
            .count()
            > 4,
        "{} spans",
        index.spans.len()
    );
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), layout.clone(), cache.path()).unwrap();
    let whole = reader
        .read_uncompressed(0..index.uncompressed_size)
        .await
        .unwrap();
    let cold = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), layout.clone(), cold.path()).unwrap();
    for i in (0..index.spans.len()).rev() {
        let (start, output) = reader.decompress(i..=i).await.unwrap();
        let checkpoint = index.checkpoint_of(i);
        assert_eq!(start, index.spans[checkpoint].uncompressed_start);
        assert!(
            output[..] == whole[start as usize..index.span_uncompressed_end(i) as usize],
            "span {i}"
        );
    }
    reader.verify_complete().await.unwrap();
    let mut moved = LayerIndex::decode("good", &good).unwrap();
    let cut = moved
        .spans
        .iter()
        .position(|s| s.start == lazylayer_index::SpanStart::Continue)
        .unwrap();
    moved.spans[cut].uncompressed_start -= 1;
    let moved = LayerIndex::decode("moved", &moved.encode().unwrap()).unwrap();
    let reader = LayerReader::new(Arc::new(moved), layout, cold.path()).unwrap();
    let err = reader.verify_complete().await.unwrap_err().to_string();
    assert!(
        err.contains("differs from the index rebuilt from the verified blob"),
        "{err}"
    );
}

/// A reader waiting for the first span of a long run gets it when it has arrived, not when the
/// run ends: a profile or background fetch of many spans never holds back a reader.
#[tokio::test]
async fn a_span_is_served_while_the_rest_of_its_run_is_still_arriving() {
    let (layout, layer, index) = debian_layer_in_checkpoint_spans().await;
    let layer = &layer;
    let (first, last) = (4, 8);
    let proxy = FaultProxy::start(shared_registry().addr(), Shaping::default()).unwrap();
    // The run's GET stops after its first span and two more bytes, for good.
    let first_len = index.spans[first].compressed_end - index.spans[first].compressed_start;
    proxy.add_rule(
        Rule::new(Fault::StallAfter {
            after: first_len + 2,
            pause: None,
        })
        .on_path(&format!("/blobs/{}", layer.digest)),
    );
    let (source, _) = open(&format!("{}/test/debian:bookworm", proxy.host())).await;
    let cache = tempfile::tempdir().unwrap();
    let reader = Arc::new(LayerReader::new(index.clone(), source, cache.path()).unwrap());
    let run = tokio::spawn({
        let reader = reader.clone();
        async move { reader.ensure(first..=last).await }
    });
    // A read of the first span, started once the run is in flight, completes while the run
    // is still stalled.
    while reader.stats().requests == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let range = index.spans[first].uncompressed_start..index.span_uncompressed_end(first);
    let expected = read_from_layout(layout, &index, range.clone()).await;
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        reader.read_uncompressed(range),
    )
    .await
    .expect("the first span is served before the run ends")
    .unwrap();
    assert!(got == expected);
    assert!(!run.is_finished(), "the run is still stalled");
    let stats = reader.stats();
    assert_eq!((stats.requests, stats.spans_fetched), (1, 1), "{stats:?}");
    run.abort();
}

#[tokio::test]
async fn an_index_is_only_used_for_its_own_layer() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let (one, two) = (&image.layers[0], &image.layers[1]);
    let index = build(&layout, one, None, BuildOptions::default())
        .await
        .unwrap();
    lazylayer_index::distribution::check_identity("index of layer 1", &index, one).unwrap();
    let err = lazylayer_index::distribution::check_identity("index of layer 1", &index, two)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("indexes {}", one.digest))
            && err.contains(&format!("not layer {}", two.digest)),
        "{err}"
    );
    // The local store checks it too: an index filed under another layer is refused on load.
    let root = tempfile::tempdir().unwrap();
    let store = lazylayer_index::IndexStore::new(root.path());
    store
        .put(
            two,
            &index,
            lazylayer_index::distribution::IndexOrigin::Local,
        )
        .unwrap();
    let err = store.get(two).unwrap_err().to_string();
    assert!(err.contains(&format!("not layer {}", two.digest)), "{err}");
}

#[tokio::test]
async fn a_complete_layer_is_checked_against_its_blob_and_a_rebuilt_index() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let layer = &image.layers[0];
    let built = build(&layout, layer, None, BuildOptions::spans_of(256 << 10))
        .await
        .unwrap();
    let good = built.encode().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let verify = |index: LayerIndex| {
        let reader = LayerReader::new(Arc::new(index), layout.clone(), cache.path()).unwrap();
        async move { reader.verify_complete().await }
    };
    verify(LayerIndex::decode("good", &good).unwrap())
        .await
        .unwrap();
    // Indexes that are well formed and name the right layer, but say one thing wrong about a
    // file: what a registry could serve. The spans are all local (and match); the file table
    // does not match the blob.
    let changed = |change: &dyn Fn(&mut Entry)| {
        let mut index = LayerIndex::decode("good", &good).unwrap();
        let file = index
            .entries
            .iter_mut()
            .find(|e| e.kind == EntryKind::File && e.size > 1 && e.sparse.is_none())
            .unwrap();
        change(file);
        LayerIndex::decode("changed", &index.encode().unwrap()).unwrap()
    };
    for (what, index) in [
        ("digest", changed(&|e| e.digest = Some([7; 32]))),
        ("size", changed(&|e| e.size -= 1)),
        ("mode", changed(&|e| e.mode ^= 0o4000)),
    ] {
        let err = verify(index).await.unwrap_err().to_string();
        assert!(
            err.contains("differs from the index rebuilt from the verified blob"),
            "{what}: {err}"
        );
    }
}

#[tokio::test]
async fn the_check_of_a_layer_follows_its_spans_as_they_arrive() {
    let (layout, image) = open(&format!("oci:{}:layers", layout_dir().display())).await;
    let layer = &image.layers[0];
    let built = build(&layout, layer, None, BuildOptions::spans_of(64 << 10))
        .await
        .unwrap();
    assert!(built.spans.len() > 4, "{} spans", built.spans.len());
    let good = built.encode().unwrap();
    let mut wrong = LayerIndex::decode("good", &good).unwrap();
    let file = wrong
        .entries
        .iter_mut()
        .find(|e| e.kind == EntryKind::File && e.size > 1)
        .unwrap();
    file.mode ^= 0o4000;
    let wrong = wrong.encode().unwrap();
    for (what, bytes, passes) in [("right index", &good, true), ("wrong index", &wrong, false)] {
        let cache = tempfile::tempdir().unwrap();
        let index = Arc::new(LayerIndex::decode(what, bytes).unwrap());
        let reader = LayerReader::new(index.clone(), layout.clone(), cache.path()).unwrap();
        // Started before anything is local: it waits for the first span.
        let check = reader.start_verification().unwrap();
        // The spans arrive last first, as readers in a random order would fetch them.
        for i in (0..index.spans.len()).rev() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(
                !check.is_finished(),
                "{what}: ended before span {i} arrived"
            );
            reader.ensure(i..=i).await.unwrap();
        }
        let result = tokio::time::timeout(std::time::Duration::from_secs(60), check.finish())
            .await
            .expect("the check ends once every span is in");
        match (passes, result) {
            (true, Ok(())) => {}
            (false, Err(e)) => assert!(
                e.to_string()
                    .contains("differs from the index rebuilt from the verified blob"),
                "{what}: {e}"
            ),
            (_, result) => panic!("{what}: {result:?}"),
        }
    }
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_never_gets_an_index() {
    use lazylayer_testkit::hostile::{Expect, HostileLayer, write_layout};
    // A small tar of random and repetitive content, which gzip levels compress differently.
    let mut rng = fastrand::Rng::with_seed(11);
    let mut builder = tar::Builder::new(Vec::new());
    for (name, len, alphabet) in [("random.bin", 20_000, 255), ("text.txt", 50_000, 4)] {
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..alphabet)).collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layer = HostileLayer {
        name: "regzipped",
        attack: "a blob stored under the digest of another compression of the same tar",
        tar: tar.clone(),
        expect: Expect::Refused("digest mismatch"),
    };
    // The layout's blob is `gzip -1 -n`; the manifest and config name it and its diff_id.
    write_layout(work.path(), &[layer]).unwrap();
    let (source, image) = open(&format!("oci:{}:regzipped", work.path().display())).await;
    let descriptor = image.layers[0].clone();
    let diff_id = image.config_summary.rootfs.diff_ids[0].clone();
    let blob_file = work
        .path()
        .join("blobs/sha256")
        .join(descriptor.digest.hex());
    let original = std::fs::read(&blob_file).unwrap();
    build(
        &source,
        &descriptor,
        Some(&diff_id),
        BuildOptions::default(),
    )
    .await
    .unwrap();
    // Level 9 instead of 1: the same tar (and diff_id) in fewer bytes. Padded with zeros
    // after the gzip member (which decompressors and the indexer accept) to the original's
    // size, only the digest tells it from the blob the manifest names.
    let regzipped = run("gzip -9 -n -c", &tar);
    assert_eq!(run("gzip -dc", &regzipped), tar, "same tar, same diff_id");
    assert!(
        regzipped.len() < original.len(),
        "{} bytes",
        regzipped.len()
    );
    let mut same_size = regzipped.clone();
    same_size.resize(original.len(), 0);
    let (_dir, padded_source, padded) =
        layout_with_blob(&same_size, "application/vnd.oci.image.layer.v1.tar+gzip");
    build(
        &padded_source,
        &padded,
        Some(&diff_id),
        BuildOptions::default(),
    )
    .await
    .expect("the padded blob is a good layer under its own digest");
    for (blob, needle) in [
        (&same_size, "digest mismatch"),
        (&regzipped, "size mismatch"),
    ] {
        std::fs::write(&blob_file, blob).unwrap();
        let err = build(
            &source,
            &descriptor,
            Some(&diff_id),
            BuildOptions::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "expected {needle:?}: {err}");
        // The same through the streaming build a daemon uses (which keeps the blob's bytes).
        let spans = tempfile::tempdir().unwrap();
        let err = lazylayer_index::build_and_cache(
            &source,
            &descriptor,
            Some(&diff_id),
            BuildOptions::default(),
            spans.path(),
            &|_| {},
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "expected {needle:?}: {err}");
    }
}

#[test]
fn the_gnu_tar_fuzz_seeds_index_with_every_header_form() {
    // fuzz/make-seeds.sh makes these with GNU tar; a seed that failed to index would only
    // exercise the fuzz target's error paths.
    let corpus = lazylayer_testkit::repo_root().join("fuzz/corpus/tar_table");
    let index = |name: &str| -> HashMap<Vec<u8>, Entry> {
        let tar = std::fs::read(corpus.join(name)).unwrap();
        let layer = BlobDescriptor {
            digest: Digest::sha256(&tar),
            media_type: "application/vnd.oci.image.layer.v1.tar".to_string(),
            size: tar.len() as u64,
        };
        let built = build_from_reader(
            std::io::Cursor::new(tar),
            &layer,
            None,
            BuildOptions::spans_of(4096),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        built
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.clone()))
            .collect()
    };
    let long = index("seed-gnu-long-names.tar");
    let (file, links): (Vec<&Entry>, Vec<&Entry>) = long
        .values()
        .filter(|e| matches!(e.kind, EntryKind::File | EntryKind::Hardlink))
        .partition(|e| e.kind == EntryKind::File);
    assert!(file.len() == 1 && file[0].path.len() > 100, "GNU L record");
    assert_eq!(links.len(), 2);
    assert!(
        links.iter().all(|l| l.link.as_ref() == Some(&file[0].path)),
        "GNU K record"
    );
    let relinked = index("seed-gnu-relinked.tar");
    assert_eq!(relinked[&b"b"[..]].kind, EntryKind::File);
    assert_eq!(relinked[&b"l1"[..]].kind, EntryKind::Dir);
    let base256 = index("seed-gnu-base256.tar");
    assert_eq!(base256[&b"size-in-base-256"[..]].size, 17);
    let old = &base256[&b"big-ids-old-time"[..]];
    assert_eq!(
        (old.uid, old.gid, old.mtime),
        (3_000_000, 4_000_000, -86400)
    );
    for seed in ["seed-pax-sparse-1.0.tar", "seed-pax-sparse-0.1.tar"] {
        let sparse = &index(seed)[&b"sparse.img"[..]];
        assert_eq!(sparse.size, 1 << 20, "{seed}");
        assert!(
            sparse.sparse.is_some() && sparse.stored_size() < 64 << 10,
            "{seed}"
        );
    }
    let nodes = index("seed-pax-nodes-xattrs.tar");
    assert_eq!(nodes[&b"null"[..]].device, Some((1, 3)));
    assert_eq!(nodes[&b"loop7"[..]].kind, EntryKind::BlockDevice);
    assert_eq!(nodes[&b"fifo"[..]].kind, EntryKind::Fifo);
    assert_eq!(nodes[&b"setuid"[..]].mode, 0o4755);
    assert_eq!(nodes[&b"setuid"[..]].mtime_nsec, 123_456_789);
    assert_eq!(nodes[&b"setgid"[..]].mode, 0o2755);
    assert_eq!(nodes[&b"sticky"[..]].mode, 0o1777);
    assert_eq!(
        nodes[&b"with-xattrs"[..]].xattrs,
        vec![
            (b"user.binary".to_vec(), vec![0x00, 0xff, 0x10]),
            (b"user.lazylayer.seed".to_vec(), b"a value".to_vec()),
        ]
    );
}

#[test]
fn the_index_decode_fuzz_seeds_are_valid_indexes() {
    // A seed in an old format is refused at the header, and fuzzing from it never reaches the
    // metadata, spans and entries (as happened when the format went to version 2).
    let corpus = lazylayer_testkit::repo_root().join("fuzz/corpus/index_decode");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("seed-") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        LayerIndex::decode(&name, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        seeds += 1;
    }
    assert!(seeds >= 3, "{seeds} seeds in {}", corpus.display());
}

/// A profile's spans come in the order its files do (the order a workload first waited for
/// them), each once, so its prefetch starts with what is needed first, not with the start of
/// the layer.
#[tokio::test]
async fn a_profile_s_spans_come_in_the_order_of_its_files() {
    let (_, _, index) = debian_layer().await;
    let with_data: Vec<usize> = (0..index.entries.len())
        .filter(|&i| index.entries[i].stored_size() > 0)
        .collect();
    let (early, late) = (with_data[0], *with_data.last().unwrap());
    let early_span = index.span_at(index.entries[early].data_offset);
    let late_span = index.span_at(index.entries[late].data_offset);
    assert!(early_span < late_span, "{early_span} {late_span}");

    let spans = index.spans_of(&[late, early, late]);
    assert_eq!(spans.first(), Some(&late_span), "{spans:?}");
    assert_eq!(spans.last(), Some(&early_span), "{spans:?}");
    let mut unique = spans.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), spans.len(), "each span once: {spans:?}");
    // A directory has no data; an entry number past the table is ignored.
    let dir = index
        .entries
        .iter()
        .position(|e| e.kind == EntryKind::Dir)
        .unwrap();
    assert!(index.spans_of(&[dir, usize::MAX]).is_empty());
}

/// The GETs of the index blob `index` the proxy has seen, with their Range headers.
fn index_gets(proxy: &FaultProxy, index: &Digest) -> Vec<Option<String>> {
    let path = format!("/blobs/{index}");
    proxy
        .exchanges()
        .iter()
        .filter(|e| e.method == "GET" && e.target.contains(&path))
        .map(|e| e.range.clone())
        .collect()
}

/// An index pushed with its head's digest is fetched head first (one ranged GET of the header
/// and metadata); stored, it has a hole where its windows go, and each window is fetched,
/// checked and written into it when a read first decompresses from its checkpoint. Wrong
/// window bytes are an error, never data; once the whole layer was read the stored index is
/// the registry's, byte for byte. A head that does not match its digest is refused.
#[tokio::test]
async fn an_index_fetched_head_first_fetches_each_window_when_a_read_needs_it() {
    use lazylayer_index::distribution::{IndexOrigin, RemoteIndex, fetch_index};
    use lazylayer_index::{IndexHead, IndexStore, SpanStart};
    use lazylayer_source::registry::Body;

    let (_, layer, built) = debian_layer().await;
    let encoded = built.encode().unwrap();
    assert_eq!(
        encoded[8..12],
        4u32.to_le_bytes(),
        "an index with windows is version 4"
    );
    let head = IndexHead::of(&encoded).expect("a version 4 index with windows has a head");
    let windows = built
        .spans
        .iter()
        .filter(|s| matches!(s.start, SpanStart::Deflate { .. }))
        .count();
    assert!(windows > 10, "{windows} windows");
    assert!(
        head.size * 3 < encoded.len() as u64,
        "the head is a small part"
    );
    let blob = BlobDescriptor {
        digest: Digest::sha256(&encoded),
        media_type: lazylayer_index::INDEX_MEDIA_TYPE.to_string(),
        size: encoded.len() as u64,
    };
    let registry = shared_registry();
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    let (source, _) = open(&format!("{}/test/debian:bookworm", proxy.host())).await;
    let ImageSource::Registry { repository, .. } = &source else {
        unreachable!("a registry source");
    };
    repository
        .push_blob(&blob, Body::Bytes(encoded.clone().into()))
        .await
        .unwrap();

    // A head that does not match the digest its artifact gives is refused.
    let lying = RemoteIndex {
        blob: blob.clone(),
        head: Some(IndexHead {
            size: head.size,
            digest: Digest::sha256(b"another head"),
        }),
    };
    let err = fetch_index(repository, &lying, &layer).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    let before = index_gets(&proxy, &blob.digest).len();
    let remote = RemoteIndex {
        blob: blob.clone(),
        head: Some(head.clone()),
    };
    let fetched = fetch_index(repository, &remote, &layer).await.unwrap();
    let gets = index_gets(&proxy, &blob.digest);
    assert_eq!(
        gets[before..],
        [Some(format!("bytes=0-{}", head.size - 1))],
        "the head only"
    );
    assert_eq!(fetched.missing_windows(), windows);
    assert_eq!(fetched.entries, built.entries);

    let root = tempfile::tempdir().unwrap();
    let store = IndexStore::new(root.path());
    store.put(&layer, &fetched, IndexOrigin::Bound).unwrap();
    let index = Arc::new(store.get(&layer).unwrap().unwrap());
    let windows_source = index.windows_source().unwrap();
    assert_eq!(windows_source.blob, blob.digest);
    assert_eq!(
        windows_source.repository,
        format!("{}/test/debian", proxy.host())
    );
    assert_eq!(index.missing_windows(), windows);
    let stored_path = root.path().join("indexes/sha256").join(layer.digest.hex());
    assert_eq!(
        std::fs::metadata(&stored_path).unwrap().len(),
        encoded.len() as u64
    );

    // A file far into the layer: one window, its checkpoint's, fetched with its spans.
    let extracted = extract(&blob_path(&layer.digest));
    let cache = tempfile::tempdir().unwrap();
    let reader = LayerReader::new(index.clone(), source.clone(), cache.path()).unwrap();
    let entry = index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.size > 1000)
        .find(|e| {
            let span = index.span_at(e.data_offset);
            index.checkpoint_of(span) > 0
                && index.checkpoint_of(index.span_at(e.data_offset + e.size - 1))
                    == index.checkpoint_of(span)
        })
        .unwrap()
        .clone();
    let before = index_gets(&proxy, &blob.digest).len();
    let got = reader.read(&entry, 0, entry.size).await.unwrap();
    assert!(got == std::fs::read(on_disk(extracted.path(), &entry)).unwrap());
    let checkpoint = index.checkpoint_of(index.span_at(entry.data_offset));
    let window = index.window_range(checkpoint).unwrap();
    assert_eq!(
        index_gets(&proxy, &blob.digest)[before..],
        [Some(format!("bytes={}-{}", window.start, window.end - 1))]
    );
    assert_eq!(index.missing_windows(), windows - 1);

    // Wrong window bytes from the registry are an error, not data, and are not kept.
    let other = index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.size > 1000)
        .find(|e| {
            let c = index.checkpoint_of(index.span_at(e.data_offset));
            c != checkpoint
                && !index.window_is_local(c)
                && index.checkpoint_of(index.span_at(e.data_offset + e.size - 1)) == c
        })
        .unwrap()
        .clone();
    proxy.add_rule(
        Rule::new(Fault::CorruptAt { at: 5 })
            .on_path(&blob.digest.to_string())
            .always(),
    );
    let err = reader.read(&other, 0, other.size).await.unwrap_err();
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    assert_eq!(index.missing_windows(), windows - 1);
    proxy.clear_rules();

    // The whole layer: every window comes, and the stored index is the registry's blob.
    let whole = reader
        .read_uncompressed(0..index.uncompressed_size)
        .await
        .unwrap();
    assert_eq!(Digest::sha256(&whole), index.diff_id);
    assert_eq!(index.missing_windows(), 0);
    assert!(std::fs::read(&stored_path).unwrap() == encoded);
    // A daemon opening it again finds every window local.
    assert_eq!(store.get(&layer).unwrap().unwrap().missing_windows(), 0);
}

/// Resolving an image whose image index binds an index artifact fetches the artifact's
/// manifest alongside the image manifest, not after it (a pull saves a round trip in a row),
/// and finding the bound indexes then asks the registry for no manifest again.
#[tokio::test]
async fn resolving_fetches_the_bound_artifact_alongside_the_image_manifest() {
    use lazylayer_index::distribution::{
        ARTIFACT_TYPE, IndexUpload, bind_artifact, find_bound_indexes, push_indexes,
    };
    use lazylayer_source::registry::Body;

    let (_, layer, built) = debian_layer().await;
    let encoded = built.encode().unwrap();
    let registry = shared_registry();
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    let (source, image) = open(&format!("{}/test/debian:bookworm", proxy.host())).await;
    let ImageSource::Registry { repository, .. } = &source else {
        unreachable!("a registry source");
    };
    let upload = IndexUpload {
        layer: layer.clone(),
        digest: Digest::sha256(&encoded),
        size: encoded.len() as u64,
        head: lazylayer_index::IndexHead::of(&encoded),
        body: Body::Bytes(encoded.clone().into()),
    };
    let artifact = push_indexes(repository, &image, &[upload]).await.unwrap();
    // A tag of this test's own: others resolve `bookworm` as it was.
    let tag = "bound-alongside";
    bind_artifact(repository, &image, tag, &artifact, ARTIFACT_TYPE)
        .await
        .unwrap();

    // The image manifest takes three seconds to arrive; the artifact's is asked for meanwhile.
    let manifest_path = format!("/manifests/{}", image.manifest.digest);
    let artifact_path = format!("/manifests/{}", artifact.digest);
    proxy.add_rule(
        Rule::new(Fault::StallAfter {
            after: 0,
            pause: Some(std::time::Duration::from_secs(3)),
        })
        .on_path(&manifest_path),
    );
    let reference: ImageReference = format!("{}/test/debian:{tag}", proxy.host())
        .parse()
        .unwrap();
    let bound = ImageSource::open(&reference, &client()).unwrap();
    let resolving = tokio::spawn(async move {
        let manifest = bound
            .resolve_manifest(&PlatformChoice::host(), &[ARTIFACT_TYPE])
            .await;
        (bound, manifest)
    });
    let asked = |path: &str| {
        proxy
            .exchanges()
            .iter()
            .any(|e| e.method == "GET" && e.target.contains(path))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(asked(&artifact_path) && asked(&manifest_path)) && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        asked(&manifest_path),
        "the image manifest was asked for: {:?}",
        proxy.exchanges()
    );
    assert!(asked(&artifact_path), "the artifact manifest was asked for");
    assert!(
        !resolving.is_finished(),
        "the artifact manifest was asked for while the image manifest still arrived"
    );
    let (bound, manifest) = resolving.await.unwrap();
    let manifest = manifest.unwrap();
    assert_eq!(manifest.manifest.digest, image.manifest.digest);
    let ImageSource::Registry { repository, .. } = &bound else {
        unreachable!("a registry source");
    };
    let manifest_gets = || {
        proxy
            .exchanges()
            .iter()
            .filter(|e| e.target.contains("/manifests/"))
            .count()
    };
    let before = manifest_gets();
    let found = find_bound_indexes(repository, &manifest).await.unwrap();
    assert!(found.by_layer.contains_key(&layer.digest), "{found:?}");
    assert_eq!(
        manifest_gets(),
        before,
        "the artifact manifest came with the image's"
    );
    // The config comes after, and completes the image as `resolve` gives it.
    let resolved = bound
        .with_config(manifest, &PlatformChoice::host())
        .await
        .unwrap();
    assert_eq!(resolved.config.digest, image.config.digest);
    assert_eq!(resolved.config_bytes, image.config_bytes);
}
