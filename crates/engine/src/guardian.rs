//! Keeps lazy layers served while another engine's containers may read them (containerd's
//! through the snapshotter, podman's through the layer store): a long-running service starts a
//! daemon whenever none answers while a layer is lazy, and holds a duplicate of the daemon's
//! fanotify group (as `lazylayer run` does) so that if both daemon processes die, readers of
//! unfilled files wait for the next daemon instead of reading zeros.

use std::time::Duration;

use lazylayer_daemon::client;
use lazylayer_daemon::keeper::Keeper;
use lazylayer_store::FrontendMode;

use crate::Engine;

/// How often the guardian looks.
const PERIOD: Duration = Duration::from_secs(1);

/// Watches the daemon for as long as the returned task runs (abort it to stop).
pub fn spawn(engine: Engine) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut keeper: Option<Keeper> = None;
        loop {
            if let Err(e) = look(&engine, &mut keeper).await {
                tracing::warn!("keeping lazy layers served: {e}");
            }
            tokio::time::sleep(PERIOD).await;
        }
    })
}

/// One look: start a daemon if lazy layers have none, keep its group while any is fanotify.
async fn look(engine: &Engine, keeper: &mut Option<Keeper>) -> Result<(), String> {
    let store = engine.store();
    let lazy = store.lazy_image_layers().map_err(|e| e.to_string())?;
    if lazy.is_empty() {
        // Nothing left to fail open: the daemon leaves by itself.
        *keeper = None;
        return Ok(());
    }
    if !client::is_running(&store.socket()).await {
        tracing::warn!("no daemon serves the lazy layers: starting one");
        engine.start_daemon().await.map_err(|e| e.to_string())?;
    }
    let fanotify = lazy
        .iter()
        .any(|digest| matches!(store.mode(digest), Ok(FrontendMode::Fanotify)));
    if fanotify && keeper.is_none() {
        let socket = store.socket();
        let fd = tokio::task::spawn_blocking(move || client::group_fd(&socket))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("asking the daemon for its fanotify group: {e}"))?;
        *keeper =
            Some(Keeper::start(store, fd).map_err(|e| format!("keeping the fanotify group: {e}"))?);
    }
    Ok(())
}
