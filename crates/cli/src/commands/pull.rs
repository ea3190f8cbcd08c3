//! `lazylayer pull IMAGE`: make an image's layers available lazily and return once it can be
//! mounted.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use lazylayer_daemon::{Request, client};
use lazylayer_index::distribution::{fetch_index, find_indexes};
use lazylayer_index::{BuildOptions, build_and_cache};
use lazylayer_source::{ImageReference, ImageSource, PlatformChoice};
use lazylayer_store::{FrontendMode, ImageRecord, Phase, Store};

use crate::commands::inspect::human_size;
use crate::commands::{images, registry_client};
use crate::options::GlobalArgs;

/// How lazy layers are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// fanotify where the store's filesystem takes pre-content marks, FUSE elsewhere.
    Auto,
    /// fanotify pre-content events (Linux 6.14+, store on ext4, xfs or btrfs).
    Fanotify,
    /// A FUSE mount per lazy layer, with passthrough once a file is local (any kernel, any
    /// store filesystem).
    Fuse,
}

/// Options of `pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:TAG].
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// How lazy layers are served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Platform to pick from a multi-platform image (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
}

/// Runs `pull`.
pub async fn run(global: &GlobalArgs, args: PullArgs) -> anyhow::Result<()> {
    let (image, built_here) =
        pull_image_with(global, &args.image, args.platform.as_deref(), args.mode).await?;
    let mut text = format!(
        "pulled {} ({} layers); mount it with `lazylayer mount`\n",
        image.reference,
        image.layers.len()
    );
    if built_here > 0 {
        text.push_str(&format!(
            "note: {built_here} layer(s) had no lazy index and were fetched whole; after `lazylayer index --push {}` other machines load them lazily\n",
            args.image
        ));
    }
    crate::output::print(&text)
}

/// Pulls `image` lazily (see [`run`]); returns its record and how many layers had no index and
/// were fetched whole.
pub async fn pull_image(
    global: &GlobalArgs,
    image_ref: &str,
    platform: Option<&str>,
) -> anyhow::Result<(ImageRecord, usize)> {
    pull_image_with(global, image_ref, platform, Mode::Auto).await
}

/// Pulls `image` lazily, serving new lazy layers in `mode`.
pub async fn pull_image_with(
    global: &GlobalArgs,
    image_ref: &str,
    platform: Option<&str>,
    mode: Mode,
) -> anyhow::Result<(ImageRecord, usize)> {
    let reference: ImageReference = image_ref.parse()?;
    let choice = PlatformChoice::from_flag(platform)?;
    let client = registry_client(global)?;
    let source = ImageSource::open(&reference, &client)?;
    let image = source.resolve(&choice).await?;
    std::fs::create_dir_all(&global.root)?;
    let store = Store::new(&global.root);
    // Held until the image record names every layer: `gc` must not remove one meanwhile.
    let _lock = store.lock_for_pull()?;
    let pre_content = lazylayer_fanotify::supports_pre_content(&global.root)?;
    let frontend = match mode {
        Mode::Fanotify if !pre_content => anyhow::bail!(
            "the store {} is on a filesystem without fanotify pre-content support (ext4, xfs and \
             btrfs have it on Linux 6.14+; tmpfs and overlayfs do not): use a --root on one of \
             those, or --mode fuse",
            global.root.display()
        ),
        Mode::Fanotify => FrontendMode::Fanotify,
        Mode::Fuse => FrontendMode::Fuse,
        Mode::Auto if pre_content => FrontendMode::Fanotify,
        Mode::Auto => FrontendMode::Fuse,
    };
    let remote = match &source {
        ImageSource::Registry { repository, .. } => {
            Some((repository, find_indexes(repository, &image).await?))
        }
        ImageSource::Layout { .. } => None,
    };
    let mut built_here = 0;
    for (i, layer) in image.layers.iter().enumerate() {
        let label = format!("layer {}/{} {}", i + 1, image.layers.len(), layer.digest);
        // Another pull may be setting this layer up: wait for it, then find the layer ready.
        let _layer_lock = {
            let (store, digest) = (store.clone(), layer.digest.clone());
            tokio::task::spawn_blocking(move || store.lock_layer(&digest)).await??
        };
        if let Some(phase @ (Phase::Lazy | Phase::Detached)) = store.phase(&layer.digest)? {
            eprintln!("{label}: already in the store ({phase:?})");
            continue;
        }
        let mut index = store.indexes().get(layer)?;
        if index.is_none()
            && let Some((repository, descriptor)) = remote
                .as_ref()
                .and_then(|(repo, found)| Some((repo, found.by_layer.get(&layer.digest)?)))
        {
            match fetch_index(repository, descriptor, layer).await {
                Ok((fetched, _)) => {
                    store.indexes().put(layer, &fetched)?;
                    index = Some(fetched);
                }
                Err(e) => eprintln!(
                    "{label}: the registry's lazy index is unusable ({e}); building one here"
                ),
            }
        }
        let index = match index {
            Some(index) => index,
            None => {
                eprintln!(
                    "{label}: no lazy index; fetching the layer once ({}) to build one",
                    human_size(layer.size)
                );
                let diff_id = image.config_summary.rootfs.diff_ids.get(i);
                let bar = crate::progress::bytes(
                    layer.size,
                    &format!("layer {}/{}", i + 1, image.layers.len()),
                );
                let index = build_and_cache(
                    &source,
                    layer,
                    diff_id,
                    BuildOptions::default(),
                    &store.span_dir(),
                    &|n| bar.set_position(n),
                )
                .await?;
                bar.finish_and_clear();
                store.indexes().put(layer, &index)?;
                built_here += 1;
                index
            }
        };
        let index = Arc::new(index);
        store.prepare_layer(&index, frontend)?;
        eprintln!(
            "{label}: {} entries ready ({})",
            index.entries.len(),
            frontend.name()
        );
    }
    let config: serde_json::Value = serde_json::from_slice(&image.config_bytes)?;
    let record = ImageRecord {
        reference: images::canonical(&reference),
        manifest: image.manifest.digest.clone(),
        layers: image.layers.clone(),
        config,
    };
    store.save_image(&record)?;
    start_daemon(global).await?;
    Ok((record, built_here))
}

/// Makes sure a daemon runs and has taken up every lazy layer (marks placed), if any layer of
/// a pulled image is lazy; with none, no daemon is needed and none is started.
pub async fn start_daemon(global: &GlobalArgs) -> anyhow::Result<()> {
    let store = Store::new(&global.root);
    let exe = std::env::current_exe()?;
    let mut extra = Vec::new();
    for host in &global.insecure_registries {
        extra.push("--insecure-registry".to_string());
        extra.push(host.clone());
    }
    // A daemon started on demand leaves once nothing is lazy; one leaving just as this asks
    // (or one still holding the store while it leaves) is waited out and started again.
    let mut last_error = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(4))).await;
        }
        if store.lazy_image_layers()?.is_empty() {
            return Ok(());
        }
        match client::ensure_running(&global.root, &store.socket(), &exe, &extra).await {
            Ok(client::Started::Answering) => {}
            Ok(client::Started::ExitedIdle) => continue,
            Err(e) => {
                last_error = Some(anyhow::Error::from(e));
                continue;
            }
        }
        match client::request(&store.socket(), &Request::Refresh).await {
            Ok(response) if response.ok => return Ok(()),
            Ok(response) => anyhow::bail!(
                "the daemon could not take up the layers: {}",
                response.error.unwrap_or_default()
            ),
            Err(e) => last_error = Some(e.into()),
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("the daemon left although layers are lazy"))
        .context(format!(
            "starting the daemon for {} (see serve.log there)",
            global.root.display()
        )))
}

/// How often [`start_daemon`] tries before it gives up.
const ATTEMPTS: u32 = 6;
