//! Readers waiting for data, whichever frontend they came through: every unfilled regular file
//! of a lazy layer is known here by its placeholder's inode. A reader that opens one (a
//! fanotify permission event, or a FUSE open the holder relays) waits while the layer store
//! fills the whole file, then goes on; a file that cannot be filled within the deadline is
//! denied with EIO, so a reader never gets the placeholder's zeros. What readers waited for is
//! logged in order (`run --record` saves it as a prefetch profile), and when they last waited
//! keeps the background off the network while a workload is busy reading.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use lazylayer_index::InflatedFor;
use lazylayer_source::Digest;
use lazylayer_store::{FrontendMode, Layer};
use tokio::runtime::Handle;

use crate::relay::Verdict;
use crate::worker::frontends::Frontends;

/// Which file an inode is.
#[derive(Clone)]
struct Target {
    layer: Arc<Layer>,
    entry: usize,
    /// How the layer is served (read once, at registration).
    mode: FrontendMode,
    /// The layer's index proved wrong: the file is denied, filled or not.
    condemned: bool,
}

/// The unfilled files of every lazy layer the worker serves, and the readers waiting for them.
pub struct Demand {
    targets: RwLock<HashMap<(u64, u64), Target>>,
    frontends: Frontends,
    deadline: Duration,
    own_pid: i32,
    /// Files a reader waited for, in the order they were first asked for.
    demanded: Mutex<Vec<(Digest, usize)>>,
    /// When a reader last waited, and how many wait right now.
    last_demand: Mutex<Instant>,
    waiting: AtomicUsize,
    /// Set once the worker has taken up every lazy layer of the store: before that, a file not
    /// known here may be an unfilled one of a layer not registered yet, so readers wait.
    ready: AtomicBool,
    became_ready: tokio::sync::Notify,
}

impl Demand {
    /// Nothing known yet; fills must finish within `deadline` (else EIO); `frontends` hear of
    /// every file filled.
    pub fn new(frontends: Frontends, deadline: Duration) -> Arc<Demand> {
        Arc::new(Demand {
            targets: RwLock::new(HashMap::new()),
            frontends,
            deadline,
            own_pid: std::process::id() as i32,
            demanded: Mutex::new(Vec::new()),
            last_demand: Mutex::new(Instant::now()),
            waiting: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            became_ready: tokio::sync::Notify::new(),
        })
    }

    /// Every lazy layer of the store is registered: readers of files not known here may go on
    /// (those that came before wait until now).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.became_ready.notify_waiters();
    }

    async fn until_ready(&self) {
        loop {
            let notified = self.became_ready.notified();
            if self.ready.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// The frontends.
    pub fn frontends(&self) -> &Frontends {
        &self.frontends
    }

    /// Learns the files of `layer` (served in `mode`) that still lack data, by their
    /// placeholders' inodes, and returns them: the frontend then makes their readers wait.
    pub fn register(&self, layer: &Arc<Layer>, mode: FrontendMode) -> std::io::Result<Vec<usize>> {
        let pending = layer.pending_files();
        self.target(layer, mode, &pending, false)?;
        Ok(pending)
    }

    /// The index of `layer` proved wrong: from now on every reader of any of its regular files,
    /// filled or not, gets EIO. Returns those files: the frontend makes their readers ask
    /// again (marks).
    pub fn condemn(&self, layer: &Arc<Layer>, mode: FrontendMode) -> std::io::Result<Vec<usize>> {
        let files: Vec<usize> = (0..layer.index.entries.len())
            .filter(|&i| layer.index.entries[i].kind == lazylayer_index::EntryKind::File)
            .collect();
        self.target(layer, mode, &files, true)?;
        Ok(files)
    }

    /// Knows `files` of `layer` by their placeholders' inodes.
    fn target(
        &self,
        layer: &Arc<Layer>,
        mode: FrontendMode,
        files: &[usize],
        condemned: bool,
    ) -> std::io::Result<()> {
        let mut targets = self.targets.write().expect("targets");
        let mut last = lazylayer_store::LastParent::default();
        for &i in files {
            let inode = layer
                .tree
                .inode_after(&layer.index.entries[i].path, &mut last)
                .map_err(std::io::Error::other)?;
            targets.insert(
                inode,
                Target {
                    layer: layer.clone(),
                    entry: i,
                    mode,
                    condemned,
                },
            );
        }
        Ok(())
    }

    /// File `i` of `layer` holds its data now (filled for a reader or in the background): its
    /// readers need not wait any more.
    pub fn populated(&self, layer: &Layer, i: usize) {
        let entry = &layer.index.entries[i];
        let Ok(inode) = layer.tree.inode(&entry.path) else {
            return;
        };
        let removed = {
            let mut targets = self.targets.write().expect("targets");
            match targets.get(&inode) {
                Some(target) if target.condemned => None,
                Some(_) => targets.remove(&inode),
                None => None,
            }
        };
        if let Some(target) = removed {
            self.frontends.of(target.mode).populated(layer, i);
        }
    }

    /// Forgets a layer entirely (detach): whatever of it still waited stops waiting.
    pub fn detach(&self, layer: &Layer) {
        let mut mode = None;
        let unfilled: Vec<usize> = {
            let mut targets = self.targets.write().expect("targets");
            let mut unfilled = Vec::new();
            targets.retain(|_, t| {
                let ours = t.layer.digest == layer.digest;
                if ours {
                    unfilled.push(t.entry);
                    mode = Some(t.mode);
                }
                !ours
            });
            unfilled
        };
        if let Some(mode) = mode {
            self.frontends.of(mode).detach(layer, &unfilled);
        }
    }

    /// How many files readers would still wait for.
    pub fn unfilled(&self) -> usize {
        self.targets.read().expect("targets").len()
    }

    /// How long no reader has waited (zero while one waits).
    pub fn quiet_for(&self) -> Duration {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last_demand.lock().expect("last demand").elapsed()
    }

    /// The files readers waited for since the `since`-th, and how many there have been.
    pub fn demanded_since(&self, since: usize) -> (Vec<(Digest, usize)>, usize) {
        let demanded = self.demanded.lock().expect("demand log");
        (
            demanded.iter().skip(since).cloned().collect(),
            demanded.len(),
        )
    }

    /// A reader (process `pid`) opened the file with inode `inode` (`None`: it could not be
    /// told): `answer` gets its verdict, at once when nothing is to be filled, else once the
    /// file is filled (on `runtime`) or cannot be within the deadline.
    pub fn wait_for(
        self: &Arc<Self>,
        inode: Option<(u64, u64)>,
        pid: i32,
        runtime: &Handle,
        answer: impl FnOnce(Verdict) + Send + 'static,
    ) {
        // Our own writes into placeholders raise events too: answered at once, here, so the
        // writer (another thread) is never waiting on itself.
        if pid == self.own_pid {
            return answer(Verdict::Allow);
        }
        if !self.ready.load(Ordering::SeqCst) {
            let (demand, later) = (self.clone(), runtime.clone());
            runtime.spawn(async move {
                demand.until_ready().await;
                demand.wait_for(inode, pid, &later, answer);
            });
            return;
        }
        let Some(inode) = inode else {
            return answer(Verdict::Deny(libc::EIO));
        };
        let target = self.targets.read().expect("targets").get(&inode).cloned();
        let Some(target) = target else {
            // Not a file that lacks data.
            return answer(Verdict::Allow);
        };
        if target.condemned {
            return answer(Verdict::Deny(libc::EIO));
        }
        if target.layer.is_populated(target.entry) {
            return answer(Verdict::Allow);
        }
        self.note(&target.layer.digest, target.entry);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let demand = self.clone();
        let answer = AnswerOnce(Some(answer));
        runtime.spawn(async move {
            let verdict = demand.fill(&target).await;
            answer.give(verdict);
            *demand.last_demand.lock().expect("last demand") = Instant::now();
            demand.waiting.fetch_sub(1, Ordering::SeqCst);
        });
    }

    async fn fill(&self, target: &Target) -> Verdict {
        let layer = &target.layer;
        let path = || {
            layer
                .tree
                .path_of(&layer.index.entries[target.entry].path)
                .display()
                .to_string()
        };
        match tokio::time::timeout(
            self.deadline,
            layer.populate(target.entry, InflatedFor::Reader),
        )
        .await
        {
            Ok(Ok(())) => {
                self.populated(layer, target.entry);
                Verdict::Allow
            }
            Ok(Err(e)) => {
                tracing::warn!("{}: cannot fill: {e}", path());
                Verdict::Deny(libc::EIO)
            }
            Err(_) => {
                tracing::warn!(
                    "{}: not filled within {:?}; the reader gets EIO",
                    path(),
                    self.deadline
                );
                Verdict::Deny(libc::EIO)
            }
        }
    }

    /// Logs that a reader waits for file `entry` of layer `digest`, and that readers are busy.
    fn note(&self, digest: &Digest, entry: usize) {
        {
            let mut demanded = self.demanded.lock().expect("demand log");
            let key = (digest.clone(), entry);
            if !demanded.contains(&key) {
                demanded.push(key);
            }
        }
        *self.last_demand.lock().expect("last demand") = Instant::now();
    }
}

/// A reader's answer, given once: dropped unanswered (the task filling the file panicked), it
/// answers EIO, so that no reader waits for an answer nobody will give.
struct AnswerOnce<F: FnOnce(Verdict)>(Option<F>);

impl<F: FnOnce(Verdict)> AnswerOnce<F> {
    fn give(mut self, verdict: Verdict) {
        if let Some(answer) = self.0.take() {
            answer(verdict);
        }
    }
}

impl<F: FnOnce(Verdict)> Drop for AnswerOnce<F> {
    fn drop(&mut self) {
        if let Some(answer) = self.0.take() {
            answer(Verdict::Deny(libc::EIO));
        }
    }
}
