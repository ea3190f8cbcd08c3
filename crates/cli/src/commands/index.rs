//! `lazylayer index IMAGE [--push]`: build the lazy index of every layer, keep it under the
//! root, and attach the indexes to the image in its registry.

use std::time::Instant;

use clap::Args;
use lazylayer_index::distribution::{
    ARTIFACT_TYPE, IndexOrigin, IndexTrust, IndexUpload, bind_artifact, push_indexes,
};
use lazylayer_index::local::StoredIndex;
use lazylayer_index::{BuildOptions, DEFAULT_CONTINUATION, DEFAULT_SPACING, IndexStore, build};
use lazylayer_source::registry::Body;
use lazylayer_source::{BlobDescriptor, ImageReference, ImageSource, PlatformChoice};

use crate::options::GlobalArgs;
use crate::shared::{human_size, registry_client};

/// Options of `index`.
#[derive(Args, Debug)]
pub struct IndexArgs {
    /// The image: HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:TAG].
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// Attach the indexes to the image in its registry: as an OCI artifact referring to the
    /// image manifest, and bound to it by re-pointing the tag at an OCI image index that lists
    /// the unchanged manifest and the artifact (so the tag, or the new index's digest, vouches
    /// for the lazy index, and `pull` uses it lazily by default).
    #[arg(long)]
    pub push: bool,

    /// Platform to pick from a multi-platform image (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Compressed bytes between decompression checkpoints: smaller spans fetch less for a
    /// small read and make a bigger index (suffixes K, M).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SPACING, value_parser = parse_size)]
    pub spacing: u64,

    /// Compressed bytes between the cuts of continuation spans in gzip layers: pieces with
    /// their own digest but no checkpoint, so a read fetches and verifies only from its
    /// checkpoint to the end of what it needs, not the whole span. Smaller pieces fetch less
    /// and add about 50 bytes each to the index; 0 turns them off (suffixes K, M).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CONTINUATION, value_parser = parse_continuation)]
    pub continuation: u64,

    /// Rebuild indexes that are already stored.
    #[arg(long)]
    pub force: bool,
}

fn parse_continuation(text: &str) -> Result<u64, String> {
    match size_of(text)? {
        size if size == 0 || size >= 16 << 10 => Ok(size),
        _ => Err(format!(
            "{text:?}: the continuation spacing is 0 or at least 16K"
        )),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    match size_of(text)? {
        size if size >= 64 << 10 => Ok(size),
        _ => Err(format!("{text:?}: the spacing must be at least 64K")),
    }
}

fn size_of(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&text[..i], text[i..].trim_start()),
        None => (text, ""),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let factor = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("unknown size unit in {text:?} (use K or M)")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn upload(layer: &BlobDescriptor, stored: StoredIndex) -> IndexUpload {
    IndexUpload {
        layer: layer.clone(),
        digest: stored.digest,
        size: stored.size,
        head: stored.head,
        body: Body::File(stored.path),
    }
}

/// Runs `index`.
pub async fn run(global: &GlobalArgs, args: IndexArgs) -> anyhow::Result<()> {
    let reference: ImageReference = args.image.parse()?;
    if args.push && !matches!(reference, ImageReference::Registry(_)) {
        anyhow::bail!("--push needs an image in a registry, not {reference}");
    }
    let choice = PlatformChoice::from_flag(args.platform.as_deref())?;
    let client = registry_client(global)?;
    let source = ImageSource::open(&reference, &client)?;
    let image = source.resolve(&choice).await?;
    // As root, the store is made private to root; another user indexing into a --root of
    // their own keeps what they own (chmod would fail only on a root they do not own).
    if rustix::process::geteuid().is_root() {
        lazylayer_store::Store::new(&global.root).make_private()?;
    }
    let store = IndexStore::new(&global.root);
    let count = image.layers.len();
    let mut built = Vec::with_capacity(count);
    for (i, layer) in image.layers.iter().enumerate() {
        let label = format!("layer {}/{count} {}", i + 1, layer.digest);
        // Only an index this machine trusts is pushed again: one fetched as an unbound
        // referrer must not come out bound.
        // One fetched head first whose windows are not all here yet is built again.
        if !args.force
            && let (Some((index, _)), Some(stored)) = (
                store.get_trusted(layer, IndexTrust::Bound)?,
                store.stored(layer)?,
            )
            && index.missing_windows() == 0
        {
            eprintln!(
                "{label}: already indexed ({} spans, {} entries)",
                index.spans.len(),
                index.entries.len()
            );
            built.push(upload(layer, stored));
            continue;
        }
        eprintln!("{label}: indexing {} ...", human_size(layer.size));
        let started = Instant::now();
        let diff_id = image.config_summary.rootfs.diff_ids.get(i);
        let index = build(
            &source,
            layer,
            diff_id,
            BuildOptions {
                spacing: args.spacing,
                continuation: args.continuation,
            },
        )
        .await?;
        let stored = store.put(layer, &index, IndexOrigin::Local)?;
        eprintln!(
            "{label}: {} spans, {} entries, index {} ({:.2}% of the layer) in {:.1?} -> {}",
            index.spans.len(),
            index.entries.len(),
            human_size(stored.size),
            stored.size as f64 * 100.0 / layer.size.max(1) as f64,
            started.elapsed(),
            stored.path.display()
        );
        built.push(upload(layer, stored));
    }
    if args.push {
        let ImageSource::Registry { repository, .. } = &source else {
            unreachable!("checked above");
        };
        let artifact = push_indexes(repository, &image, &built).await?;
        let ImageReference::Registry(named) = &reference else {
            unreachable!("checked above");
        };
        let bound = match (&named.digest, &named.tag) {
            (None, Some(tag)) => {
                match bind_artifact(repository, &image, tag, &artifact, ARTIFACT_TYPE).await {
                    Ok(digest) => format!(
                        "; tag {tag} now names image index {digest}, which binds the manifest \
                         (unchanged) and its lazy index: pull by the tag, or pin that digest"
                    ),
                    Err(e) => format!(
                        "; not bound to the image ({e}): pull uses it only with --index-trust \
                         referrer"
                    ),
                }
            }
            _ => format!(
                "; not bound: {} names a manifest by digest, which cannot list its index (push by \
                 a tag to bind it); pull uses it only with --index-trust referrer",
                image.reference
            ),
        };
        crate::output::print(&format!(
            "pushed index artifact {} for {}{bound}\n",
            artifact.digest, image.reference
        ))
    } else {
        crate::output::print(&format!(
            "indexed {count} layer(s) of {}; `lazylayer index --push` attaches them to the image\n",
            image.reference
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("1K").is_err());
        assert!(parse_size("2G").is_err());
        assert!(parse_size("x").is_err());
    }
}
