//! `lazylayer verify IMAGE`: every entry of the image's layers against the index (metadata)
//! and every populated file against its content digest. Exits non-zero on any difference, and
//! for a layer that failed (its index proved wrong: the tree cannot be trusted whatever it
//! matches).

use std::sync::Arc;

use clap::Args;
use lazylayer_source::{ImageReference, ImageSource};
use lazylayer_store::verify::verify_layer;
use lazylayer_store::{Phase, Store};

use crate::options::GlobalArgs;
use crate::shared::{engine, registry_client};

/// Options of `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A pulled image.
    #[arg(value_name = "IMAGE")]
    pub image: String,
}

/// Runs `verify`.
pub async fn run(global: &GlobalArgs, args: VerifyArgs) -> anyhow::Result<()> {
    let store = Store::new(&global.root);
    let image = engine(global)?.find_image(&args.image)?;
    let reference: ImageReference = image.reference.parse()?;
    let source = ImageSource::open(&reference, &registry_client(global)?)?;
    let mut problems = 0;
    let mut text = String::new();
    for layer in &image.layers {
        let phase = store.phase(&layer.digest)?;
        let Some(index) = store.indexes().get(layer)? else {
            text.push_str(&format!("{}: no index\n", layer.digest));
            problems += 1;
            continue;
        };
        let opened = store.open_layer(Arc::new(index), source.clone())?;
        let detached = phase == Some(Phase::Detached);
        let found = verify_layer(&opened.tree, &opened.index, &|i| {
            detached || opened.is_populated(i)
        });
        let (files, populated) = opened.progress();
        text.push_str(&format!(
            "{}: {}, {populated}/{files} files populated, {} problem(s)\n",
            layer.digest,
            format!("{:?}", phase.unwrap_or(Phase::Creating)).to_lowercase(),
            found.len()
        ));
        for problem in &found {
            text.push_str(&format!("  {problem}\n"));
        }
        problems += found.len();
        if let Some(reason) = store.failure(&layer.digest)? {
            text.push_str(&format!(
                "  failed: {reason}\n  (its index does not match the blob: `lazylayer rmi {}` and pull again)\n",
                image.reference
            ));
            problems += 1;
        }
    }
    crate::output::print(&text)?;
    if problems > 0 {
        anyhow::bail!("{problems} difference(s) between the layers and their indexes");
    }
    Ok(())
}
