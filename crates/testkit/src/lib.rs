//! # lazylayer-testkit: a test environment made of real parts
//!
//! - [`registry`]: Debian's `docker-registry` (CNCF distribution) on 127.0.0.1, anonymous, with
//!   htpasswd basic auth, or in `token` mode trusting [`token_issuer`];
//! - [`token_issuer`]: a small bearer-token service, so the Docker Hub/GHCR token flow runs end
//!   to end against the real registry;
//! - [`proxy`]: a TCP proxy that shapes bandwidth and latency and injects faults (resets,
//!   stalls, truncated or corrupted bodies, HTTP 500/503/429), and [`layout_registry`], a
//!   registry embedded in the process (both from `lazylayer-loopback`, which the demo uses);
//! - [`fixtures`]: images built by tools lazylayer did not write (`scripts/build-fixtures`),
//!   cached, and pushed into a registry with skopeo;
//! - [`hostile`]: a corpus of malicious layers, as an OCI layout;
//! - [`podman`]: a private podman (its own storage.conf and containers.conf);
//! - [`blackhole`]: a loopback address where connects hang, for connect timeouts;
//! - [`daemon`]: stopping the lazylayer daemons (holder and worker) a test started.
//!
//! Nothing here reaches the internet; the fixture script needs Debian's package mirror once.

pub mod blackhole;
pub mod containerd;
pub mod daemon;
pub mod fixtures;
pub mod hostile;
pub mod podman;
pub mod registry;
pub mod token_issuer;
pub mod tree_diff;

pub use lazylayer_loopback::{background, http_wire, layout_registry, proxy};

use std::path::PathBuf;
use std::process::Command;

/// The repository root (for scripts).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Whether the tests run in CI, where a test that cannot run must fail instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns true if the test can run as root. Outside CI a non-root run skips (with a note);
/// under `CI=true` it fails, because CI must never skip a privileged test silently.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !in_ci(),
        "{test} needs root and CI=true forbids skipping it; run the test command as root"
    );
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// Unmounts (lazily, deepest first) everything mounted under `dir`: what containerd, a
/// snapshotter or a test left there.
pub fn unmount_everything_under(dir: &std::path::Path) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
            dir.display()
        ))
        .status();
}

/// Whether a filesystem is mounted at `path` (in this mount namespace).
pub fn is_mounted(path: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.display().to_string();
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(path.as_str()))
}

/// Panics with a clear message unless `tool` is on PATH.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: run scripts/install-deps (as root)"
    );
}
