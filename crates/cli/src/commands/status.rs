//! `lazylayer status [IMAGE] [--json]`: per layer, the mode, the state (creating, lazy,
//! populating, detached), files and bytes in place, bytes fetched.

use clap::Args;
use lazylayer_daemon::{DaemonStatus, Request, client};
use lazylayer_store::Store;

use crate::options::GlobalArgs;
use crate::shared::{engine, human_size};

/// Options of `status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only this image's layers.
    #[arg(value_name = "IMAGE")]
    pub image: Option<String>,
    /// JSON for tools.
    #[arg(long)]
    pub json: bool,
}

/// Runs `status`.
pub async fn run(global: &GlobalArgs, args: StatusArgs) -> anyhow::Result<()> {
    let store = Store::new(&global.root);
    let mut running = client::is_running(&store.socket()).await;
    let mut live = None;
    if running {
        match client::request(&store.socket(), &Request::Status).await {
            Ok(response) if !response.ok => {
                anyhow::bail!("the daemon refused: {}", response.error.unwrap_or_default())
            }
            Ok(response) => live = Some(response.status.unwrap_or_default()),
            // It may have left in between (idle once every layer detached, or stopped): then
            // what the store persisted is the answer.
            Err(_) if !client::is_running(&store.socket()).await => running = false,
            Err(e) => return Err(e.into()),
        }
    }
    let mut status = match live {
        Some(status) => status,
        None => offline_status(&store)?,
    };
    if let Some(image) = &args.image {
        let image = engine(global)?.find_image(image)?;
        status
            .layers
            .retain(|l| image.layers.iter().any(|i| i.digest == l.digest));
    }
    if args.json {
        let mut value = serde_json::to_value(&status)?;
        value["daemon_running"] = serde_json::Value::Bool(running);
        return crate::output::print(&(serde_json::to_string_pretty(&value)? + "\n"));
    }
    let mut text = if running {
        format!(
            "daemon: pid {} (worker {}), {} files marked\n",
            status.pid, status.worker_pid, status.marked_files
        )
    } else {
        "daemon: not running\n".to_string()
    };
    if !status.fuse_mounts.is_empty() {
        text.push_str(&format!(
            "FUSE-mounted layers (overlays made on them keep a FUSE hop): {}\n",
            status
                .fuse_mounts
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for layer in &status.layers {
        text.push_str(&format!(
            "{}  {:<9} {:<10} files {}/{}  data {}/{}  fetched {}{}\n",
            layer.digest,
            layer.mode,
            layer.state.name(),
            layer.files_populated,
            layer.files,
            human_size(layer.bytes_populated),
            human_size(layer.bytes),
            human_size(layer.bytes_fetched),
            layer
                .error
                .as_ref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        ));
    }
    crate::output::print(&text)
}

fn offline_status(store: &Store) -> anyhow::Result<DaemonStatus> {
    let mut layers = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for image in store.images()? {
        for blob in image.layers {
            if !seen.insert(blob.digest.clone()) {
                continue;
            }
            let phase = store
                .phase(&blob.digest)?
                .unwrap_or(lazylayer_store::Phase::Creating);
            // Without the daemon: what the store has persisted.
            let progress = store.persisted_progress(&blob)?.unwrap_or_default();
            let mode = store.mode(&blob.digest)?;
            let failure = store.failure(&blob.digest)?;
            layers.push(lazylayer_daemon::LayerStatus::persisted(
                blob.digest,
                phase,
                mode,
                progress,
                failure,
            ));
        }
    }
    Ok(DaemonStatus {
        pid: 0,
        worker_pid: 0,
        marked_files: 0,
        demanded_files: 0,
        layers,
        ..DaemonStatus::default()
    })
}
