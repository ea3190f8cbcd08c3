//! A private containerd (Debian's, with its own config, root, state and socket in a temporary
//! directory) with lazylayer's snapshotter as a proxy plugin, and `ctr`/`ctr-remote` bound to
//! it. Tasks it ran are killed, and it is stopped, on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The namespace the tests' images and containers live in.
pub const NAMESPACE: &str = "lazytest";

/// A running containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with the proxy snapshotter `lazylayer` at `snapshotter_socket`.
    pub fn start(snapshotter_socket: &Path) -> Containerd {
        Containerd::start_with(&[("lazylayer", snapshotter_socket)], None)
    }

    /// Starts containerd with these proxy snapshotters (name, socket) and, given a sandbox
    /// (pause) image, its CRI plugin, using the `lazylayer` snapshotter with snapshot labels
    /// on and registries configured by `certs_dir()/HOST/hosts.toml`.
    pub fn start_with(proxies: &[(&str, &Path)], cri_sandbox_image: Option<&str>) -> Containerd {
        Containerd::start_in(&std::env::temp_dir(), proxies, cri_sandbox_image)
    }

    /// [`start_with`](Self::start_with), with containerd's root and state in a new directory
    /// under `base` (a benchmark puts every contender on the same filesystem).
    pub fn start_in(
        base: &Path,
        proxies: &[(&str, &Path)],
        cri_sandbox_image: Option<&str>,
    ) -> Containerd {
        crate::require_tool("containerd");
        crate::require_tool("ctr");
        let dir = tempfile::Builder::new()
            .prefix("ll-ctd.")
            .tempdir_in(base)
            .expect("a directory for containerd");
        let d = dir.path();
        let cri = cri_sandbox_image.is_some();
        let cri_section = if let Some(sandbox) = cri_sandbox_image {
            format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  # This machine's sandbox lacks CAP_SYS_RESOURCE: no negative oom_score_adj for the pause
  # container.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazylayer"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
                d = d.display()
            )
        } else {
            String::new()
        };
        let disabled = if cri {
            r#"disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]"#
        } else {
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]"#
        };
        let proxy_section: String = proxies
            .iter()
            .map(|(name, socket)| {
                format!(
                    "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                    socket.display()
                )
            })
            .collect();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
{disabled}
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{proxy_section}{cri_section}"#,
            d = d.display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("writing containerd's config");
        let mut containerd = Containerd { dir, child: None };
        containerd.launch();
        containerd
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .expect("containerd's log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ctr(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops containerd (SIGTERM; its containers' shims go on running) and starts it again
    /// with the same config, root and state.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::daemon::stop(&mut child);
        }
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// containerd's state directory (tasks' bundles and root filesystems are under it).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The hosts.toml directory CRI reads (`certs.d`).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// CRI's gRPC socket (containerd's own).
    pub fn cri_socket(&self) -> PathBuf {
        self.address()
    }

    /// A directory for CRI pod logs.
    pub fn pod_logs(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    /// Lets CRI pull from the plain-HTTP registry `host` (HOST:PORT), through its
    /// `certs.d/HOST/hosts.toml`.
    pub fn allow_plain_http(&self, host: &str) {
        let dir = self.certs_dir().join(host);
        std::fs::create_dir_all(&dir).expect("certs.d");
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("hosts.toml");
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` (or another containerd client, `program`) against this containerd in the
    /// test namespace.
    pub fn client(&self, program: &str, args: &[&str]) -> Output {
        self.client_in(NAMESPACE, program, args)
    }

    /// Runs `program ARGS` against this containerd in `namespace` (`k8s.io` is CRI's).
    pub fn client_in(&self, namespace: &str, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .arg("--address")
            .arg(self.address())
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Runs `ctr ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.client("ctr", args)
    }

    /// Runs `ctr ARGS` and returns its stdout; fails the test, with stderr and containerd's
    /// log, if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.ok("ctr", args)
    }

    /// Runs `ctr-remote ARGS` (stargz-snapshotter's ctr, whose `image rpull` sends the labels
    /// a remote snapshotter needs) and returns its stdout; fails the test if it fails.
    pub fn ctr_remote_ok(&self, args: &[&str]) -> String {
        crate::require_tool("ctr-remote");
        self.ok("ctr-remote", args)
    }

    fn ok(&self, program: &str, args: &[&str]) -> String {
        let output = self.client(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}\n{}\n--- containerd log (tail) ---\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The digests in containerd's content store (in the test namespace).
    pub fn content_digests(&self) -> Vec<String> {
        self.content_digests_in(NAMESPACE)
    }

    /// The digests in containerd's content store in `namespace`.
    pub fn content_digests_in(&self, namespace: &str) -> Vec<String> {
        let output = self.client_in(namespace, "ctr", &["content", "ls", "-q"]);
        assert!(output.status.success(), "ctr content ls failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Kills and deletes every task and container in the test namespace.
    pub fn remove_containers(&self) {
        let tasks = self.ctr(&["tasks", "ls", "-q"]);
        for id in String::from_utf8_lossy(&tasks.stdout).lines() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
        for id in String::from_utf8_lossy(&tasks.stdout).lines() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.ctr(&["tasks", "delete", id]).status.success() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let containers = self.ctr(&["containers", "ls", "-q"]);
        for id in String::from_utf8_lossy(&containers.stdout).lines() {
            let _ = self.ctr(&["containers", "delete", id]);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_containers();
        }
        self.stop();
        // Whatever containerd left mounted under its directories.
        crate::unmount_everything_under(self.dir.path());
    }
}
