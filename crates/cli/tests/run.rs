//! `lazylayer run` as a user runs it, as root: the image's Entrypoint, Cmd, Env, WorkingDir and
//! User; command-line overrides; exit codes; Ctrl-C; and nothing left behind, even when the
//! run itself is killed.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::shared_registry;
use lazylayer_testkit::require_root;

const EXE: &str = env!("CARGO_BIN_EXE_lazylayer");

fn lazylayer(root: &std::path::Path, args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run lazylayer")
}

/// A store root on the host's filesystem (ext4 in CI); its daemon is stopped on drop.
struct Root(tempfile::TempDir);

impl Root {
    fn new() -> Root {
        Root(
            tempfile::Builder::new()
                .prefix("lazylayer-run.")
                .tempdir_in("/var/tmp")
                .unwrap(),
        )
    }
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let status = lazylayer(self.path(), &["status", "--json"]);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&status.stdout)
            && value["daemon_running"] == true
            && let Some(pid) = value["pid"].as_i64()
        {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

fn overlay_mounts_under(path: &std::path::Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(path.to_str().unwrap()))
        .count()
}

#[test]
fn the_image_config_is_honoured() {
    if !require_root("the_image_config_is_honoured") {
        return;
    }
    let root = Root::new();
    let output = lazylayer(
        root.path(),
        &[
            "run",
            &format!("{}/test/debian:config", shared_registry().host()),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello from the image config\nnobody\n/tmp\n"
    );
}

#[test]
fn commands_run_and_their_exit_codes_come_back() {
    if !require_root("commands_run_and_their_exit_codes_come_back") {
        return;
    }
    let root = Root::new();
    let image = format!("{}/test/debian:bookworm", shared_registry().host());
    let output = lazylayer(
        root.path(),
        &[
            "run",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/os-release; id; hostname; exit 7",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("uid=0(root)") && stdout.contains("lazylayer\n"),
        "{stdout}"
    );
    // The pid namespace: the workload's shell is pid 2 under a small init.
    let output = lazylayer(
        root.path(),
        &[
            "run",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "echo $$; ls /proc | grep -c '^[0-9]'",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().next(),
        Some("2")
    );
    // The image's Cmd overridden by a command from PATH; a missing command is 127.
    let output = lazylayer(
        root.path(),
        &["run", &image, "--", "perl", "-e", "print 6*7"],
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "42");
    let output = lazylayer(root.path(), &["run", &image, "--", "no-such-command"]);
    assert_eq!(output.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&output.stderr).contains("command not found"));
    // Nothing stays mounted and the writable layer is gone; --keep keeps it.
    assert_eq!(overlay_mounts_under(root.path()), 0);
    assert_eq!(
        std::fs::read_dir(root.path().join("run")).unwrap().count(),
        0
    );
    let output = lazylayer(
        root.path(),
        &[
            "run",
            "--keep",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "echo kept > /kept",
        ],
    );
    assert!(output.status.success());
    let kept: Vec<_> = std::fs::read_dir(root.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        std::fs::read_to_string(kept[0].join("upper/kept")).unwrap(),
        "kept\n"
    );
    assert_eq!(overlay_mounts_under(root.path()), 0);
}

fn wait_for_process(name: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            if comm.replace('\0', " ").trim() == name {
                return entry.file_name().to_string_lossy().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "{name} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn ctrl_c_stops_the_workload_and_a_killed_run_leaves_nothing() {
    if !require_root("ctrl_c_stops_the_workload_and_a_killed_run_leaves_nothing") {
        return;
    }
    let root = Root::new();
    let image = format!("{}/test/debian:bookworm", shared_registry().host());
    // Ctrl-C (SIGINT to the run) reaches the workload; the run ends with its status.
    let mut run = Command::new(EXE)
        .arg("--root")
        .arg(root.path())
        .args(["run", &image, "--", "sleep", "1001"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let sleeper = wait_for_process("sleep 1001");
    // SAFETY: signalling a child process.
    unsafe {
        libc::kill(run.id() as i32, libc::SIGINT);
    }
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(gone(sleeper));
    assert_eq!(overlay_mounts_under(root.path()), 0);
    // A run killed outright takes its container with it; the next run cleans up after it.
    let mut run = Command::new(EXE)
        .arg("--root")
        .arg(root.path())
        .args(["run", &image, "--", "sleep", "1002"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let sleeper = wait_for_process("sleep 1002");
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(gone(sleeper), "the workload died with the run");
    assert_eq!(
        overlay_mounts_under(root.path()),
        0,
        "its mount namespace (and overlay) went too"
    );
    assert_eq!(
        std::fs::read_dir(root.path().join("run")).unwrap().count(),
        1,
        "a stale writable layer"
    );
    let output = lazylayer(root.path(), &["run", &image, "--", "true"]);
    assert!(output.status.success());
    assert_eq!(
        std::fs::read_dir(root.path().join("run")).unwrap().count(),
        0,
        "cleaned by the next run"
    );
}
