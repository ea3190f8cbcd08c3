//! `lazylayer gc` and `lazylayer rmi IMAGE`: free the disk that no image and no mount needs.

use clap::Args;
use lazylayer_daemon::{Request, client};
use lazylayer_overlay::MountTables;
use lazylayer_store::{GcReport, InUse, Phase, Store};

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
    let store = Store::new(&global.root);
    if !global.root.exists() {
        return crate::output::print("nothing to collect: the store does not exist\n");
    }
    let _lock = store.lock_for_gc()?;
    lazylayer_engine::clean_stale_runs(&store);
    let in_use = in_use(&store).await?;
    let report = store.collect_garbage(&in_use, args.dry_run)?;
    crate::output::print(&describe(&report, args.dry_run))
}

/// What must stay although no image references it: layers an overlay still has as a lower (in
/// any mount namespace) or that the daemon is still filling, and mounts still mounted.
async fn in_use(store: &Store) -> anyhow::Result<InUse> {
    let tables = MountTables::scan()
        .map_err(|e| anyhow::anyhow!("reading the mount tables under /proc: {e}"))?;
    let mut in_use = InUse::default();
    for digest in store.layer_digests()? {
        if tables.uses(&store.layer_fs(&digest)) || tables.uses(&store.fuse_mountpoint(&digest)) {
            in_use
                .layers
                .insert(digest, "an overlay mount still uses it".to_string());
        }
    }
    if let Ok(listing) = std::fs::read_dir(store.mounts_dir()) {
        for dir in listing.flatten().map(|e| e.path()) {
            if tables.uses(&dir.join("upper")) {
                in_use.mount_dirs.insert(dir);
            }
        }
    }
    if let Ok(response) = client::request(&store.socket(), &Request::Status).await
        && let Some(status) = response.status
    {
        for layer in status.layers.into_iter().filter(|l| l.phase == Phase::Lazy) {
            in_use.layers.entry(layer.digest).or_insert_with(|| {
                "the daemon is still filling it (collect again once it has detached)".to_string()
            });
        }
    }
    Ok(in_use)
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
