//! `lazylayer run IMAGE [-- COMMAND ARGS...]`: pull lazily, then run the command (by default
//! the image's Entrypoint/Cmd) in a container on the image, and exit with its exit code.

use std::path::{Path, PathBuf};

use clap::Args;
use lazylayer_container::{ContainerSpec, ImageRuntimeConfig};
use lazylayer_store::{Profile, ProfileEntry, Store};

use crate::commands::pull::{Mode, pull_image};
use crate::options::GlobalArgs;

/// Options of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The image: HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:TAG].
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// The command and its arguments (default: the image's Entrypoint and Cmd).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// How lazy layers are served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Platform to pick from a multi-platform image (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Keep the container's writable layer (under --root/run) afterwards.
    #[arg(long)]
    pub keep: bool,

    /// Host name inside the container.
    #[arg(long, default_value = "lazylayer")]
    pub hostname: String,

    /// Record the files the workload waited for, in order, as the image's prefetch profile
    /// (--root/profiles/<manifest>.json): later pulls fill them first. Record on a cold image.
    #[arg(long)]
    pub record: bool,
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
pub fn clean_stale_runs(runs: &Path) {
    let Ok(listing) = std::fs::read_dir(runs) else {
        return;
    };
    for entry in listing.flatten() {
        let pid: Option<i32> = std::fs::read_to_string(entry.path().join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive && !entry.path().join("keep").exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `run`; returns the workload's exit code.
pub async fn run(global: &GlobalArgs, args: RunArgs) -> anyhow::Result<i32> {
    let (image, _) = pull_image(global, &args.image, args.platform.as_deref()).await?;
    let store = Store::new(&global.root);
    let config = ImageRuntimeConfig::from_image_config(&image.config);
    let command = config.command(&args.command);
    if command.is_empty() {
        anyhow::bail!(
            "{} has no Entrypoint or Cmd: give a command after --",
            image.reference
        );
    }
    let runs = global.root.join("run");
    clean_stale_runs(&runs);
    let id = format!("{:016x}", fastrand::u64(..));
    let dir = RunDir {
        path: runs.join(&id),
        keep: args.keep,
    };
    for sub in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(dir.path.join(sub))?;
    }
    std::fs::write(dir.path.join("pid"), std::process::id().to_string())?;
    if args.keep {
        std::fs::write(dir.path.join("keep"), b"")?;
    }
    let spec = ContainerSpec {
        lowers: image
            .layers
            .iter()
            .rev()
            .map(|l| store.lower_dir(&l.digest))
            .collect::<Result<_, _>>()?,
        upper: dir.path.join("upper"),
        work: dir.path.join("work"),
        rootfs: dir.path.join("rootfs"),
        args: command,
        env: config.environment(&args.hostname),
        cwd: config
            .working_dir
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: config.user.clone().unwrap_or_default(),
        hostname: args.hostname.clone(),
    };
    // With every layer of the image local, the workload waits for nothing: a profile recorded
    // now would be empty and replace a useful one.
    let lazy = store.lazy_image_layers()?;
    let record = args.record && image.layers.iter().any(|l| lazy.contains(&l.digest));
    if args.record && !record {
        eprintln!(
            "not recording a profile: every layer of {} is already local",
            image.reference
        );
    }
    let demanded_before = if record {
        let response =
            lazylayer_daemon::client::request(&store.socket(), &lazylayer_daemon::Request::Status)
                .await?;
        response.status.map_or(0, |s| s.demanded_files)
    } else {
        0
    };
    let spec_path = dir.path.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    // The container runs in a fresh single-threaded helper process (this one has threads).
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg(CONTAINER_HELPER)
        .arg(&spec_path)
        .kill_on_drop(false);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no Rust state: if this
    // process is killed, the helper (and with it the whole container) dies too.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id().unwrap_or(0) as i32;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let status = loop {
        let forwarded = tokio::select! {
            status = child.wait() => break status?,
            _ = interrupt.recv() => rustix::process::Signal::INT,
            _ = terminate.recv() => rustix::process::Signal::TERM,
            _ = hangup.recv() => rustix::process::Signal::HUP,
        };
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, forwarded);
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(1));
    if args.keep {
        eprintln!(
            "kept the container's writable layer in {}",
            dir.path.join("upper").display()
        );
    }
    if record {
        let files: Vec<ProfileEntry> = demanded(&store, demanded_before)
            .await?
            .into_iter()
            .filter(|f| image.layers.iter().any(|l| l.digest == f.layer))
            .collect();
        let path = store.profile_path(&image.manifest);
        let count = files.len();
        Profile {
            manifest: Some(image.manifest.clone()),
            files,
        }
        .save(&path)?;
        eprintln!(
            "recorded {count} files the workload waited for in {}",
            path.display()
        );
    }
    Ok(code)
}

/// The files readers have waited for since the `since`-th (from the daemon).
async fn demanded(store: &Store, since: usize) -> anyhow::Result<Vec<ProfileEntry>> {
    if !lazylayer_daemon::client::is_running(&store.socket()).await {
        return Ok(Vec::new());
    }
    let response = lazylayer_daemon::client::request(
        &store.socket(),
        &lazylayer_daemon::Request::Demanded { since },
    )
    .await?;
    Ok(response.demanded.unwrap_or_default())
}

/// The hidden first argument that makes `lazylayer` the container helper.
pub const CONTAINER_HELPER: &str = lazylayer_container::HELPER_ARGUMENT;

/// Entry point of the helper process: `lazylayer __container SPEC.json`.
pub fn container_helper(spec_path: &str) -> i32 {
    let spec: ContainerSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("lazylayer run: cannot read {spec_path}: {e}");
            return 125;
        }
    };
    lazylayer_container::runtime::run(&spec)
}
