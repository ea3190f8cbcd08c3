//! `lazylayer gc` and `lazylayer rmi IMAGE`: free the disk that no image and no mount needs.

use clap::Args;
use lazylayer_engine::GcReport;

use crate::options::GlobalArgs;
use crate::shared::{engine, human_size};

/// Options of `gc`.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `rmi`.
#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Pulled images (references or manifest digests) to forget.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
    /// Forget the images but leave their layers for a later `gc`.
    #[arg(long)]
    pub no_gc: bool,
}

/// Runs `rmi`: forgets each image, then collects what nothing references any more.
pub async fn run_rmi(global: &GlobalArgs, args: RmiArgs) -> anyhow::Result<()> {
    let engine = engine(global)?;
    let store = engine.store();
    // Find them all first: a typo forgets nothing.
    let records = args
        .images
        .iter()
        .map(|image| engine.find_image(image))
        .collect::<Result<Vec<_>, _>>()?;
    // An image a service holds (containerd's snapshots) refuses before any is forgotten.
    for record in &records {
        if let Some(holder) = store.image_holders(&record.manifest)?.into_iter().next() {
            return Err(lazylayer_store::Error::Held {
                image: record.reference.clone(),
                holder,
            }
            .into());
        }
    }
    let mut text = String::new();
    for record in &records {
        store.forget_image(&record.manifest)?;
        text.push_str(&format!(
            "forgot {} ({})\n",
            record.reference, record.manifest
        ));
    }
    crate::output::print(&text)?;
    if args.no_gc {
        return Ok(());
    }
    run(global, GcArgs { dry_run: false }).await
}

/// Runs `gc`.
pub async fn run(global: &GlobalArgs, args: GcArgs) -> anyhow::Result<()> {
    if !global.root.exists() {
        return crate::output::print("nothing to collect: the store does not exist\n");
    }
    let report = engine(global)?.collect_garbage(args.dry_run).await?;
    crate::output::print(&describe(&report, args.dry_run))
}

fn describe(report: &GcReport, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut text = String::new();
    for removed in &report.removed {
        text.push_str(&format!(
            "{verb} {} {} ({})\n",
            removed.kind,
            removed.path.display(),
            human_size(removed.bytes)
        ));
    }
    for (digest, why) in &report.kept {
        text.push_str(&format!("kept layer {digest}: {why}\n"));
    }
    let count = |kind| report.removed.iter().filter(|r| r.kind == kind).count();
    text.push_str(&format!(
        "{}: {} layers, {} indexes, {} span caches, {} profiles, {} mount directories; {} freed\n",
        if dry_run { "gc (dry run)" } else { "gc" },
        count("layer"),
        count("index"),
        count("spans"),
        count("profile"),
        count("mount"),
        human_size(report.bytes())
    ));
    text
}
