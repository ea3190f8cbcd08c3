//! The control server: one JSON request per line on `ROOT/lazylayer.sock`, one JSON answer
//! (see [`crate::protocol`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{Request, Response};
use crate::worker::Worker;
use crate::worker::lifecycle::{LayerLife, Managed};

impl Worker {
    /// Answers the requests of one connection until it closes.
    pub(super) async fn converse(self: Arc<Self>, stream: UnixStream) {
        if let Err(refusal) = crate::peer::check_peer(&stream) {
            tracing::warn!("{refusal}: connection refused");
            let mut stream = stream;
            let text = serde_json::to_string(&failure(refusal)).expect("a response serialises");
            let _ =
                tokio::io::AsyncWriteExt::write_all(&mut stream, format!("{text}\n").as_bytes())
                    .await;
            return;
        }
        let (reader, mut writer) = stream.into_split();
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(Request::GroupFd) => {
                    // The answer carries the descriptor.
                    let group = self.demand.frontends().fanotify.group().clone();
                    let text = b"{\"ok\":true}\n";
                    let sent = writer.as_ref().writable().await.and_then(|()| {
                        crate::keeper::send_fd(
                            std::os::fd::AsFd::as_fd(writer.as_ref()),
                            group.as_fd(),
                            text,
                        )
                    });
                    if let Err(e) = sent {
                        tracing::warn!("handing the fanotify group to a keeper: {e}");
                        return;
                    }
                    continue;
                }
                Ok(request) => self.answer(request).await,
                Err(e) => failure(format!("bad request: {e}")),
            };
            let mut text = serde_json::to_string(&response).expect("response serialises");
            text.push('\n');
            if writer.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn answer(self: &Arc<Self>, request: Request) -> Response {
        match request {
            Request::Refresh => match self.refresh().await {
                Ok(()) => self.status_response().await,
                Err(e) => failure(e.to_string()),
            },
            Request::Status => self.status_response().await,
            Request::Demanded { since } => {
                let (files, _) = self.demand.demanded_since(since);
                let managed = self.layers.lock().expect("layers").clone();
                let files = files
                    .into_iter()
                    .filter_map(|(layer, entry)| {
                        let path = managed.get(&layer)?.layer.index.entries[entry].display_path();
                        Some(lazylayer_store::ProfileEntry { layer, path })
                    })
                    .collect();
                Response {
                    ok: true,
                    demanded: Some(files),
                    ..Response::default()
                }
            }
            Request::Detach { layers, wait } => {
                loop {
                    let notified = self.changed.notified();
                    let waiting: Vec<Arc<Managed>> = {
                        let managed = self.layers.lock().expect("layers");
                        // A failed layer never detaches: nobody waits for it.
                        layers
                            .iter()
                            .filter_map(|d| managed.get(d).cloned())
                            .filter(|m| !matches!(m.life(), LayerLife::Failed(_)))
                            .collect()
                    };
                    if waiting.is_empty() {
                        break;
                    }
                    for m in &waiting {
                        m.urgent.store(true, Ordering::Relaxed);
                    }
                    if !wait {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
                self.status_response().await
            }
            Request::GroupFd => failure("answered in converse".into()),
            Request::Shutdown => {
                let _ = std::fs::remove_file(self.store.socket());
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    std::process::exit(0);
                });
                Response {
                    ok: true,
                    ..Response::default()
                }
            }
        }
    }

    async fn status_response(&self) -> Response {
        match self.status().await {
            Ok(status) => Response {
                ok: true,
                status: Some(status),
                ..Response::default()
            },
            Err(e) => failure(format!("reading the store: {e}")),
        }
    }
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        error: Some(error),
        ..Response::default()
    }
}
