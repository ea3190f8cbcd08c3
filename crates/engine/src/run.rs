//! Running a container on a lazily pulled image: a run directory under the store (writable
//! layer, work directory, mount point), the container helper started as a fresh
//! single-threaded process of the engine's program, signals passed on to it, its exit code
//! returned, and everything removed afterwards; optionally the files the workload waited for
//! saved as the image's prefetch profile.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use lazylayer_container::{ContainerSpec, HELPER_ARGUMENT, ImageRuntimeConfig};
use lazylayer_daemon::keeper::Keeper;
use lazylayer_daemon::{Request, client};
use lazylayer_source::Digest;
use lazylayer_store::{FrontendMode, ImageRecord, Profile, ProfileEntry, Store};
use tokio::signal::unix::{SignalKind, signal};

use crate::pull::{PullEvent, PullOptions};
use crate::{Engine, Error, Result};

/// What to run, and how.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The image reference.
    pub image: String,
    /// The command and its arguments (empty: the image's Entrypoint and Cmd).
    pub command: Vec<String>,
    /// How the image is pulled.
    pub pull: PullOptions,
    /// Keep the container's writable layer afterwards.
    pub keep: bool,
    /// Host name inside the container.
    pub hostname: String,
    /// Save the files the workload waited for as the image's prefetch profile (added to the
    /// profile the store has for the image, if any).
    pub record: bool,
    /// Afterwards, push the image's prefetch profile to its registry and bind it to the image
    /// (see [`Engine::push_profile`]).
    pub push_profile: bool,
}

/// The profile a run recorded.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Where the store keeps it.
    pub path: PathBuf,
    /// Files the workload waited for in this run.
    pub waited: usize,
    /// Files the profile lists now (those of earlier runs first).
    pub listed: usize,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The workload's exit code (128 + signal number when a signal ended it).
    pub exit_code: i32,
    /// Where the writable layer was kept, with [`RunOptions::keep`].
    pub kept: Option<PathBuf>,
    /// The profile saved, with [`RunOptions::record`].
    pub recorded: Option<Recorded>,
    /// [`RunOptions::record`] was asked for but every layer was local already: a profile
    /// would have been empty, and none was written.
    pub nothing_to_record: bool,
    /// The profile pushed, with [`RunOptions::push_profile`].
    pub pushed: Option<crate::PushedProfile>,
}

/// A run's directory under the root: the writable layer and the mount point.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes what runs left behind when they were killed (their process is gone).
pub fn clean_stale_runs(store: &Store) {
    let Ok(listing) = std::fs::read_dir(store.runs_dir()) else {
        return;
    };
    for entry in listing.flatten() {
        let path = entry.path();
        // Dot files are not runs (the daemon binds its socket here before moving it).
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if !run_is_alive(&path) && !path.join("keep").exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Whether the process that made the run directory `dir` (named `<pid>-<random>`) lives. The
/// pid is in the name, so a run is never taken for stale in the moment between making its
/// directory and writing into it.
fn run_is_alive(dir: &Path) -> bool {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let pid: Option<i32> = name
        .split_once('-')
        .and_then(|(pid, _)| pid.parse().ok())
        .or_else(|| {
            // Directories of earlier versions have the pid in a file.
            std::fs::read_to_string(dir.join("pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
        });
    pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

fn io(context: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{context} {}", path.display());
    move |e| Error::io(context, e)
}

impl Engine {
    /// Pulls `options.image` lazily and runs the command in a container on it (see the module
    /// docs); returns once the workload has exited.
    pub async fn run(
        &self,
        options: &RunOptions,
        progress: &(dyn Fn(PullEvent<'_>) + Sync),
    ) -> Result<RunOutcome> {
        let pulled = self.pull(&options.image, &options.pull, progress).await?;
        let image = pulled.image;
        let store = &self.store;
        let config = ImageRuntimeConfig::from_image_config(&image.config);
        let command = config.command(&options.command);
        if command.is_empty() {
            return Err(Error::Refused(format!(
                "{} has no Entrypoint or Cmd: give a command after --",
                image.reference
            )));
        }
        clean_stale_runs(store);
        let id = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
        let dir = RunDir {
            path: store.runs_dir().join(&id),
            keep: options.keep,
        };
        for sub in ["upper", "work", "rootfs"] {
            let path = dir.path.join(sub);
            std::fs::create_dir_all(&path).map_err(io("creating", &path))?;
        }
        if options.keep {
            let keep = dir.path.join("keep");
            std::fs::write(&keep, b"").map_err(io("writing", &keep))?;
        }
        let spec = ContainerSpec {
            lowers: store.overlay_lowers(&image)?,
            upper: dir.path.join("upper"),
            work: dir.path.join("work"),
            rootfs: dir.path.join("rootfs"),
            args: command,
            env: config.environment(&options.hostname),
            cwd: config
                .working_dir
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
            user: config.user.clone().unwrap_or_default(),
            hostname: options.hostname.clone(),
        };
        // With every layer of the image local, the workload waits for nothing: a profile
        // recorded now would be empty and replace a useful one.
        let lazy = store.lazy_image_layers()?;
        let record = options.record && image.layers.iter().any(|l| lazy.contains(&l.digest));
        let demanded_before = if record {
            let response = client::request(&store.socket(), &Request::Status)
                .await
                .map_err(|e| Error::Daemon(format!("asking the daemon for its status: {e}")))?;
            response.status.map_or(0, |s| s.demanded_files)
        } else {
            0
        };
        let spec_path = dir.path.join("spec.json");
        let spec_bytes = serde_json::to_vec(&spec).expect("a container spec serialises");
        std::fs::write(&spec_path, spec_bytes).map_err(io("writing", &spec_path))?;
        let keeper = self.keep_group(&image, &lazy);
        let watchdog = keeper.as_ref().map(|_| {
            let engine = self.clone();
            tokio::spawn(async move { engine.restart_daemon_when_gone().await })
        });
        let exit_code = self.run_helper(&spec_path).await;
        if let Some(watchdog) = watchdog {
            watchdog.abort();
        }
        drop(keeper);
        let exit_code = exit_code?;
        let kept = options.keep.then(|| dir.path.join("upper"));
        let recorded = if record {
            let files: Vec<ProfileEntry> = demanded(store, demanded_before)
                .await?
                .into_iter()
                .filter(|f| image.layers.iter().any(|l| l.digest == f.layer))
                .collect();
            let path = store.profile_path(&image.manifest);
            let waited = files.len();
            let earlier = Profile::load(&path)?
                .filter(|p| p.manifest.as_ref().is_none_or(|m| *m == image.manifest))
                .unwrap_or_default();
            let profile = Profile {
                manifest: Some(image.manifest.clone()),
                ..earlier.merged(files)
            };
            profile.save(&path)?;
            Some(Recorded {
                path,
                waited,
                listed: profile.files.len(),
            })
        } else {
            None
        };
        let pushed = if options.push_profile {
            Some(
                self.push_profile(&options.image, options.pull.platform.as_deref())
                    .await?,
            )
        } else {
            None
        };
        Ok(RunOutcome {
            exit_code,
            kept,
            recorded,
            nothing_to_record: options.record && !record,
            pushed,
        })
    }

    /// While the container reads lazy fanotify layers of `image`, this process keeps the
    /// daemon's fanotify group: if both daemon processes die, readers wait instead of reading
    /// zeros, and the next daemon takes the group over (see `lazylayer_daemon::keeper`).
    fn keep_group(&self, image: &ImageRecord, lazy: &[Digest]) -> Option<Keeper> {
        let fanotify = image.layers.iter().any(|l| {
            lazy.contains(&l.digest)
                && matches!(self.store.mode(&l.digest), Ok(FrontendMode::Fanotify))
        });
        if !fanotify {
            return None;
        }
        match client::group_fd(&self.store.socket()).and_then(|fd| Keeper::start(&self.store, fd)) {
            Ok(keeper) => Some(keeper),
            Err(e) => {
                tracing::warn!(
                    "keeping the fanotify group for the container: {e}; if both daemon \
                     processes die, its lazy files read as zeros"
                );
                None
            }
        }
    }

    /// Starts a daemon again whenever none answers while a layer is lazy (both processes died:
    /// the group this process keeps makes readers wait for it).
    async fn restart_daemon_when_gone(&self) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if client::is_running(&self.store.socket()).await {
                continue;
            }
            match self.store.lazy_image_layers() {
                Ok(lazy) if lazy.is_empty() => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("reading the store: {e}");
                    continue;
                }
            }
            tracing::warn!(
                "the daemon is gone while a container reads lazy layers: starting another"
            );
            if let Err(e) = self.start_daemon().await {
                tracing::warn!("starting the daemon again: {e}");
            }
        }
    }

    /// Runs the container helper on `spec_path` (a fresh single-threaded process: this one
    /// has threads), passing on SIGINT, SIGTERM and SIGHUP; returns the workload's exit code.
    async fn run_helper(&self, spec_path: &Path) -> Result<i32> {
        let mut command = tokio::process::Command::new(&self.options.program);
        command
            .arg(HELPER_ARGUMENT)
            .arg(spec_path)
            .kill_on_drop(false);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no Rust state: if
        // this process is killed, the helper (and with it the whole container) dies too.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // Caught before the helper starts: a signal from then on is passed on, and the helper
        // does not inherit an ignored SIGINT from this process's caller.
        let signals = |kind| signal(kind).map_err(|e| Error::io("catching signals", e));
        let mut interrupt = signals(SignalKind::interrupt())?;
        let mut terminate = signals(SignalKind::terminate())?;
        let mut hangup = signals(SignalKind::hangup())?;
        let program = self.options.program.display().to_string();
        let mut child = command
            .spawn()
            .map_err(|e| Error::io(format!("starting the container helper {program}"), e))?;
        let pid = child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        let status = loop {
            let forwarded = tokio::select! {
                status = child.wait() => break status.map_err(|e| Error::io("waiting for the container", e))?,
                _ = interrupt.recv() => rustix::process::Signal::INT,
                _ = terminate.recv() => rustix::process::Signal::TERM,
                _ = hangup.recv() => rustix::process::Signal::HUP,
            };
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, forwarded);
            }
        };
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(1)))
    }
}

/// The files readers have waited for since the `since`-th (from the daemon; none when no
/// daemon runs).
async fn demanded(store: &Store, since: usize) -> Result<Vec<ProfileEntry>> {
    if !client::is_running(&store.socket()).await {
        return Ok(Vec::new());
    }
    let response = client::request(&store.socket(), &Request::Demanded { since })
        .await
        .map_err(|e| Error::Daemon(format!("asking the daemon what was waited for: {e}")))?;
    Ok(response.demanded.unwrap_or_default())
}

/// The container helper's entry point, for the program an [`Engine`] names: call it first
/// thing in `main`. When this process was started as the helper (`PROGRAM __container
/// SPEC.json`), it runs the container and returns the exit code to exit with; otherwise
/// `None`.
pub fn container_helper_main() -> Option<i32> {
    let mut argv = std::env::args();
    if argv.nth(1).as_deref() != Some(HELPER_ARGUMENT) {
        return None;
    }
    let spec_path = argv.next().unwrap_or_default();
    let spec: ContainerSpec = match std::fs::read(&spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("lazylayer run: cannot read {spec_path}: {e}");
            return Some(125);
        }
    };
    Some(lazylayer_container::runtime::run(&spec))
}
