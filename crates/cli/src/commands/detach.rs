//! `lazylayer detach IMAGE [--wait]`: populate an image's layers now, and (with `--wait`)
//! return once each is complete, verified and detached.

use clap::Args;
use lazylayer_daemon::{Request, client};
use lazylayer_store::{Phase, Store};

use crate::options::GlobalArgs;
use crate::shared::engine;

/// Options of `detach`.
#[derive(Args, Debug)]
pub struct DetachArgs {
    /// A pulled image.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Wait until every layer is detached.
    #[arg(long)]
    pub wait: bool,
}

/// Runs `detach`.
pub async fn run(global: &GlobalArgs, args: DetachArgs) -> anyhow::Result<()> {
    let engine = engine(global)?;
    let store = engine.store().clone();
    let image = engine.find_image(&args.image)?;
    let lazy: Vec<_> = image
        .layers
        .iter()
        .filter(|l| store.phase(&l.digest).ok().flatten() == Some(Phase::Lazy))
        .map(|l| l.digest.clone())
        .collect();
    if !lazy.is_empty() {
        engine.start_daemon().await?;
        let response = client::request(
            &store.socket(),
            &Request::Detach {
                layers: lazy.clone(),
                wait: false,
            },
        )
        .await?;
        if !response.ok {
            anyhow::bail!("detach failed: {}", response.error.unwrap_or_default());
        }
        if args.wait {
            wait_until_detached(&store, &lazy).await?;
        }
    }
    let still: Vec<_> = image
        .layers
        .iter()
        .filter(|l| store.phase(&l.digest).ok().flatten() != Some(Phase::Detached))
        .collect();
    let text = if still.is_empty() {
        format!("{}: every layer is detached\n", image.reference)
    } else {
        format!(
            "{}: {} layer(s) still populating in the background\n",
            image.reference,
            still.len()
        )
    };
    crate::output::print(&text)
}

/// How often `detach --wait` looks whether the layers are detached.
const PHASE_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
/// How often it asks the daemon for progress (and whether it still runs).
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Polls the daemon until every layer of `layers` is detached, showing progress.
async fn wait_until_detached(
    store: &Store,
    layers: &[lazylayer_source::Digest],
) -> anyhow::Result<()> {
    let labels: Vec<String> = layers
        .iter()
        .map(|d| format!("{:.19}", d.to_string()))
        .collect();
    let bars = crate::progress::LayerBars::new(&labels);
    let mut asked: Option<std::time::Instant> = None;
    loop {
        if layers
            .iter()
            .all(|d| store.phase(d).ok().flatten() == Some(Phase::Detached))
        {
            break;
        }
        // The phase is a file in the store, looked at often so that the command returns as
        // soon as the layers are detached; the daemon is asked for progress less often.
        if asked.is_some_and(|at| at.elapsed() < STATUS_EVERY) {
            tokio::time::sleep(PHASE_EVERY).await;
            continue;
        }
        asked = Some(std::time::Instant::now());
        let response = client::request(&store.socket(), &Request::Status).await;
        let Ok(response) = response else {
            anyhow::bail!(
                "the daemon went away before the layers were detached (see serve.log under the root)"
            );
        };
        if let Some(status) = response.status {
            for (i, digest) in layers.iter().enumerate() {
                if let Some(layer) = status.layers.iter().find(|l| &l.digest == digest) {
                    if let Some(error) = &layer.error
                        && (layer.failed || layer.files_populated == layer.files)
                        && layer.phase != Phase::Detached
                    {
                        bars.finish();
                        anyhow::bail!("layer {digest} cannot be detached: {error}");
                    }
                    bars.update(i, layer);
                }
            }
        }
        tokio::time::sleep(PHASE_EVERY).await;
    }
    bars.finish();
    Ok(())
}
