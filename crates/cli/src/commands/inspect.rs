//! `lazylayer inspect IMAGE`: what an image is made of, as resolved for one platform.

use std::fmt::Write as _;

use clap::Args;
use lazylayer_source::{
    BlobDescriptor, ImageReference, ImageSource, PlatformChoice, ResolvedImage,
};

use crate::commands::registry_client;
use crate::options::GlobalArgs;

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
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LayerOutput<'a> {
    #[serde(flatten)]
    blob: &'a BlobDescriptor,
    diff_id: Option<String>,
}

/// Runs `inspect`.
pub async fn run(global: &GlobalArgs, args: InspectArgs) -> anyhow::Result<()> {
    let reference: ImageReference = args.image.parse()?;
    let choice = PlatformChoice::from_flag(args.platform.as_deref())?;
    let client = registry_client(global)?;
    let source = ImageSource::open(&reference, &client)?;
    let image = source.resolve(&choice).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&to_output(&image))? + "\n"
    } else {
        render_text(&image)
    };
    print!("{text}");
    Ok(())
}

fn to_output(image: &ResolvedImage) -> InspectOutput<'_> {
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
            })
            .collect(),
    }
}

fn render_text(image: &ResolvedImage) -> String {
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
    }
    out
}

/// Sizes as people read them: `95.1 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(95_110_533), "90.7 MiB");
    }
}
