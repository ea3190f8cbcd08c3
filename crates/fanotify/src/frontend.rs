//! The fanotify frontend: every regular file of a lazy layer that still lacks data carries an
//! inode mark. Opening it (including through overlayfs, which opens the lower inode, and for
//! exec) raises an open-permission event; the frontend has the layer store fill the whole file
//! and then allows the open, so reads and even mmaps through overlay see real data. Direct
//! accesses raise pre-access events, answered the same way. A file that cannot be filled within
//! the deadline is denied with EIO: a reader never gets the placeholder's zeros.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lazylayer_store::{Layer, LayerTree};
use tokio::runtime::Handle;

use crate::group::{Answer, Event, Group};

/// Which file an inode is.
#[derive(Clone)]
struct Target {
    layer: Arc<Layer>,
    entry: usize,
}

/// The fanotify frontend of all lazy layers of the store.
pub struct Frontend {
    group: Arc<Group>,
    targets: RwLock<HashMap<(u64, u64), Target>>,
    deadline: Duration,
    own_pid: i32,
    /// Files a reader waited for, in the order they were first asked for: what a workload
    /// needed that was not local (`run --record` saves it as a prefetch profile).
    demanded: std::sync::Mutex<Vec<(lazylayer_source::Digest, usize)>>,
    /// When a reader last waited, and how many wait right now: the background keeps off the
    /// network while a workload is busy reading.
    last_demand: std::sync::Mutex<std::time::Instant>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Frontend {
    /// A frontend whose fills must finish within `deadline` (else EIO).
    pub fn new(deadline: Duration) -> std::io::Result<Arc<Frontend>> {
        Ok(Arc::new(Frontend {
            group: Arc::new(Group::new()?),
            targets: RwLock::new(HashMap::new()),
            deadline,
            own_pid: std::process::id() as i32,
            demanded: std::sync::Mutex::new(Vec::new()),
            last_demand: std::sync::Mutex::new(std::time::Instant::now()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// The group (for inspection).
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Marks every file of `layer` that still lacks data. Returns how many were marked.
    pub fn attach(&self, layer: &Arc<Layer>) -> std::io::Result<usize> {
        let mut marked = 0;
        for i in layer.pending_files() {
            let entry = &layer.index.entries[i];
            let (dir, name) = layer
                .tree
                .parent(&entry.path)
                .map_err(std::io::Error::other)?;
            let name = std::os::unix::ffi::OsStrExt::from_bytes(name);
            let (dev, ino) = layer
                .tree
                .inode(&entry.path)
                .map_err(std::io::Error::other)?;
            self.targets.write().expect("targets").insert(
                (dev, ino),
                Target {
                    layer: layer.clone(),
                    entry: i,
                },
            );
            self.group.add_mark(dir.as_fd(), name)?;
            marked += 1;
        }
        Ok(marked)
    }

    /// Removes the mark of one populated file.
    fn unmark(&self, tree: &LayerTree, path: &[u8]) {
        let Ok((dir, name)) = tree.parent(path) else {
            return;
        };
        let name: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(name);
        if let Err(e) = self.group.remove_mark(dir.as_fd(), name) {
            tracing::warn!("removing the mark of {}: {e}", tree.path_of(path).display());
        }
    }

    /// After a file is populated (by an event or in the background): its mark goes.
    pub fn populated(&self, layer: &Layer, i: usize) {
        let entry = &layer.index.entries[i];
        self.unmark(&layer.tree, &entry.path);
        if let Ok(inode) = layer.tree.inode(&entry.path) {
            self.targets.write().expect("targets").remove(&inode);
        }
    }

    /// Forgets a layer entirely (detach): removes every mark it still has.
    pub fn detach(&self, layer: &Layer) {
        let inodes: Vec<((u64, u64), usize)> = self
            .targets
            .read()
            .expect("targets")
            .iter()
            .filter(|(_, t)| t.layer.digest == layer.digest)
            .map(|(inode, t)| (*inode, t.entry))
            .collect();
        for (inode, entry) in inodes {
            self.unmark(&layer.tree, &layer.index.entries[entry].path);
            self.targets.write().expect("targets").remove(&inode);
        }
    }

    /// How long no reader has waited (zero while one waits).
    pub fn quiet_for(&self) -> Duration {
        if self.waiting.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last_demand.lock().expect("last demand").elapsed()
    }

    /// The files readers waited for since the `since`-th, and how many there have been.
    pub fn demanded_since(&self, since: usize) -> (Vec<(lazylayer_source::Digest, usize)>, usize) {
        let demanded = self.demanded.lock().expect("demand log");
        (
            demanded.iter().skip(since).cloned().collect(),
            demanded.len(),
        )
    }

    /// How many files are marked.
    pub fn marked(&self) -> usize {
        self.targets.read().expect("targets").len()
    }

    /// Reads events forever on the calling thread, answering them; fills run on `runtime`.
    pub fn run(self: Arc<Self>, runtime: Handle) -> std::io::Result<()> {
        loop {
            for event in self.group.read_events()? {
                self.dispatch(event, &runtime);
            }
        }
    }

    fn dispatch(self: &Arc<Self>, event: Event, runtime: &Handle) {
        // Our own writes into placeholders raise events too: answer them at once, here, so the
        // writer (another thread) is never waiting on itself.
        if event.pid == self.own_pid {
            return self.answer(&event, Answer::Allow);
        }
        let inode = match rustix::fs::fstat(&event.fd) {
            Ok(stat) => (stat.st_dev, stat.st_ino),
            Err(_) => return self.answer(&event, Answer::Deny(libc::EIO)),
        };
        let target = self.targets.read().expect("targets").get(&inode).cloned();
        let Some(target) = target else {
            return self.answer(&event, Answer::Allow);
        };
        if target.layer.is_populated(target.entry) {
            return self.answer(&event, Answer::Allow);
        }
        {
            let mut demanded = self.demanded.lock().expect("demand log");
            let key = (target.layer.digest.clone(), target.entry);
            if !demanded.contains(&key) {
                demanded.push(key);
            }
        }
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self.last_demand.lock().expect("last demand") = std::time::Instant::now();
        let frontend = self.clone();
        runtime.spawn(async move {
            let result =
                tokio::time::timeout(frontend.deadline, target.layer.populate(target.entry)).await;
            let answer = match result {
                Ok(Ok(())) => {
                    frontend.populated(&target.layer, target.entry);
                    Answer::Allow
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        "{}: cannot fill: {e}",
                        target
                            .layer
                            .tree
                            .path_of(&target.layer.index.entries[target.entry].path)
                            .display()
                    );
                    Answer::Deny(libc::EIO)
                }
                Err(_) => {
                    tracing::warn!(
                        "{}: not filled within {:?}; the reader gets EIO",
                        target
                            .layer
                            .tree
                            .path_of(&target.layer.index.entries[target.entry].path)
                            .display(),
                        frontend.deadline
                    );
                    Answer::Deny(libc::EIO)
                }
            };
            frontend.answer(&event, answer);
            *frontend.last_demand.lock().expect("last demand") = std::time::Instant::now();
            frontend
                .waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }

    fn answer(&self, event: &Event, answer: Answer) {
        if let Err(e) = self.group.answer(event, answer) {
            tracing::error!("answering a fanotify event: {e}");
        }
    }
}
