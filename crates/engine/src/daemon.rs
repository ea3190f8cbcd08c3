//! Starting the daemon on demand: one is needed while any layer of a pulled image is lazy.

use std::time::Duration;

use lazylayer_daemon::{Request, client};

use crate::{Engine, Error, Result};

/// How often [`Engine::start_daemon`] tries before it gives up.
const ATTEMPTS: u32 = 6;

impl Engine {
    /// The daemon's options besides the store: how to reach registries.
    fn daemon_args(&self) -> Vec<String> {
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
        extra
    }

    /// Starts the daemon in the background, unless one answers, while a pull still makes its
    /// placeholder trees: by the time the pull asks it to take the layers up
    /// ([`start_daemon`](Self::start_daemon)) it has started. A daemon started with nothing
    /// lazy stays a second before it leaves idle.
    pub(crate) fn start_daemon_early(&self) -> tokio::task::JoinHandle<()> {
        let (root, socket) = (self.options.root.clone(), self.store.socket());
        let (program, extra) = (self.options.program.clone(), self.daemon_args());
        tokio::spawn(async move {
            // Whatever happens here, start_daemon looks again and reports it.
            let _ = client::ensure_running(&root, &socket, &program, &extra).await;
        })
    }

    /// Makes sure a daemon runs and has taken up every lazy layer (marks placed, FUSE mounts
    /// up), if any layer of a pulled image is lazy; with none, no daemon is needed and none is
    /// started.
    pub async fn start_daemon(&self) -> Result<()> {
        let store = &self.store;
        let extra = self.daemon_args();
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
