//! How the daemon runs.

use std::path::PathBuf;
use std::time::Duration;

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
    /// containerd's registry hosts directory (mirrors; see `lazylayer_source::registry::hosts`).
    pub hosts_dir: Option<PathBuf>,
}

/// The exit status of a worker that could not start (bad store state, unreadable index): the
/// holder gives up if the first worker says so, instead of restarting it forever.
pub const WORKER_CANNOT_START: i32 = 3;
