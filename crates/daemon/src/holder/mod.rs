//! `lazylayer serve`: the holder process. It takes the store's lock, creates the fanotify
//! group and the control socket, and starts the worker (this same program with
//! `--worker-fds`), handing it both. It then only relays the group's events to the worker and
//! the worker's answers back ([`pending`]), serves the FUSE mounts of lazy FUSE layers
//! ([`fuse_layers`]), and starts a new worker when one dies: readers of unfilled files wait
//! meanwhile instead of failing open to zeros, and what the dead worker left unanswered goes
//! to the next one. The worker keeps a copy of the group too, so the group outlives the holder
//! as well (the worker then reads it itself).

pub mod fuse_layers;
pub mod pending;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazylayer_fanotify::{Group, supports_pre_content};
use lazylayer_store::Store;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::ServeError;
use crate::handover::WorkerFds;
use crate::options::{ServeOptions, WORKER_CANNOT_START};
use crate::relay::{ToHolder, ToWorker};
use fuse_layers::FuseLayers;
use pending::Relay;

/// A worker that ran at least this long before dying is restarted at once; one that dies
/// sooner is restarted after a growing pause (a crash loop does not spin).
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Runs the holder until the worker exits cleanly (shutdown, or idle with `exit_when_idle`) or
/// a SIGTERM/SIGINT arrives (passed on to the worker).
pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let store = Store::new(&options.root);
    store.make_private()?;
    let socket = store.socket();
    worker_program().map_err(|e| ServeError::io("finding this program", e))?;
    // One daemon per store: an exclusive lock held for the holder's life.
    let lock_path = store.serve_lock();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ServeError::io(format!("opening {}", lock_path.display()), e))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(ServeError::AlreadyRunning(
            options.root.display().to_string(),
        ));
    }
    let pre_content = supports_pre_content(&options.root)
        .map_err(|e| ServeError::io(format!("probing {}", options.root.display()), e))?;
    if !pre_content {
        tracing::info!(
            "{} cannot take fanotify pre-content marks: its lazy layers are served with FUSE",
            options.root.display()
        );
    }
    // The group the service manager or a keeper held through the last daemon's death, or a
    // new one (then stored with the service manager, if there is one).
    let from_manager = crate::systemd::stored_group();
    let store_it = from_manager.is_none();
    let group = match from_manager.or_else(|| crate::keeper::collect_group(&store)) {
        Some(group) => {
            let denied = crate::keeper::deny_orphans(&group, crate::keeper::fd_limit());
            tracing::warn!(
                "{denied} access(es) the dead daemon had read and not answered get EIO; the \
                 others are served as usual"
            );
            group
        }
        None => Group::new().map_err(|e| ServeError::io("fanotify_init", e))?,
    };
    let listener = bind_private(&store)?;
    // An event no worker answered within twice the readers' deadline is denied.
    let relay = Relay::new(group, options.deadline * 2);
    if store_it {
        crate::systemd::notify_ready_and_store(relay.group());
    }
    let thread = |name: &str, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(body)
            .map(drop)
            .map_err(|e| ServeError::io(format!("starting thread {name}"), e))
    };
    {
        let relay = relay.clone();
        thread(
            "fanotify-holder",
            Box::new(move || {
                if let Err(e) = relay.run() {
                    tracing::error!("reading fanotify events failed: {e}");
                    std::process::exit(1);
                }
            }),
        )?;
    }
    {
        let relay = relay.clone();
        thread(
            "fanotify-expiry",
            Box::new(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    // The last safety net of every waiting reader: it must not die.
                    let expired =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| relay.expire()));
                    if expired.is_err() {
                        tracing::error!("denying expired events panicked; trying again");
                    }
                }
            }),
        )?;
    }
    // Lazy FUSE layers are served here, mounted when the worker asks; this looks for mounts
    // of detached layers that no overlay uses any more.
    let fuse = Arc::new(FuseLayers::new(store.clone(), relay.clone()));
    {
        let fuse = fuse.clone();
        thread(
            "fuse-layers",
            Box::new(move || {
                loop {
                    fuse.scan();
                    std::thread::sleep(Duration::from_secs(2));
                }
            }),
        )?;
    }
    let signals = |kind| signal(kind).map_err(|e| ServeError::io("catching signals", e));
    let mut terminate = signals(SignalKind::terminate())?;
    let mut interrupt = signals(SignalKind::interrupt())?;
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
        let (mut worker, pid) = spawn_worker(&relay, &fuse, &listener)?;
        let status = loop {
            tokio::select! {
                status = worker.wait() => break status,
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
                _ = drained.notified(), if draining => {
                    tracing::info!("every lazy layer is detached; stopping");
                    return stop(worker, &socket, &fuse).await;
                }
            }
            // A signal to stop. Without this process and its worker, a lazy layer reads zeros
            // where data is not local, through any path to it: an overlay, a bind mount, an
            // open file or a working directory inside it. Whether it is in use cannot be told
            // safely, so every lazy layer is filled and detached first, unless told twice.
            let lazy = lazy_layers(&store);
            if lazy.is_empty() {
                return stop(worker, &socket, &fuse).await;
            }
            if draining {
                tracing::warn!(
                    "stopping now, as told twice: {} lazy layer(s) will read zeros where data is \
                     not local",
                    lazy.len()
                );
                return stop(worker, &socket, &fuse).await;
            }
            tracing::warn!(
                "{} lazy layer(s): filling and detaching them before stopping (signal again to \
                 stop now, and have them read zeros where data is not local)",
                lazy.len()
            );
            draining = true;
            tokio::spawn(drain(socket.clone(), lazy, drained.clone()));
        };
        relay.detach_worker();
        let was_first = std::mem::replace(&mut first, false);
        match status {
            Ok(status) if status.success() => {
                tracing::info!("worker {pid} finished; the daemon stops");
                drop(lock);
                return Ok(());
            }
            Ok(status) if was_first && status.code() == Some(WORKER_CANNOT_START) => {
                let _ = std::fs::remove_file(&socket);
                return Err(ServeError::WorkerCannotStart);
            }
            Ok(status) => tracing::error!(
                "worker {pid} died ({status}) with {} events pending; starting another",
                relay.pending()
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

/// The store's lazy layers; a layer whose record cannot be read counts as lazy (stopping as if
/// it were not could leave it to read zeros).
fn lazy_layers(store: &Store) -> Vec<lazylayer_source::Digest> {
    use lazylayer_store::Phase;
    let digests = match store.layer_digests() {
        Ok(digests) => digests,
        Err(e) => {
            tracing::error!("listing the store's layers before stopping: {e}");
            return Vec::new();
        }
    };
    let mut lazy: Vec<lazylayer_source::Digest> = digests
        .into_iter()
        .filter(|d| match store.phase(d) {
            Ok(phase) => phase == Some(Phase::Lazy),
            Err(e) => {
                tracing::error!("layer {d}: {e}; taken for lazy");
                true
            }
        })
        .collect();
    lazy.dedup();
    lazy
}

/// Has the worker (whichever runs: it may be restarted meanwhile) fill `layers` at full speed,
/// logs how far it got every few seconds, and says so once each is detached (or has failed:
/// it can never be).
async fn drain(
    socket: PathBuf,
    layers: Vec<lazylayer_source::Digest>,
    drained: Arc<tokio::sync::Notify>,
) {
    let urgent = crate::Request::Detach {
        layers: layers.clone(),
        wait: false,
    };
    let mut last_report = Instant::now();
    loop {
        // Asked again each time: a restarted worker has forgotten the urgency.
        let answer = match crate::client::request(&socket, &urgent).await {
            Ok(response) if response.ok => response.status,
            Ok(response) => {
                tracing::warn!(
                    "filling the lazy layers before stopping: {}",
                    response.error.unwrap_or_default()
                );
                None
            }
            Err(e) => {
                tracing::debug!("asking the worker to detach: {e}; retrying");
                None
            }
        };
        if let Some(status) = answer {
            let ours: Vec<_> = status
                .layers
                .iter()
                .filter(|l| layers.contains(&l.digest))
                .collect();
            let open: Vec<_> = ours
                .iter()
                .filter(|l| l.phase != lazylayer_store::Phase::Detached && !l.failed)
                .collect();
            if open.is_empty() {
                for failed in ours.iter().filter(|l| l.failed) {
                    tracing::error!(
                        "layer {} cannot be detached ({}): after the stop it reads zeros where \
                         data is not local",
                        failed.digest,
                        failed.error.as_deref().unwrap_or("failed")
                    );
                }
                break;
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                let (files, filled) = open
                    .iter()
                    .fold((0, 0), |(f, p), l| (f + l.files, p + l.files_populated));
                tracing::warn!(
                    "stopping: {} lazy layer(s) still filling, {filled} of {files} files",
                    open.len()
                );
                last_report = Instant::now();
            }
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
    relay: &Arc<Relay>,
    fuse: &Arc<FuseLayers>,
    listener: &std::os::unix::net::UnixListener,
) -> Result<(tokio::process::Child, i32), ServeError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| ServeError::io("making the relay socket pair", e))?;
    let fds = [
        relay.group().as_fd().as_raw_fd(),
        theirs.as_raw_fd(),
        listener.as_raw_fd(),
    ];
    let exe = worker_program().map_err(|e| ServeError::io("finding this program", e))?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--worker-fds")
        .arg(WorkerFds::to_arg(fds[0], fds[1], fds[2]))
        .stdin(std::process::Stdio::null());
    // The service manager's variables are the holder's, not the worker's.
    for variable in crate::systemd::MANAGER_VARIABLES {
        command.env_remove(variable);
    }
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
        .map_err(|e| ServeError::io("starting the worker", e))?;
    drop(theirs);
    let pid = child.id().map_or(-1, |pid| pid as i32);
    let answers = ours
        .try_clone()
        .map_err(|e| ServeError::io("cloning the relay socket", e))?;
    relay.attach_worker(pid, ours);
    let (relay, fuse) = (relay.clone(), fuse.clone());
    std::thread::Builder::new()
        .name("worker-answers".into())
        .spawn(move || {
            relay.take_answers(answers, &|request| answer_request(&relay, &fuse, request))
        })
        .map_err(|e| ServeError::io("starting the answer thread", e))?;
    tracing::info!("worker {pid} started");
    Ok((child, pid))
}

/// Carries out a worker's request and sends it the answer (a mount on a thread of its own:
/// answers to events keep flowing meanwhile).
fn answer_request(relay: &Arc<Relay>, fuse: &Arc<FuseLayers>, request: ToHolder) {
    match request {
        ToHolder::MountFuse { request, layer } => {
            let (relay, fuse) = (relay.clone(), fuse.clone());
            let spawned = std::thread::Builder::new()
                .name("fuse-mount".into())
                .spawn(move || {
                    let error = fuse.ensure_mounted(&layer).err();
                    if let Some(error) = &error {
                        tracing::error!("layer {layer}: {error}");
                    }
                    relay.send_to_worker(&ToWorker::FuseMounted { request, error });
                });
            if let Err(e) = spawned {
                tracing::error!("starting a thread to mount a FUSE layer: {e}");
            }
        }
        ToHolder::QueryFuse { request } => relay.send_to_worker(&ToWorker::FuseState {
            request,
            reads: fuse.reads(),
            mounted: fuse.mounted().iter().map(|d| d.to_string()).collect(),
        }),
        ToHolder::Answer { .. } => {}
    }
}

/// The worker is told to stop (it persists what it filled), the FUSE mounts are taken down,
/// then the holder stops.
async fn stop(
    mut worker: tokio::process::Child,
    socket: &std::path::Path,
    fuse: &FuseLayers,
) -> Result<(), ServeError> {
    if let Some(pid) = worker
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), worker.wait()).await;
    fuse.unmount_all();
    let _ = std::fs::remove_file(socket);
    tracing::info!("stopped by a signal");
    Ok(())
}

/// Binds the control socket with mode 0600 (only root may ask the daemon anything), with no
/// moment in which it exists with other modes: it is bound in a directory only root may enter,
/// made 0600, then renamed into place.
fn bind_private(store: &Store) -> Result<std::os::unix::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let socket = store.socket();
    let aside = store
        .runs_dir()
        .join(format!(".lazylayer.sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&aside);
    let listener = std::os::unix::net::UnixListener::bind(&aside)
        .map_err(|e| ServeError::io(format!("binding {}", aside.display()), e))?;
    std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&aside, &socket))
        .map_err(|e| ServeError::io(format!("placing {}", socket.display()), e))?;
    Ok(listener)
}
