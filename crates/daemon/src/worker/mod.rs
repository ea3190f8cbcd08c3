//! The worker of `lazylayer serve`: the process that fetches and fills. It takes up every lazy
//! layer of the store ([`takeup`]), answers the events and fill requests the holder relays
//! ([`holder_link`], [`demand`]) through the layer's frontend ([`frontends`]), fills every
//! layer in the background in stream order ([`background`]), verifies and detaches each layer
//! once it is complete ([`detach`]), fails for good a layer whose index proved wrong
//! ([`failure`]), follows each layer through its life ([`lifecycle`]), keeps its heap small
//! ([`memory`]), and answers commands on the control socket ([`control`], [`status`]). It may
//! die at any moment: the holder keeps the group and starts another.

mod background;
mod control;
pub mod demand;
mod detach;
mod failure;
pub mod frontends;
pub mod holder_link;
pub mod lifecycle;
mod memory;
mod status;
mod takeup;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazylayer_fanotify::Group;
use lazylayer_source::{ClientOptions, Digest, RegistryClient};
use lazylayer_store::Store;
use tokio::net::UnixListener;

use crate::error::ServeError;
use crate::handover::WorkerFds;
use crate::options::ServeOptions;
use demand::Demand;
use frontends::{FanotifyMarks, Frontends, FuseThroughHolder};
use holder_link::HolderLink;
use lifecycle::Managed;

/// The worker's state, shared by its tasks.
struct Worker {
    store: Store,
    demand: Arc<Demand>,
    link: Arc<HolderLink>,
    client: RegistryClient,
    options: ServeOptions,
    layers: Mutex<HashMap<Digest, Arc<Managed>>>,
    /// Failed layers whose files this worker denies (see [`failure`]).
    denied: Mutex<std::collections::HashSet<Digest>>,
    /// Told whenever a layer detaches.
    changed: tokio::sync::Notify,
    /// Held while layers are taken up: two pulls' refreshes at once take a layer up once.
    taking_up: tokio::sync::Mutex<()>,
    /// The holder's pid (the daemon's pid as commands see it).
    holder_pid: u32,
}

/// Runs the worker until shut down (or idle, with `exit_when_idle`): exit status 0 tells the
/// holder to stop too.
pub async fn work(options: ServeOptions, fds: WorkerFds) -> Result<(), ServeError> {
    memory::keep_span_buffers_off_the_heap();
    let mut store = Store::new(&options.root);
    let socket = store.socket();
    let group = Arc::new(Group::from_fd(fds.group));
    fill_without_events(&mut store, &group);
    let relay = std::os::unix::net::UnixStream::from(fds.relay);
    let link = HolderLink::new(&relay).map_err(|e| ServeError::io("the relay socket", e))?;
    let frontends = Frontends {
        fanotify: FanotifyMarks::new(group.clone()),
        fuse: FuseThroughHolder::new(link.clone()),
    };
    let demand = Demand::new(frontends, options.deadline);
    let client = RegistryClient::new(ClientOptions {
        insecure_registries: options.insecure_registries.clone(),
        hosts_dir: options.hosts_dir.clone(),
        ..ClientOptions::default()
    })
    .map_err(|e| ServeError::io("the registry client", std::io::Error::other(e)))?;
    let worker = Arc::new(Worker {
        store,
        demand: demand.clone(),
        link: link.clone(),
        client,
        options: options.clone(),
        layers: Mutex::new(HashMap::new()),
        denied: Mutex::new(std::collections::HashSet::new()),
        changed: tokio::sync::Notify::new(),
        taking_up: tokio::sync::Mutex::new(()),
        holder_pid: std::os::unix::process::parent_id(),
    });
    let listener = std::os::unix::net::UnixListener::from(fds.listener);
    listener
        .set_nonblocking(true)
        .map_err(|e| ServeError::io("the control socket", e))?;
    let listener =
        UnixListener::from_std(listener).map_err(|e| ServeError::io("the control socket", e))?;
    // The relay is read from the start: taking up a FUSE layer waits for the holder's answer.
    // Readers relayed before every lazy layer is taken up wait until it is (a file not known
    // then may belong to a layer not registered yet); after that, an event for a file not
    // known as unfilled is allowed: it was never marked or is filled already.
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("fanotify-relay".into())
        .spawn(move || {
            if let Err(e) = link.serve(relay, demand, group, handle) {
                tracing::error!("reading fanotify events failed: {e}");
                std::process::exit(1);
            }
        })
        .map_err(|e| ServeError::io("starting the relay thread", e))?;
    worker.refresh().await?;
    worker.demand.set_ready();
    tracing::info!(
        "worker {} serving {} for holder {}",
        std::process::id(),
        options.root.display(),
        worker.holder_pid
    );
    // A timer outside the loop: commands arriving more often than once a second must not
    // postpone the check for ever. The first check comes a second after the start, so that
    // a pull can start the daemon while it sets its layers up (see `Engine::pull`).
    let mut idle_check =
        tokio::time::interval_at(tokio::time::Instant::now() + IDLE_CHECK, IDLE_CHECK);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServeError::io("catching SIGTERM", e))?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                // The holder is stopping (or someone signalled this worker): what was filled
                // is persisted, so `status` and the next worker see it. Not a clean exit: a
                // holder that is not stopping starts the next worker.
                worker.persist_all();
                tracing::info!("worker {} stopped by SIGTERM", std::process::id());
                std::process::exit(STOPPED_BY_SIGNAL);
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let worker = worker.clone();
                    tokio::spawn(async move { worker.converse(stream).await });
                }
            }
            _ = idle_check.tick() => {
                if worker.options.exit_when_idle && worker.idle() {
                    tracing::info!("no lazy layer left: exiting");
                    let _ = std::fs::remove_file(&socket);
                    return Ok(());
                }
            }
        }
    }
}

/// How often a worker started with `exit_when_idle` looks whether it is idle.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The exit status of a worker stopped by SIGTERM (as a shell reports a death by it).
const STOPPED_BY_SIGNAL: i32 = 128 + 15;

/// Makes the worker fill placeholders through a private clone of the store's mount that
/// raises no event of the group: without it, each open and write of a fill raises an event
/// the holder must answer (it allows the worker's own at once), two context switches each.
/// Where the clone or its ignore mark cannot be made, fills go through the store's path.
fn fill_without_events(store: &mut Store, group: &Group) {
    let private = store
        .private_mount()
        .map_err(|e| e.to_string())
        .and_then(|root| {
            group
                .ignore_mount(std::os::fd::AsFd::as_fd(&root))
                .map(|()| root)
                .map_err(|e| format!("an ignore mark on the private mount: {e}"))
        });
    match private {
        Ok(root) => store.fill_through(root),
        // Expected on a store whose filesystem takes no pre-content marks (FUSE mode on
        // tmpfs, say), where fills raise no events anyway: not a warning.
        Err(e) => tracing::info!("fills go through the store's path ({e})"),
    }
}

impl Worker {
    /// Makes durable which files of every served layer hold their data.
    fn persist_all(&self) {
        let layers: Vec<Arc<Managed>> = self
            .layers
            .lock()
            .expect("layers")
            .values()
            .cloned()
            .collect();
        for managed in layers {
            if let Err(e) = managed.layer.persist() {
                tracing::error!("layer {}: persisting state: {e}", managed.layer.digest);
            }
        }
    }

    /// Whether nothing is lazy: no layer served, no FUSE mount up, no lazy layer in the store.
    fn idle(&self) -> bool {
        if !self.layers.lock().expect("layers").is_empty() || !self.fuse_mounted().is_empty() {
            return false;
        }
        // A failed layer's files stay denied until it is removed (`rmi`, `gc`): leaving would
        // take the marks, and older mounts would read what the index lied about.
        let denied: Vec<Digest> = self
            .denied
            .lock()
            .expect("denied")
            .iter()
            .cloned()
            .collect();
        if denied.iter().any(|d| {
            matches!(
                self.store.phase(d),
                Ok(Some(lazylayer_store::Phase::Failed)) | Err(_)
            )
        }) {
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

    /// Layers whose FUSE mount (served by the holder) is up, as the kernel says.
    fn fuse_mounted(&self) -> Vec<Digest> {
        let digests = match self.store.layer_digests() {
            Ok(digests) => digests,
            Err(e) => {
                tracing::warn!("listing the store's layers: {e}");
                return Vec::new();
            }
        };
        let mut mounted: Vec<Digest> = digests
            .into_iter()
            .filter(|d| crate::holder::fuse_layers::is_fuse_mount(&self.store.fuse_mountpoint(d)))
            .collect();
        mounted.dedup();
        mounted
    }
}
