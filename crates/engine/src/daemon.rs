//! Starting the daemon on demand: one is needed while any layer of a pulled image is lazy.

use std::time::Duration;

use lazylayer_daemon::{Request, client};

use crate::{Engine, Error, Result};

/// How often [`Engine::start_daemon`] tries before it gives up.
const ATTEMPTS: u32 = 6;

impl Engine {
    /// Makes sure a daemon runs and has taken up every lazy layer (marks placed, FUSE mounts
    /// up), if any layer of a pulled image is lazy; with none, no daemon is needed and none is
    /// started.
    pub async fn start_daemon(&self) -> Result<()> {
        let store = &self.store;
        let mut extra = Vec::new();
        for host in &self.options.insecure_registries {
            extra.push("--insecure-registry".to_string());
            extra.push(host.clone());
        }
        extra.push("--hosts-dir".to_string());
        extra.push(match &self.options.hosts_dir {
            Some(dir) => dir.display().to_string(),
            None => "none".to_string(),
        });
        // A daemon started on demand leaves once nothing is lazy; one leaving just as this
        // asks (or one still holding the store while it leaves) is waited out and started
        // again.
        let mut last_error = String::from("the daemon left although layers are lazy");
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            if store.lazy_image_layers()?.is_empty() {
                return Ok(());
            }
            let started = client::ensure_running(
                &self.options.root,
                &store.socket(),
                &self.options.program,
                &extra,
            )
            .await;
            match started {
                Ok(client::Started::Answering) => {}
                Ok(client::Started::ExitedIdle) => continue,
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            }
            match client::request(&store.socket(), &Request::Refresh).await {
                Ok(response) if response.ok => return Ok(()),
                Ok(response) => {
                    return Err(Error::Daemon(format!(
                        "the daemon could not take up the layers: {}",
                        response.error.unwrap_or_default()
                    )));
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(Error::Daemon(format!(
            "starting the daemon for {} (see serve.log there): {last_error}",
            self.options.root.display()
        )))
    }
}
