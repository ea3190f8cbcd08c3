//! `lazylayer serve`: the holder process. It takes the store's lock, creates the fanotify
//! group and the control socket, and starts the worker (this same program with
//! `--worker-fds`), handing it both. It then only relays the group's events to the worker and
//! the worker's answers back (see `lazylayer_fanotify::holder`), and starts a new worker when
//! one dies: readers of unfilled files wait meanwhile instead of failing open to zeros, and the
//! events the dead worker left unanswered go to the next one. The worker keeps a copy of the
//! group too, so the group outlives the holder as well (the worker then reads it itself).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazylayer_fanotify::{Group, Holder, supports_pre_content};
use lazylayer_store::Store;
use tokio::signal::unix::{SignalKind, signal};

use crate::fuse_layers::FuseLayers;
use crate::worker::WorkerFds;

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
    /// Another daemon answers on the socket.
    #[error("a lazylayer daemon already serves {0}")]
    AlreadyRunning(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

pub(crate) fn other(e: impl std::fmt::Display) -> ServeError {
    ServeError::Other(e.to_string())
}

/// The exit status of a worker that could not start (bad store state, unreadable index): the
/// holder gives up if the first worker says so, instead of restarting it forever.
pub const WORKER_CANNOT_START: i32 = 3;

/// A worker that ran at least this long before dying is restarted at once; one that dies
/// sooner is restarted after a growing pause (a crash loop does not spin).
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Runs the holder until the worker exits cleanly (shutdown, or idle with `exit_when_idle`) or
/// a SIGTERM/SIGINT arrives (passed on to the worker).
pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    std::fs::create_dir_all(&options.root).map_err(other)?;
    let store = Store::new(&options.root);
    let socket = store.socket();
    worker_program().map_err(other)?;
    // One daemon per store: an exclusive lock held for the holder's life.
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
        tracing::info!(
            "{} cannot take fanotify pre-content marks: its lazy layers are served with FUSE",
            options.root.display()
        );
    }
    let group = Group::new().map_err(|e| other(format!("fanotify_init: {e}")))?;
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .map_err(|e| other(format!("binding {}: {e}", socket.display())))?;
    // An event no worker answered within twice the readers' deadline is denied.
    let holder = Holder::new(group, options.deadline * 2);
    {
        let holder = holder.clone();
        std::thread::Builder::new()
            .name("fanotify-holder".into())
            .spawn(move || {
                if let Err(e) = holder.run() {
                    tracing::error!("reading fanotify events failed: {e}");
                    std::process::exit(1);
                }
            })
            .map_err(other)?;
    }
    {
        let holder = holder.clone();
        std::thread::Builder::new()
            .name("fanotify-expiry".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    holder.expire();
                }
            })
            .map_err(other)?;
    }
    // Lazy FUSE layers are served here; the worker asks for a look (SIGUSR1) after a pull.
    let fuse = Arc::new(FuseLayers::new(store.clone(), holder.clone()));
    let (wake_fuse, fuse_woken) = std::sync::mpsc::channel::<()>();
    {
        let fuse = fuse.clone();
        std::thread::Builder::new()
            .name("fuse-layers".into())
            .spawn(move || {
                loop {
                    fuse.scan();
                    match fuse_woken.recv_timeout(Duration::from_secs(2)) {
                        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .map_err(other)?;
    }
    let mut look_again = signal(SignalKind::user_defined1()).map_err(other)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(other)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(other)?;
    tracing::info!(
        "holding {} (pid {})",
        options.root.display(),
        std::process::id()
    );
    let mut pause = Duration::from_millis(100);
    let mut first = true;
    let drained = Arc::new(tokio::sync::Notify::new());
    let mut draining = false;
    loop {
        let started = Instant::now();
        let (mut worker, pid) = spawn_worker(&holder, &listener)?;
        let status = loop {
            tokio::select! {
                status = worker.wait() => break status,
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
                _ = drained.notified(), if draining => {
                    tracing::info!("every mounted lazy layer is detached; stopping");
                    return stop(worker, &socket).await;
                }
                _ = look_again.recv() => {
                    let _ = wake_fuse.send(());
                    continue;
                }
            }
            // A signal to stop. Without this process and its worker, mounted lazy layers
            // would read zeros where data is not local yet: fill them first, unless told twice.
            let busy = mounted_lazy_layers(&store);
            if busy.is_empty() {
                return stop(worker, &socket).await;
            }
            if draining {
                tracing::warn!(
                    "stopping now, as told twice: {} mounted lazy layer(s) will read zeros where \
                     data is not local",
                    busy.len()
                );
                return stop(worker, &socket).await;
            }
            tracing::warn!(
                "{} lazy layer(s) are mounted: filling them before stopping (signal again to \
                 stop now, and have those mounts read zeros where data is not local)",
                busy.len()
            );
            draining = true;
            tokio::spawn(drain(socket.clone(), busy, drained.clone()));
        };
        holder.detach_worker();
        let was_first = std::mem::replace(&mut first, false);
        match status {
            Ok(status) if status.success() => {
                tracing::info!("worker {pid} finished; the daemon stops");
                drop(lock);
                return Ok(());
            }
            Ok(status) if was_first && status.code() == Some(WORKER_CANNOT_START) => {
                let _ = std::fs::remove_file(&socket);
                return Err(other(
                    "the worker could not start (its error is in the lines above)",
                ));
            }
            Ok(status) => tracing::error!(
                "worker {pid} died ({status}) with {} events pending; starting another",
                holder.pending()
            ),
            Err(e) => tracing::error!("waiting for worker {pid}: {e}; starting another"),
        }
        pause = if started.elapsed() >= HEALTHY_RUN {
            Duration::from_millis(100)
        } else {
            (pause * 2).min(Duration::from_secs(5))
        };
        tokio::time::sleep(pause).await;
    }
}

/// The lazy layers of the store that an overlay mount uses, in any mount namespace.
fn mounted_lazy_layers(store: &Store) -> Vec<lazylayer_source::Digest> {
    let Ok(tables) = lazylayer_overlay::MountTables::scan() else {
        // Unknown: assume every lazy layer is in use.
        return lazy_layers(store);
    };
    lazy_layers(store)
        .into_iter()
        .filter(|digest| {
            tables.overlay_uses(&store.layer_fs(digest))
                || tables.overlay_uses(&store.fuse_mountpoint(digest))
        })
        .collect()
}

fn lazy_layers(store: &Store) -> Vec<lazylayer_source::Digest> {
    let mut lazy: Vec<lazylayer_source::Digest> = store
        .layer_digests()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| store.phase(d).ok().flatten() == Some(lazylayer_store::Phase::Lazy))
        .collect();
    lazy.dedup();
    lazy
}

/// Asks the worker (whichever runs: it may be restarted meanwhile) to fill `layers` now and
/// answer once they are detached; then says so.
async fn drain(
    socket: PathBuf,
    layers: Vec<lazylayer_source::Digest>,
    drained: Arc<tokio::sync::Notify>,
) {
    let request = crate::Request::Detach { layers, wait: true };
    loop {
        match crate::client::request(&socket, &request).await {
            Ok(response) if response.ok => break,
            Ok(response) => tracing::warn!(
                "filling the mounted lazy layers before stopping: {}",
                response.error.unwrap_or_default()
            ),
            Err(e) => tracing::debug!("asking the worker to detach: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drained.notify_one();
}

/// The program workers run: this program's path as it was when the holder started, so that a
/// binary replaced there (an upgrade) runs in the next worker, while the holder keeps the
/// connections. (`current_exe` later would name the replaced file, which is gone.)
fn worker_program() -> std::io::Result<PathBuf> {
    static PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(path) = PROGRAM.get() {
        return Ok(path.clone());
    }
    let path = std::env::current_exe()?;
    Ok(PROGRAM.get_or_init(|| path).clone())
}

/// Starts a worker: this program again, with the same arguments plus `--worker-fds`.
fn spawn_worker(
    holder: &Arc<Holder>,
    listener: &std::os::unix::net::UnixListener,
) -> Result<(tokio::process::Child, i32), ServeError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(other)?;
    let fds = [
        holder.group().as_fd().as_raw_fd(),
        theirs.as_raw_fd(),
        listener.as_raw_fd(),
    ];
    let exe = worker_program().map_err(other)?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--worker-fds")
        .arg(WorkerFds::to_arg(fds[0], fds[1], fds[2]))
        .stdin(std::process::Stdio::null());
    // SAFETY: runs in the child between fork and exec; fcntl is async-signal-safe and only
    // clears close-on-exec on the three descriptors the worker is to inherit.
    unsafe {
        command.pre_exec(move || {
            for fd in fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| other(format!("starting the worker: {e}")))?;
    drop(theirs);
    let pid = child.id().map_or(-1, |pid| pid as i32);
    let answers = ours.try_clone().map_err(other)?;
    holder.attach_worker(pid, ours);
    let holder = holder.clone();
    std::thread::Builder::new()
        .name("worker-answers".into())
        .spawn(move || holder.take_answers(answers))
        .map_err(other)?;
    tracing::info!("worker {pid} started");
    Ok((child, pid))
}

/// The worker is told to stop, then the holder stops.
async fn stop(
    mut worker: tokio::process::Child,
    socket: &std::path::Path,
) -> Result<(), ServeError> {
    if let Some(pid) = worker
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), worker.wait()).await;
    let _ = std::fs::remove_file(socket);
    tracing::info!("stopped by a signal");
    Ok(())
}
