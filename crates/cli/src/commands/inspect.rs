//! `lazylayer inspect IMAGE`: what an image is made of, as resolved for one platform.

use std::fmt::Write as _;

use clap::Args;
use lazylayer_index::{Compression, Entry, EntryKind, IndexStore, LayerIndex, SpanStart};
use lazylayer_source::{
    BlobDescriptor, ImageReference, ImageSource, PlatformChoice, ResolvedImage,
};

use crate::commands::layer_indexes::{self, FoundIndex};
use crate::options::GlobalArgs;
use crate::shared::{human_size, registry_client};
use lazylayer_index::distribution::IndexOrigin;

/// Options of `inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The image: HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:TAG].
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT] (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Also list each layer's spans and files from its lazy index (offsets in the
    /// uncompressed stream, the spans holding each file's data).
    #[arg(long)]
    pub files: bool,
}

/// The JSON form of `inspect`'s answer (stable field names for scripts).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct InspectOutput<'a> {
    reference: &'a str,
    manifest: &'a BlobDescriptor,
    index: Option<&'a BlobDescriptor>,
    platform: &'a lazylayer_source::Platform,
    config: &'a BlobDescriptor,
    layers: Vec<LayerOutput<'a>>,
    /// The prefetch profile recorded for the image under --root, if any.
    profile: Option<ProfileOutput>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ProfileOutput {
    path: String,
    files: usize,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LayerOutput<'a> {
    #[serde(flatten)]
    blob: &'a BlobDescriptor,
    diff_id: Option<String>,
    /// The lazy index, or null when the layer has none.
    index: Option<IndexOutput>,
    /// The layer's own table of contents (`eStargz`, `zstd:chunked`), from which pull indexes
    /// it at file granularity; null when it has none.
    table_of_contents: Option<&'static str>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexOutput {
    digest: String,
    size: u64,
    /// Who vouches for it: `local` (built here), `bound` (the image index names it) or
    /// `referrer` (nobody: used only with `--index-trust referrer`).
    origin: IndexOrigin,
    /// Whether it is in the local store.
    stored: bool,
    compression: &'static str,
    spans: usize,
    entries: usize,
    /// True when the whole layer is one span (a single zstd frame): any read fetches it all.
    single_span: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    span_table: Option<Vec<SpanOutput>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_table: Option<Vec<FileOutput>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SpanOutput {
    /// The span decompression starts from (this one, or for a continuation span the
    /// checkpoint before it): a read of this span fetches `checkpoint..=` it.
    checkpoint: usize,
    compressed_start: u64,
    compressed_end: u64,
    uncompressed_start: u64,
    uncompressed_end: u64,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct FileOutput {
    path: String,
    kind: EntryKind,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spans: Option<(usize, usize)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    opaque: bool,
}

/// Runs `inspect`.
pub async fn run(global: &GlobalArgs, args: InspectArgs) -> anyhow::Result<()> {
    let reference: ImageReference = args.image.parse()?;
    let choice = PlatformChoice::from_flag(args.platform.as_deref())?;
    let client = registry_client(global)?;
    let source = ImageSource::open(&reference, &client)?;
    let image = source.resolve(&choice).await?;
    let store = IndexStore::new(&global.root);
    let indexes = layer_indexes::find(&store, &source, &image).await?;
    if args.files
        && let Some(i) = indexes.iter().position(Option::is_none)
    {
        anyhow::bail!(
            "layer {} ({}) has no lazy index; `lazylayer index {}` builds one",
            i + 1,
            image.layers[i].digest,
            args.image
        );
    }
    let profile_path =
        lazylayer_store::Store::new(&global.root).profile_path(&image.manifest.digest);
    let profile = lazylayer_store::Profile::load(&profile_path)?.map(|p| ProfileOutput {
        path: profile_path.display().to_string(),
        files: p.files.len(),
    });
    let text = if args.json {
        let mut output = to_output(&image, &indexes, args.files);
        output.profile = profile;
        serde_json::to_string_pretty(&output)? + "\n"
    } else {
        let mut text = render_text(&image, &indexes, args.files);
        if let Some(profile) = profile {
            text.push_str(&format!(
                "Profile:   {} files to prefetch ({})\n",
                profile.files, profile.path
            ));
        }
        text
    };
    crate::output::print(&text)
}

fn index_output(found: &FoundIndex, files: bool) -> IndexOutput {
    let index = &found.index;
    IndexOutput {
        digest: found.digest.to_string(),
        size: found.size,
        origin: found.origin,
        stored: found.stored,
        compression: index.compression.name(),
        spans: index.spans.len(),
        entries: index.entries.len(),
        single_span: single_span(index),
        span_table: files.then(|| {
            let checkpoints = checkpoints(index);
            index
                .spans
                .iter()
                .enumerate()
                .map(|(i, s)| SpanOutput {
                    checkpoint: checkpoints[i],
                    compressed_start: s.compressed_start,
                    compressed_end: s.compressed_end,
                    uncompressed_start: s.uncompressed_start,
                    uncompressed_end: index.span_uncompressed_end(i),
                })
                .collect()
        }),
        file_table: files.then(|| {
            index
                .entries
                .iter()
                .map(|e| FileOutput {
                    path: e.display_path(),
                    kind: e.kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    size: e.size,
                    data_offset: (e.kind == EntryKind::File).then_some(e.data_offset),
                    spans: file_spans(index, e),
                    link: e
                        .link
                        .as_ref()
                        .map(|l| String::from_utf8_lossy(l).into_owned()),
                    opaque: e.opaque,
                })
                .collect()
        }),
    }
}

/// The name of the table of contents layer `i` of `image` announces, if any.
fn table_of_contents(image: &ResolvedImage, i: usize) -> Option<&'static str> {
    let annotations = lazylayer_index::toc::layer_annotations(&image.manifest_bytes);
    let layer = &image.layers[i];
    lazylayer_index::toc::announced(&layer.media_type, annotations.get(i)?)
        .ok()
        .flatten()
        .map(|toc| toc.format.name())
}

/// What converting a single-frame zstd layer gains.
const ZSTD_CHUNKED_HINT: &str = "a single zstd frame: any read fetches the whole layer; as \
     zstd:chunked (`skopeo copy --dest-compress-format zstd:chunked`, `podman push \
     --compression-format zstd:chunked`) it is read by file, without an index";

/// A layer whose data is all in one span (a single zstd frame, or a small layer).
fn single_span(index: &LayerIndex) -> bool {
    index.spans.len() == 1 && index.compression == Compression::Zstd
}

/// Each span's checkpoint (see [`LayerIndex::checkpoint_of`]), in one pass.
fn checkpoints(index: &LayerIndex) -> Vec<usize> {
    let mut checkpoint = 0;
    (0..index.spans.len())
        .map(|i| {
            if index.spans[i].start != SpanStart::Continue {
                checkpoint = i;
            }
            checkpoint
        })
        .collect()
}

/// The first and last span holding a file's stored bytes.
fn file_spans(index: &LayerIndex, entry: &Entry) -> Option<(usize, usize)> {
    let stored = entry.stored_size();
    (entry.kind == EntryKind::File && stored > 0).then(|| {
        (
            index.span_at(entry.data_offset),
            index.span_at(entry.data_offset + stored - 1),
        )
    })
}

fn to_output<'a>(
    image: &'a ResolvedImage,
    indexes: &[Option<FoundIndex>],
    files: bool,
) -> InspectOutput<'a> {
    let diff_ids = &image.config_summary.rootfs.diff_ids;
    InspectOutput {
        reference: &image.reference,
        manifest: &image.manifest,
        index: image.index.as_ref(),
        platform: &image.platform,
        config: &image.config,
        layers: image
            .layers
            .iter()
            .enumerate()
            .map(|(i, blob)| LayerOutput {
                blob,
                diff_id: diff_ids.get(i).map(ToString::to_string),
                index: indexes[i].as_ref().map(|found| index_output(found, files)),
                table_of_contents: table_of_contents(image, i),
            })
            .collect(),
        profile: None,
    }
}

fn render_text(image: &ResolvedImage, indexes: &[Option<FoundIndex>], files: bool) -> String {
    let mut out = String::new();
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    let _ = writeln!(out, "Image:     {}", image.reference);
    let _ = writeln!(
        out,
        "Manifest:  {} ({}, {} bytes)",
        image.manifest.digest, image.manifest.media_type, image.manifest.size
    );
    if let Some(index) = &image.index {
        let _ = writeln!(out, "Index:     {} ({})", index.digest, index.media_type);
    }
    let _ = writeln!(out, "Platform:  {}", image.platform);
    let _ = writeln!(
        out,
        "Config:    {} ({} bytes)",
        image.config.digest, image.config.size
    );
    let _ = writeln!(
        out,
        "Layers:    {} ({} compressed)",
        image.layers.len(),
        human_size(total)
    );
    for (i, layer) in image.layers.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {:>2}  {}  {:>10}  {}",
            i + 1,
            layer.digest,
            human_size(layer.size),
            layer.media_type
        );
        match &indexes[i] {
            None => match table_of_contents(image, i) {
                Some(format) => {
                    let _ = writeln!(
                        out,
                        "      lazy index: none needed: its {format} table of contents (pull \
                         indexes the layer from it, by file; `lazylayer index --push` is not \
                         needed)"
                    );
                }
                None if Compression::from_media_type(&layer.media_type)
                    == Some(Compression::Zstd) =>
                {
                    let _ = writeln!(
                        out,
                        "      lazy index: none (`lazylayer index` builds one); {ZSTD_CHUNKED_HINT}"
                    );
                }
                None => {
                    let _ = writeln!(out, "      lazy index: none (`lazylayer index` builds one)");
                }
            },
            Some(found) => {
                let index = &found.index;
                let place = if found.stored { "stored" } else { "registry" };
                let origin = match found.origin {
                    IndexOrigin::Local => format!("{place}, built here"),
                    IndexOrigin::Bound => format!("{place}, bound to the image"),
                    IndexOrigin::Toc => {
                        format!("{place}, made from the layer's eStargz table of contents")
                    }
                    IndexOrigin::Referrer => format!(
                        "{place}, an unbound referrer: pull builds its own unless \
                         --index-trust referrer"
                    ),
                };
                let _ = writeln!(
                    out,
                    "      lazy index {} ({}, {origin}): {}, {} spans, {} entries{}",
                    found.digest,
                    human_size(found.size),
                    index.compression.name(),
                    index.spans.len(),
                    index.entries.len(),
                    if single_span(index) {
                        format!(" ({ZSTD_CHUNKED_HINT})")
                    } else {
                        String::new()
                    }
                );
                if found.origin == IndexOrigin::Referrer {
                    let _ = writeln!(
                        out,
                        "      used lazily, it is checked as reads come: a file's tar header \
                         before its data is served; symlink targets, directory modes, \
                         whiteouts and the metadata of files not yet opened only once the \
                         layer is complete"
                    );
                }
                if files {
                    render_files(&mut out, index);
                }
            }
        }
    }
    out
}

fn render_files(out: &mut String, index: &LayerIndex) {
    let _ = writeln!(
        out,
        "      {:>5}  {:>10}  {:>23}  {:>23}",
        "SPAN", "CHECKPOINT", "COMPRESSED", "UNCOMPRESSED"
    );
    let checkpoints = checkpoints(index);
    for (i, span) in index.spans.iter().enumerate() {
        let _ = writeln!(
            out,
            "      {i:>5}  {:>10}  {:>23}  {:>23}",
            checkpoints[i],
            format!("{}..{}", span.compressed_start, span.compressed_end),
            format!(
                "{}..{}",
                span.uncompressed_start,
                index.span_uncompressed_end(i)
            )
        );
    }
    let _ = writeln!(
        out,
        "      {:<4} {:>5} {:>11} {:>12} {:>12} {:>9}  PATH",
        "TYPE", "MODE", "UID:GID", "SIZE", "OFFSET", "SPANS"
    );
    for entry in &index.entries {
        let kind = match entry.kind {
            EntryKind::File => "f",
            EntryKind::Dir if entry.opaque => "d+o",
            EntryKind::Dir => "d",
            EntryKind::Symlink => "l",
            EntryKind::Hardlink => "h",
            EntryKind::CharDevice => "c",
            EntryKind::BlockDevice => "b",
            EntryKind::Fifo => "p",
            EntryKind::Whiteout => "w",
        };
        let offset = if entry.kind == EntryKind::File {
            entry.data_offset.to_string()
        } else {
            "-".to_string()
        };
        let spans = match file_spans(index, entry) {
            Some((a, b)) if a == b => a.to_string(),
            Some((a, b)) => format!("{a}-{b}"),
            None => "-".to_string(),
        };
        let link = match (&entry.kind, &entry.link) {
            (EntryKind::Symlink, Some(l)) => format!(" -> {}", String::from_utf8_lossy(l)),
            (EntryKind::Hardlink, Some(l)) => format!(" => {}", String::from_utf8_lossy(l)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "      {kind:<4} {:>04o} {:>11} {:>12} {offset:>12} {spans:>9}  {}{link}",
            entry.mode,
            format!("{}:{}", entry.uid, entry.gid),
            entry.size,
            entry.display_path()
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::shared::human_size;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(95_110_533), "90.7 MiB");
    }
}
