//! The control protocol on `ROOT/lazylayer.sock`: one JSON request per line, one JSON answer.

use lazylayer_source::Digest;
use lazylayer_store::Phase;
use serde::{Deserialize, Serialize};

/// What a command asks the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Take up layers that became lazy since the last look (after a pull): mark them and start
    /// populating them.
    Refresh,
    /// Report every layer.
    Status,
    /// Populate these layers at full speed; with `wait`, answer once they are detached.
    Detach { layers: Vec<Digest>, wait: bool },
    /// The files readers waited for since the `since`-th (for recording profiles).
    Demanded { since: usize },
    /// Stop (marks go with the group: only safe when no lazy layer is in use).
    Shutdown,
    /// A duplicate of the fanotify group fd, sent with the answer (SCM_RIGHTS), for a keeper
    /// (see `keeper`).
    GroupFd,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status` and `refresh`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    /// For `demanded`: the files, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demanded: Option<Vec<lazylayer_store::ProfileEntry>>,
}

/// The daemon and its layers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's process id (the holder: stopping it stops the daemon).
    pub pid: u32,
    /// The worker's process id (it fetches and fills; when it dies, the holder starts another).
    pub worker_pid: u32,
    /// Files marked for pre-content events right now.
    pub marked_files: usize,
    /// How many files readers have waited for since the daemon started.
    pub demanded_files: usize,
    /// The layers the daemon serves or served.
    pub layers: Vec<LayerStatus>,
    /// Layers whose FUSE mount still serves overlays (made while they were lazy): those
    /// mounts keep a FUSE hop, and need the daemon, until the overlays go.
    #[serde(default)]
    pub fuse_mounts: Vec<Digest>,
    /// READ requests that reached the daemon through FUSE (opens of filled files are passed
    /// through to the layer directory, so these stay at zero on kernels with passthrough).
    #[serde(default)]
    pub fuse_reads: u64,
}

/// One layer's population.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerStatus {
    /// The layer digest.
    pub digest: Digest,
    /// The persisted phase: creating, lazy or detached.
    pub phase: Phase,
    /// What is happening to it now: `populating` is a lazy layer the daemon is filling.
    #[serde(default)]
    pub state: LayerState,
    /// The frontend serving it.
    pub mode: String,
    /// Regular files with data.
    pub files: usize,
    /// Of those, how many hold their data.
    pub files_populated: usize,
    /// Bytes of file data.
    pub bytes: u64,
    /// Of those, how many are in place.
    pub bytes_populated: u64,
    /// Compressed bytes fetched from the registry.
    pub bytes_fetched: u64,
    /// The last population error, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The layer cannot be completed (its `error` says why): it will not detach, and readers
    /// of its files not yet local get EIO.
    #[serde(default)]
    pub failed: bool,
}

impl LayerStatus {
    /// A layer no worker is serving, as far as the store has persisted its population.
    pub fn persisted(
        digest: Digest,
        phase: Phase,
        mode: lazylayer_store::FrontendMode,
        progress: lazylayer_store::Progress,
        failure: Option<String>,
    ) -> Self {
        LayerStatus {
            digest,
            phase,
            mode: mode.name().into(),
            files: progress.files,
            files_populated: progress.files_populated,
            bytes: progress.bytes,
            bytes_populated: progress.bytes_populated,
            bytes_fetched: progress.bytes_fetched,
            failed: failure.is_some(),
            error: failure,
            state: LayerState::at_rest(phase),
        }
    }
}

/// A layer's state as `status` shows it: the persisted phase, with `populating` for a lazy
/// layer that a running daemon is filling (on demand and in the background).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// Its placeholder tree is being created.
    Creating,
    /// Lazy, and no daemon is filling it (data not yet local stays unreadable until one does).
    #[default]
    Lazy,
    /// Lazy, and the daemon is filling it.
    Populating,
    /// Complete, verified and detached.
    Detached,
    /// Its index proved wrong: never mounted again (`error` says why).
    Failed,
}

impl LayerState {
    /// The state of a layer no daemon is serving.
    pub fn at_rest(phase: Phase) -> Self {
        match phase {
            Phase::Creating => LayerState::Creating,
            Phase::Lazy => LayerState::Lazy,
            Phase::Detached => LayerState::Detached,
            Phase::Failed => LayerState::Failed,
        }
    }

    /// The state of a layer the daemon is serving.
    pub fn served(phase: Phase) -> Self {
        match phase {
            Phase::Lazy => LayerState::Populating,
            other => LayerState::at_rest(other),
        }
    }

    /// The word `status` prints.
    pub fn name(self) -> &'static str {
        match self {
            LayerState::Creating => "creating",
            LayerState::Lazy => "lazy",
            LayerState::Populating => "populating",
            LayerState::Detached => "detached",
            LayerState::Failed => "failed",
        }
    }
}
