//! `lazylayer serve`: the process that holds the fanotify group. It takes up every lazy layer
//! of the store (marks its unfilled files), answers events by filling files, fills every layer
//! in the background in stream order (demand fills run beside it and do not queue behind it),
//! and detaches each layer once it is complete and its blob digest verified end to end.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazylayer_fanotify::{Frontend, supports_pre_content};
use lazylayer_index::EntryKind;
use lazylayer_source::{ClientOptions, Digest, ImageReference, ImageSource, RegistryClient};
use lazylayer_store::{Layer, Phase, Store};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::protocol::{DaemonStatus, LayerStatus, Request, Response};

/// How long no reader must have waited before the background fetches (demand first).
const DEMAND_QUIET: Duration = Duration::from_millis(1500);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The store root.
    pub root: PathBuf,
    /// How long a reader may wait for its file before it gets EIO.
    pub deadline: Duration,
    /// Cap on background fetching, bytes per second (demand fetches are not capped).
    pub background_rate: Option<u64>,
    /// Exit once no lazy layer is left.
    pub exit_when_idle: bool,
    /// Registries to reach over plain HTTP.
    pub insecure_registries: Vec<String>,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store's filesystem cannot take pre-content marks.
    #[error(
        "the store {0} is on a filesystem without fanotify pre-content support (ext4, xfs and btrfs have it; tmpfs and overlayfs do not); put --root on one of those (the FUSE mode will cover the rest)"
    )]
    NoPreContent(String),
    /// Another daemon answers on the socket.
    #[error("a lazylayer daemon already serves {0}")]
    AlreadyRunning(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

struct Managed {
    layer: Arc<Layer>,
    urgent: std::sync::atomic::AtomicBool,
    error: Mutex<Option<String>>,
}

struct Daemon {
    store: Store,
    frontend: Arc<Frontend>,
    client: RegistryClient,
    options: ServeOptions,
    layers: Mutex<HashMap<Digest, Arc<Managed>>>,
    changed: tokio::sync::Notify,
}

fn other(e: impl std::fmt::Display) -> ServeError {
    ServeError::Other(e.to_string())
}

/// Runs the daemon until shut down (or idle, with `exit_when_idle`).
pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    std::fs::create_dir_all(&options.root).map_err(other)?;
    let store = Store::new(&options.root);
    let socket = store.socket();
    // One daemon per store: an exclusive lock held for the daemon's life.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(options.root.join("serve.lock"))
        .map_err(other)?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(ServeError::AlreadyRunning(
            options.root.display().to_string(),
        ));
    }
    if !supports_pre_content(&options.root).map_err(other)? {
        return Err(ServeError::NoPreContent(options.root.display().to_string()));
    }
    let frontend =
        Frontend::new(options.deadline).map_err(|e| other(format!("fanotify_init: {e}")))?;
    let client = RegistryClient::new(ClientOptions {
        insecure_registries: options.insecure_registries.clone(),
        ..ClientOptions::default()
    })
    .map_err(other)?;
    let _lock = lock;
    let daemon = Arc::new(Daemon {
        store,
        frontend: frontend.clone(),
        client,
        options: options.clone(),
        layers: Mutex::new(HashMap::new()),
        changed: tokio::sync::Notify::new(),
    });
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("fanotify-events".into())
        .spawn(move || {
            if let Err(e) = frontend.run(handle) {
                tracing::error!("reading fanotify events failed: {e}");
                std::process::exit(1);
            }
        })
        .map_err(other)?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| other(format!("binding {}: {e}", socket.display())))?;
    daemon.refresh().await.map_err(other)?;
    tracing::info!(
        "serving {} (pid {})",
        options.root.display(),
        std::process::id()
    );
    loop {
        let idle_check = tokio::time::sleep(Duration::from_secs(1));
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let daemon = daemon.clone();
                    tokio::spawn(async move { daemon.converse(stream).await });
                }
            }
            _ = idle_check => {
                if daemon.options.exit_when_idle && daemon.idle() {
                    tracing::info!("no lazy layer left: exiting");
                    let _ = std::fs::remove_file(&socket);
                    return Ok(());
                }
            }
        }
    }
}

impl Daemon {
    fn idle(&self) -> bool {
        self.layers.lock().expect("layers").is_empty()
            && self
                .store
                .images()
                .map(|images| {
                    images
                        .iter()
                        .flat_map(|i| &i.layers)
                        .all(|l| self.store.phase(&l.digest).ok().flatten() != Some(Phase::Lazy))
                })
                .unwrap_or(true)
    }

    /// Takes up every lazy layer of the store not yet served: marks and background filling.
    async fn refresh(self: &Arc<Self>) -> Result<(), String> {
        for image in self.store.images().map_err(|e| e.to_string())? {
            for blob in &image.layers {
                if self
                    .layers
                    .lock()
                    .expect("layers")
                    .contains_key(&blob.digest)
                    || self.store.phase(&blob.digest).map_err(|e| e.to_string())?
                        != Some(Phase::Lazy)
                {
                    continue;
                }
                let index = match self.store.indexes().get(blob).map_err(|e| e.to_string())? {
                    Some(index) => Arc::new(index),
                    None => return Err(format!("layer {} is lazy but has no index", blob.digest)),
                };
                let reference: ImageReference = image
                    .reference
                    .parse()
                    .map_err(|e: lazylayer_source::Error| e.to_string())?;
                let source =
                    ImageSource::open(&reference, &self.client).map_err(|e| e.to_string())?;
                let layer = Arc::new(
                    self.store
                        .open_layer(index, source)
                        .map_err(|e| e.to_string())?,
                );
                let marked = self
                    .frontend
                    .attach(&layer)
                    .map_err(|e| format!("marking layer {}: {e}", blob.digest))?;
                tracing::info!("layer {}: {marked} files marked", blob.digest);
                let managed = Arc::new(Managed {
                    layer,
                    urgent: std::sync::atomic::AtomicBool::new(false),
                    error: Mutex::new(None),
                });
                self.layers
                    .lock()
                    .expect("layers")
                    .insert(blob.digest.clone(), managed.clone());
                let first = self.profile_files(&managed.layer);
                let daemon = self.clone();
                tokio::spawn(async move { daemon.populate_in_background(managed, first).await });
            }
        }
        Ok(())
    }

    /// The entries of `layer` that the prefetch profiles of images using it list, in order.
    fn profile_files(&self, layer: &Layer) -> Vec<usize> {
        let by_path: HashMap<String, usize> = layer
            .index
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.display_path(), i))
            .collect();
        let mut first = Vec::new();
        for image in self.store.images().unwrap_or_default() {
            if !image.layers.iter().any(|l| l.digest == layer.digest) {
                continue;
            }
            let Ok(Some(profile)) =
                lazylayer_store::Profile::load(&self.store.profile_path(&image.manifest))
            else {
                continue;
            };
            for file in profile.files.iter().filter(|f| f.layer == layer.digest) {
                if let Some(&i) = by_path.get(&file.path)
                    && !first.contains(&i)
                {
                    first.push(i);
                }
            }
        }
        first
    }

    /// Fills the profile's files first (not held back by the rate cap: a workload is about to
    /// need them), then every file of the layer in stream order; then verifies and detaches it.
    async fn populate_in_background(self: Arc<Self>, managed: Arc<Managed>, first: Vec<usize>) {
        let layer = managed.layer.clone();
        // The spans of every profile file in a few ranged requests, then the files.
        let mut spans = std::collections::BTreeSet::new();
        for &i in &first {
            let entry = &layer.index.entries[i];
            let stored = entry.stored_size();
            if stored > 0 {
                spans.extend(
                    layer.index.span_at(entry.data_offset)
                        ..=layer.index.span_at(entry.data_offset + stored - 1),
                );
            }
        }
        if let Err(e) = layer.reader().ensure_set(spans).await {
            tracing::warn!("layer {}: prefetching profile spans: {e}", layer.digest);
        }
        for i in first {
            match layer.populate(i).await {
                Ok(()) => self.frontend.populated(&layer, i),
                Err(e) => tracing::warn!("layer {}: prefetching a profile file: {e}", layer.digest),
            }
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut prefetched = 0usize;
        let mut last_persist = Instant::now();
        let mut since_persist = 0;
        let pending = layer.pending_files();
        let mut queue = pending.into_iter().peekable();
        while let Some(&i) = queue.peek() {
            let entry = &layer.index.entries[i];
            let urgent = managed.urgent.load(std::sync::atomic::Ordering::Relaxed);
            // Demand first: while a workload is reading (and for a moment after), the
            // background stays off the network so that its fetches do not queue behind ours.
            if !urgent && self.frontend.quiet_for() < DEMAND_QUIET {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if let Some(rate) = self.options.background_rate.filter(|_| !urgent) {
                // Keep the background under the cap; fills for waiting readers are not held back
                // (they count as fetched, which only slows the background further).
                let fetched = layer.reader().stats().bytes_fetched as f64;
                let allowed = Duration::from_secs_f64(fetched / rate.max(1) as f64);
                if let Some(wait) = allowed.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                    continue;
                }
            } else {
                // Fetch ahead in runs: one ranged GET covers several spans.
                let span = layer.index.span_at(entry.data_offset);
                if span >= prefetched {
                    let last = (span + 8).min(layer.index.spans.len() - 1);
                    if layer.reader().ensure(span..=last).await.is_ok() {
                        prefetched = last + 1;
                    }
                }
            }
            match layer.populate(i).await {
                Ok(()) => {
                    self.frontend.populated(&layer, i);
                    queue.next();
                    if backoff > Duration::from_millis(500) {
                        // Recovered: the last error no longer describes the layer.
                        *managed.error.lock().expect("error") = None;
                    }
                    backoff = Duration::from_millis(500);
                    since_persist += 1;
                }
                Err(e) => {
                    tracing::warn!(
                        "layer {}: background fill: {e}; retrying in {backoff:?}",
                        layer.digest
                    );
                    *managed.error.lock().expect("error") = Some(e.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
            if since_persist >= 256 || last_persist.elapsed() > Duration::from_secs(2) {
                if let Err(e) = layer.persist() {
                    tracing::error!("layer {}: persisting state: {e}", layer.digest);
                }
                since_persist = 0;
                last_persist = Instant::now();
            }
        }
        if let Err(e) = self.detach(&managed).await {
            tracing::error!("layer {}: cannot detach: {e}", layer.digest);
            *managed.error.lock().expect("error") = Some(e);
        }
    }

    /// Every file holds its data: verify the whole blob, remove the marks, record `detached`.
    async fn detach(&self, managed: &Managed) -> Result<(), String> {
        let layer = &managed.layer;
        layer.persist().map_err(|e| e.to_string())?;
        let mut backoff = Duration::from_millis(500);
        loop {
            match layer.reader().verify_complete().await {
                Ok(()) => break,
                Err(lazylayer_index::Error::Source(e)) => {
                    tracing::warn!(
                        "layer {}: fetching the rest of the blob: {e}; retrying",
                        layer.digest
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        self.frontend.detach(layer);
        layer
            .set_phase(Phase::Detached)
            .map_err(|e| e.to_string())?;
        self.store.drop_spans(&layer.digest);
        self.layers.lock().expect("layers").remove(&layer.digest);
        tracing::info!("layer {} detached", layer.digest);
        self.changed.notify_waiters();
        Ok(())
    }

    fn status(&self) -> DaemonStatus {
        let managed = self.layers.lock().expect("layers").clone();
        let mut layers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for image in self.store.images().unwrap_or_default() {
            for blob in &image.layers {
                if !seen.insert(blob.digest.clone()) {
                    continue;
                }
                let phase = self
                    .store
                    .phase(&blob.digest)
                    .ok()
                    .flatten()
                    .unwrap_or(Phase::Creating);
                let status = match managed.get(&blob.digest) {
                    Some(m) => {
                        layer_status(&m.layer, phase, m.error.lock().expect("error").clone())
                    }
                    None => {
                        let index = self.store.indexes().get(blob).ok().flatten();
                        let (files, bytes) = index.as_ref().map_or((0, 0), |i| {
                            let files: Vec<_> = i
                                .entries
                                .iter()
                                .filter(|e| e.kind == EntryKind::File && e.stored_size() > 0)
                                .collect();
                            (files.len(), files.iter().map(|e| e.stored_size()).sum())
                        });
                        let done = phase == Phase::Detached;
                        LayerStatus {
                            digest: blob.digest.clone(),
                            phase,
                            mode: "fanotify".into(),
                            files,
                            files_populated: if done { files } else { 0 },
                            bytes,
                            bytes_populated: if done { bytes } else { 0 },
                            bytes_fetched: 0,
                            error: None,
                        }
                    }
                };
                layers.push(status);
            }
        }
        DaemonStatus {
            pid: std::process::id(),
            marked_files: self.frontend.marked(),
            demanded_files: self.frontend.demanded_since(0).1,
            layers,
        }
    }

    async fn answer(self: &Arc<Self>, request: Request) -> Response {
        let ok = |status| Response {
            ok: true,
            error: None,
            status,
            demanded: None,
        };
        match request {
            Request::Refresh => match self.refresh().await {
                Ok(()) => ok(Some(self.status())),
                Err(e) => Response {
                    ok: false,
                    error: Some(e),
                    ..Response::default()
                },
            },
            Request::Status => ok(Some(self.status())),
            Request::Demanded { since } => {
                let (files, _) = self.frontend.demanded_since(since);
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
                        layers
                            .iter()
                            .filter_map(|d| managed.get(d).cloned())
                            .collect()
                    };
                    if waiting.is_empty() {
                        break;
                    }
                    for m in &waiting {
                        m.urgent.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if !wait {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
                ok(Some(self.status()))
            }
            Request::Shutdown => {
                let _ = std::fs::remove_file(self.store.socket());
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    std::process::exit(0);
                });
                ok(None)
            }
        }
    }

    async fn converse(self: Arc<Self>, stream: UnixStream) {
        let (reader, mut writer) = stream.into_split();
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(request) => self.answer(request).await,
                Err(e) => Response {
                    ok: false,
                    error: Some(format!("bad request: {e}")),
                    ..Response::default()
                },
            };
            let mut text = serde_json::to_string(&response).expect("response serialises");
            text.push('\n');
            if writer.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

fn layer_status(layer: &Layer, phase: Phase, error: Option<String>) -> LayerStatus {
    let mut files = 0;
    let mut files_populated = 0;
    let mut bytes = 0;
    let mut bytes_populated = 0;
    for (i, entry) in layer.index.entries.iter().enumerate() {
        if entry.kind != EntryKind::File || entry.stored_size() == 0 {
            continue;
        }
        files += 1;
        bytes += entry.stored_size();
        if layer.is_populated(i) {
            files_populated += 1;
            bytes_populated += entry.stored_size();
        }
    }
    LayerStatus {
        digest: layer.digest.clone(),
        phase,
        mode: "fanotify".into(),
        files,
        files_populated,
        bytes,
        bytes_populated,
        bytes_fetched: layer.reader().stats().bytes_fetched,
        error,
    }
}
