//! The lazy index benchmark (issue: lazy index): on the Debian test layer, one run measures
//! - index build time against `gzip -dc BLOB | tar -t` (goal: at most 1.25x),
//! - the bytes a cold read of a ~64 KiB file fetches, per checkpoint spacing, against the
//!   layer size, and the index size per spacing,
//! - full sequential reconstruction through the reader against `gzip -dc` (goal: >= 0.8x).

use std::process::{Command, Stdio};
use std::sync::Arc;

use lazylayer_index::{
    BuildOptions, DEFAULT_SPACING, EntryKind, LayerIndex, LayerReader, build_from_reader,
};
use lazylayer_source::{ImageReference, ImageSource, PlatformChoice, RegistryClient};
use lazylayer_testkit::fixtures::layout_dir;

use crate::{median, median_async};

/// Options of the index benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Image to measure (default: the Debian test image of the fixtures).
    #[arg(long)]
    image: Option<String>,
}

fn shell(command: &str) -> anyhow::Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "{command} failed");
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let image = args
        .image
        .unwrap_or_else(|| format!("oci:{}:bookworm", layout_dir().display()));
    let reference: ImageReference = image.parse()?;
    let client = RegistryClient::new(Default::default())?;
    let source = ImageSource::open(&reference, &client)?;
    let resolved = source.resolve(&PlatformChoice::host()).await?;
    let layer = resolved
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .ok_or_else(|| anyhow::anyhow!("no layers"))?
        .clone();
    let ImageSource::Layout { layout, .. } = &source else {
        anyhow::bail!("the benchmark reads the blob from an oci: layout");
    };
    let blob = layout.dir().join("blobs/sha256").join(layer.digest.hex());
    let blob_str = blob.display().to_string();
    anyhow::ensure!(
        layer.media_type.ends_with("gzip"),
        "the benchmark needs a gzip layer"
    );
    println!(
        "layer {} ({:.1} MiB gzip), {} runs each, medians",
        layer.digest,
        layer.size as f64 / 1048576.0,
        args.runs
    );

    // 1. Build time.
    let tar_t = median(args.runs, || {
        shell(&format!("gzip -dc {blob_str} | tar -t"))
    })?;
    let gzip_dc = median(args.runs, || shell(&format!("gzip -dc {blob_str}")))?;
    let build = |spacing: u64| -> anyhow::Result<LayerIndex> {
        let file = std::fs::File::open(&blob)?;
        Ok(build_from_reader(
            file,
            &layer,
            None,
            BuildOptions::spans_of(spacing),
        )?)
    };
    let build_time = median(args.runs, || build(DEFAULT_SPACING).map(|_| ()))?;
    println!();
    println!("{:<44} {:>10} {:>8}", "index build", "time", "ratio");
    println!(
        "{:<44} {:>9.2}s {:>8}",
        "gzip -dc | tar -t (baseline)",
        tar_t.as_secs_f64(),
        "1.00"
    );
    println!(
        "{:<44} {:>9.2}s {:>7.2}x",
        format!(
            "lazylayer index build ({} KiB spacing)",
            DEFAULT_SPACING >> 10
        ),
        build_time.as_secs_f64(),
        build_time.as_secs_f64() / tar_t.as_secs_f64()
    );

    // 2. Cold read cost and index size per spacing.
    println!();
    println!(
        "{:<10} {:>6} {:>12} {:>9} {:>16} {:>10}",
        "spacing", "spans", "index size", "% layer", "cold 64K read", "% layer"
    );
    let mut reconstruction_index = None;
    for spacing in [512u64 << 10, 1 << 20, 2 << 20, 4 << 20] {
        let index = Arc::new(build(spacing)?);
        let encoded = index.encode()?;
        let files: Vec<_> = index
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.size >= 48 << 10 && e.size <= 80 << 10)
            .cloned()
            .collect();
        // Average over every file of about 64 KiB, each read cold in a fresh cache.
        let mut fetched = 0u64;
        for entry in &files {
            let cache = tempfile::tempdir()?;
            let reader = LayerReader::new(index.clone(), source.clone(), cache.path())?;
            reader.read(entry, 0, entry.size).await?;
            fetched += reader.stats().bytes_fetched;
        }
        let average = fetched / files.len().max(1) as u64;
        println!(
            "{:<10} {:>6} {:>10.1}K {:>8.2}% {:>14.1}K {:>9.2}%",
            format!("{} KiB", spacing >> 10),
            index.spans.len(),
            encoded.len() as f64 / 1024.0,
            encoded.len() as f64 * 100.0 / layer.size as f64,
            average as f64 / 1024.0,
            average as f64 * 100.0 / layer.size as f64
        );
        if spacing == DEFAULT_SPACING {
            reconstruction_index = Some(index);
        }
    }

    // 3. Sequential reconstruction through the reader (spans local) vs gzip -dc.
    let index = reconstruction_index.expect("built");
    let cache = tempfile::tempdir()?;
    let reader = LayerReader::new(index.clone(), source.clone(), cache.path())?;
    reader.ensure(0..=index.spans.len() - 1).await?;
    let reconstruct = median_async(args.runs, || async {
        let mut total = 0u64;
        for i in 0..index.spans.len() {
            let (_, output) = reader.decompress(i..=i).await?;
            total += output.len() as u64;
        }
        anyhow::ensure!(total == index.uncompressed_size);
        Ok(())
    })
    .await?;
    let mib = index.uncompressed_size as f64 / 1048576.0;
    println!();
    println!(
        "{:<44} {:>10} {:>8}",
        "sequential reconstruction", "MiB/s", "ratio"
    );
    println!(
        "{:<44} {:>10.0} {:>8}",
        "gzip -dc (baseline)",
        mib / gzip_dc.as_secs_f64(),
        "1.00"
    );
    println!(
        "{:<44} {:>10.0} {:>7.2}x",
        "lazylayer reader, span by span (verified)",
        mib / reconstruct.as_secs_f64(),
        gzip_dc.as_secs_f64() / reconstruct.as_secs_f64()
    );
    Ok(())
}
