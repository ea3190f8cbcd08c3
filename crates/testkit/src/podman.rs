//! A private podman (Debian's 4.3, root): its own storage.conf (overlay driver, graphroot and
//! runroot in a temporary directory, an additional layer store) and containers.conf (its own
//! tmp_dir, cgroupfs, file events), given to every command through `CONTAINERS_STORAGE_CONF`
//! and `CONTAINERS_CONF`, so that tests run side by side and leave nothing in the host's
//! podman. Its containers and images are removed, and its mounts undone, on drop.
//!
//! This machine kind needs `--runtime runc` (crun fails on its hybrid cgroup set-up) and
//! `--ulimit nofile=1024:1024 --ulimit nproc=1024:1024` (the sandbox lacks CAP_SYS_RESOURCE to
//! raise limits): [`Podman::run_args`] adds them. Containers get `--network none`: the
//! workloads need no network, and setting one up is not what is measured or tested.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A private podman.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    /// A podman whose storage takes layers from the additional layer store at `layer_store`
    /// (mounted before any command runs), or none.
    pub fn new(layer_store: Option<&Path>) -> Podman {
        Podman::new_in(&std::env::temp_dir(), layer_store)
    }

    /// [`new`](Self::new), with podman's storage in a new directory under `base` (a benchmark
    /// puts every contender on the same filesystem).
    pub fn new_in(base: &Path, layer_store: Option<&Path>) -> Podman {
        crate::require_tool("podman");
        crate::require_tool("runc");
        let dir = tempfile::Builder::new()
            .prefix("ll-podman.")
            .tempdir_in(base)
            .expect("a directory for podman");
        let d = dir.path();
        let stores = match layer_store {
            Some(path) => format!("additionallayerstores = [\"{}:ref\"]\n", path.display()),
            None => String::new(),
        };
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\"\n\
                 [storage.options]\n{stores}",
                d = d.display()
            ),
        )
        .expect("writing storage.conf");
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[engine]\ntmp_dir = \"{d}/tmp\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\nevents_logfile_path = \"{d}/events.log\"\n",
                d = d.display()
            ),
        )
        .expect("writing containers.conf");
        Podman { dir }
    }

    /// Its graph root (where containers/storage keeps layers and images).
    pub fn graphroot(&self) -> PathBuf {
        self.dir.path().join("graph")
    }

    /// `podman ARGS` with this podman's configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Runs `podman ARGS`.
    pub fn podman(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("running podman: {e}"))
    }

    /// Runs `podman ARGS` and returns its stdout; fails the test, with stderr, if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.podman(args);
        assert!(
            output.status.success(),
            "podman {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The options `podman run` needs on this machine kind (see the module docs), then
    /// `--tls-verify=false` for the loopback registry.
    pub fn run_args() -> [&'static str; 9] {
        [
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "none",
            "--tls-verify=false",
        ]
    }

    /// `podman run --rm IMAGE COMMAND...`; its stdout.
    pub fn run(&self, image: &str, command: &[&str]) -> String {
        let mut args = vec!["run", "--rm"];
        args.extend(Podman::run_args());
        args.push(image);
        args.extend_from_slice(command);
        self.ok(&args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .podman(&["rm", "--all", "--force", "--time", "0"])
            .status;
        let _ = self.podman(&["rmi", "--all", "--force"]).status;
        crate::unmount_everything_under(self.dir.path());
    }
}
