//! The worker of `lazylayer serve`: the process that fetches and fills. It takes up every lazy
//! layer of the store (marks its unfilled files in the group the holder shares with it),
//! answers the events the holder relays by filling files, fills every layer in the background
//! in stream order (demand fills run beside it and do not queue behind it), detaches each layer
//! once it is complete and its blob digest verified end to end, and answers commands on the
//! control socket. It may die at any moment: the holder keeps the group and starts another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use lazylayer_fanotify::{Frontend, Group};
use lazylayer_index::EntryKind;
use lazylayer_source::{ClientOptions, Digest, ImageReference, ImageSource, RegistryClient};
use lazylayer_store::{FrontendMode, Layer, Phase, Store};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub use crate::holder::{ServeError, ServeOptions};
use crate::protocol::{DaemonStatus, LayerState, LayerStatus, Request, Response};

/// How long no reader must have waited before the background fetches (demand first).
const DEMAND_QUIET: Duration = Duration::from_millis(1500);

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
    /// The holder's pid (the daemon's pid as commands see it).
    holder_pid: u32,
}

use crate::holder::other;

/// The descriptors the holder hands its worker: the shared fanotify group, the worker's end
/// of the relay, and the listening control socket (so that commands queue while a worker
/// restarts).
pub struct WorkerFds {
    /// The shared fanotify group.
    pub group: OwnedFd,
    /// The worker's end of the relay socket pair.
    pub relay: OwnedFd,
    /// The bound, listening control socket.
    pub listener: OwnedFd,
}

impl WorkerFds {
    /// The `--worker-fds` value naming these descriptors.
    pub fn to_arg(group: RawFd, relay: RawFd, listener: RawFd) -> String {
        format!("{group},{relay},{listener}")
    }

    /// Takes ownership of the descriptors named by a `--worker-fds` value.
    pub fn from_arg(arg: &str) -> Result<WorkerFds, ServeError> {
        let numbers: Vec<RawFd> = arg
            .split(',')
            .map(|n| n.parse::<RawFd>())
            .collect::<Result<_, _>>()
            .map_err(|_| other(format!("--worker-fds {arg}: expected three fd numbers")))?;
        let [group, relay, listener] = numbers[..] else {
            return Err(other(format!(
                "--worker-fds {arg}: expected three fd numbers"
            )));
        };
        let mut owned = Vec::new();
        for fd in [group, relay, listener] {
            // SAFETY: fcntl(F_GETFD) only queries the descriptor table; it fails for a number
            // that is not open.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 || owned.contains(&fd) {
                return Err(other(format!(
                    "--worker-fds {arg}: fd {fd} is not a descriptor the holder handed down (this option is for lazylayer serve's own use)"
                )));
            }
            owned.push(fd);
        }
        // SAFETY: the holder opened these descriptors, left them open across exec for us and
        // named them on our command line; nothing else in this process owns them (checked open
        // and distinct above), so each is owned exactly once from here.
        let take = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WorkerFds {
            group: take(group),
            relay: take(relay),
            listener: take(listener),
        })
    }
}

/// Runs the worker until shut down (or idle, with `exit_when_idle`): exit status 0 tells the
/// holder to stop too.
pub async fn work(options: ServeOptions, fds: WorkerFds) -> Result<(), ServeError> {
    let store = Store::new(&options.root);
    let socket = store.socket();
    let frontend = Frontend::new(Group::from_fd(fds.group), options.deadline);
    let client = RegistryClient::new(ClientOptions {
        insecure_registries: options.insecure_registries.clone(),
        ..ClientOptions::default()
    })
    .map_err(other)?;
    let daemon = Arc::new(Daemon {
        store,
        frontend: frontend.clone(),
        client,
        options: options.clone(),
        layers: Mutex::new(HashMap::new()),
        changed: tokio::sync::Notify::new(),
        holder_pid: std::os::unix::process::parent_id(),
    });
    let listener = std::os::unix::net::UnixListener::from(fds.listener);
    listener.set_nonblocking(true).map_err(other)?;
    let listener = UnixListener::from_std(listener).map_err(other)?;
    // Every lazy layer is taken up (its files known and marked) before any relayed event is
    // answered: an event for a file not known as unfilled is allowed.
    daemon.refresh().await.map_err(other)?;
    let relay = std::os::unix::net::UnixStream::from(fds.relay);
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("fanotify-relay".into())
        .spawn(move || {
            if let Err(e) = frontend.serve_relay(relay, handle) {
                tracing::error!("reading fanotify events failed: {e}");
                std::process::exit(1);
            }
        })
        .map_err(other)?;
    tracing::info!(
        "worker {} serving {} for holder {}",
        std::process::id(),
        options.root.display(),
        daemon.holder_pid
    );
    // A timer outside the loop: commands arriving more often than once a second must not
    // postpone the check for ever.
    let mut idle_check = tokio::time::interval(Duration::from_secs(1));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let daemon = daemon.clone();
                    tokio::spawn(async move { daemon.converse(stream).await });
                }
            }
            _ = idle_check.tick() => {
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
        if !self.layers.lock().expect("layers").is_empty() || !self.fuse_mounts().is_empty() {
            return false;
        }
        match self.store.lazy_image_layers() {
            Ok(lazy) => lazy.is_empty(),
            Err(e) => {
                // Unknown is not idle: leaving could strand a lazy layer without its daemon.
                tracing::warn!("reading the store to see whether anything is lazy: {e}");
                false
            }
        }
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
                match layer.mode().map_err(|e| e.to_string())? {
                    FrontendMode::Fanotify => {
                        let marked = self
                            .frontend
                            .attach(&layer)
                            .map_err(|e| format!("marking layer {}: {e}", blob.digest))?;
                        tracing::info!("layer {}: {marked} files marked", blob.digest);
                    }
                    FrontendMode::Fuse => self.mount_fuse(&layer).await?,
                }
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

    /// Has the holder serve `layer` through FUSE: its unfilled files are registered for the
    /// fill requests the holder relays, then the holder is asked to mount it, and this waits
    /// until it has (the overlay about to be made needs the mount).
    async fn mount_fuse(&self, layer: &Arc<Layer>) -> Result<(), String> {
        let registered = self
            .frontend
            .register(layer)
            .map_err(|e| format!("registering layer {}: {e}", layer.digest))?;
        let mountpoint = self.store.fuse_mountpoint(&layer.digest);
        if let Some(holder) = rustix::process::Pid::from_raw(self.holder_pid as i32) {
            let _ = rustix::process::kill_process(holder, rustix::process::Signal::USR1);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !crate::fuse_layers::is_fuse_mount(&mountpoint) {
            if Instant::now() > deadline {
                return Err(format!(
                    "layer {}: the holder did not mount it with FUSE at {} (see its log)",
                    layer.digest,
                    mountpoint.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            "layer {}: {registered} files to fill through FUSE at {}",
            layer.digest,
            mountpoint.display()
        );
        Ok(())
    }

    /// Layers whose FUSE mount (served by the holder) is up.
    fn fuse_mounts(&self) -> Vec<Digest> {
        let mut digests: Vec<Digest> = self
            .store
            .layer_digests()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| crate::fuse_layers::is_fuse_mount(&self.store.fuse_mountpoint(d)))
            .collect();
        digests.dedup();
        digests
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
                        let progress = self
                            .store
                            .persisted_progress(blob)
                            .ok()
                            .flatten()
                            .unwrap_or_default();
                        let mode = self.store.mode(&blob.digest).unwrap_or_default();
                        LayerStatus::persisted(blob.digest.clone(), phase, mode, progress)
                    }
                };
                layers.push(status);
            }
        }
        // Layers still being filled for images forgotten since (garbage collection keeps them).
        for (digest, m) in &managed {
            if seen.insert(digest.clone()) {
                let error = m.error.lock().expect("error").clone();
                layers.push(layer_status(&m.layer, Phase::Lazy, error));
            }
        }
        let fuse_mounts = self.fuse_mounts();
        let fuse_reads = std::fs::read(crate::fuse_layers::stats_path(&self.store))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|stats| stats["reads"].as_u64())
            .unwrap_or(0);
        DaemonStatus {
            fuse_mounts,
            fuse_reads,
            pid: self.holder_pid,
            worker_pid: std::process::id(),
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
        mode: layer.mode().unwrap_or_default().name().into(),
        files,
        files_populated,
        bytes,
        bytes_populated,
        bytes_fetched: layer.reader().stats().bytes_fetched,
        error,
        state: LayerState::served(phase),
    }
}
