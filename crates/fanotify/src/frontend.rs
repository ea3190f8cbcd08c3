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
use crate::relay::{RelayedAnswer, RelayedEvent};

/// Which file an inode is.
#[derive(Clone)]
struct Target {
    layer: Arc<Layer>,
    entry: usize,
    /// Whether the file carries a mark (FUSE layers' files are only registered).
    marked: bool,
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
    /// A frontend marking files in `group` (its own, or the one a holder shares with it),
    /// whose fills must finish within `deadline` (else EIO).
    pub fn new(group: Group, deadline: Duration) -> Arc<Frontend> {
        Arc::new(Frontend {
            group: Arc::new(group),
            targets: RwLock::new(HashMap::new()),
            deadline,
            own_pid: std::process::id() as i32,
            demanded: std::sync::Mutex::new(Vec::new()),
            last_demand: std::sync::Mutex::new(std::time::Instant::now()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        })
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
                    marked: true,
                },
            );
            self.group.add_mark(dir.as_fd(), name)?;
            marked += 1;
        }
        Ok(marked)
    }

    /// Registers every file of `layer` that still lacks data, without marks: the layer is
    /// served through FUSE, whose opens the holder relays here as fill requests (a request for
    /// a file not registered is allowed, as its data is there).
    pub fn register(&self, layer: &Arc<Layer>) -> std::io::Result<usize> {
        let mut registered = 0;
        for i in layer.pending_files() {
            let inode = layer
                .tree
                .inode(&layer.index.entries[i].path)
                .map_err(std::io::Error::other)?;
            self.targets.write().expect("targets").insert(
                inode,
                Target {
                    layer: layer.clone(),
                    entry: i,
                    marked: false,
                },
            );
            registered += 1;
        }
        Ok(registered)
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
        if let Ok(inode) = layer.tree.inode(&entry.path)
            && let Some(target) = self.targets.write().expect("targets").remove(&inode)
            && target.marked
        {
            self.unmark(&layer.tree, &entry.path);
        }
    }

    /// Forgets a layer entirely (detach): removes every mark it still has.
    pub fn detach(&self, layer: &Layer) {
        let inodes: Vec<((u64, u64), usize, bool)> = self
            .targets
            .read()
            .expect("targets")
            .iter()
            .filter(|(_, t)| t.layer.digest == layer.digest)
            .map(|(inode, t)| (*inode, t.entry, t.marked))
            .collect();
        for (inode, entry, marked) in inodes {
            if marked {
                self.unmark(&layer.tree, &layer.index.entries[entry].path);
            }
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

    /// Reads the group's events forever on the calling thread, answering them; fills run on
    /// `runtime`.
    pub fn run(self: Arc<Self>, runtime: Handle) -> std::io::Result<()> {
        loop {
            for event in self.group.read_events()? {
                let inode = rustix::fs::fstat(&event.fd)
                    .ok()
                    .map(|stat| (stat.st_dev, stat.st_ino));
                self.dispatch(inode, event.pid, Reply::Direct(event), &runtime);
            }
        }
    }

    /// Answers the events a holder relays on `stream` until the holder is gone; then takes
    /// over: answers what the holder had relayed straight to the group, and reads the group
    /// itself from then on (see [`crate::holder`]).
    pub fn serve_relay(
        self: Arc<Self>,
        stream: std::os::unix::net::UnixStream,
        runtime: Handle,
    ) -> std::io::Result<()> {
        let link = Arc::new(RelayLink::new(&stream)?);
        let mut reader = stream;
        loop {
            match RelayedEvent::receive(&mut reader) {
                Ok(Some(record)) => {
                    link.received(&record);
                    let reply = Reply::Relayed {
                        record,
                        link: link.clone(),
                    };
                    self.dispatch(Some(record.inode), record.pid, reply, &runtime);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("reading relayed events: {e}");
                    break;
                }
            }
        }
        tracing::error!(
            "the holder process is gone: this worker now holds the fanotify group alone and reads it \
             itself; lazy layers keep working, but a crash of this process would now fail open \
             (restart lazylayer serve once no container uses a lazy layer)"
        );
        link.take_over(&self.group);
        self.run(runtime)
    }

    fn dispatch(
        self: &Arc<Self>,
        inode: Option<(u64, u64)>,
        pid: i32,
        reply: Reply,
        runtime: &Handle,
    ) {
        // Our own writes into placeholders raise events too: answer them at once, here, so the
        // writer (another thread) is never waiting on itself.
        if pid == self.own_pid {
            return self.answer(reply, Answer::Allow);
        }
        let Some(inode) = inode else {
            return self.answer(reply, Answer::Deny(libc::EIO));
        };
        let target = self.targets.read().expect("targets").get(&inode).cloned();
        let Some(target) = target else {
            return self.answer(reply, Answer::Allow);
        };
        if target.layer.is_populated(target.entry) {
            return self.answer(reply, Answer::Allow);
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
            frontend.answer(reply, answer);
            *frontend.last_demand.lock().expect("last demand") = std::time::Instant::now();
            frontend
                .waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// A reader waits for (or just got) file `entry` of layer `digest` through another frontend
    /// (FUSE): recorded for profiles, and it keeps the background off the network for a moment.
    pub fn note_demand(&self, digest: &lazylayer_source::Digest, entry: usize) {
        {
            let mut demanded = self.demanded.lock().expect("demand log");
            let key = (digest.clone(), entry);
            if !demanded.contains(&key) {
                demanded.push(key);
            }
        }
        *self.last_demand.lock().expect("last demand") = std::time::Instant::now();
    }

    fn answer(&self, reply: Reply, answer: Answer) {
        let result = match reply {
            Reply::Direct(event) => self.group.answer(&event, answer),
            Reply::Relayed { record, link } => link.answer(&self.group, &record, answer),
        };
        if let Err(e) = result {
            tracing::error!("answering a fanotify event: {e}");
        }
    }
}

/// Where an event came from, and so how it is answered.
enum Reply {
    /// Read from the group by this process.
    Direct(Event),
    /// Relayed by the holder.
    Relayed {
        record: RelayedEvent,
        link: Arc<RelayLink>,
    },
}

/// The worker's end of the relay from the holder.
struct RelayLink {
    writer: std::sync::Mutex<std::os::unix::net::UnixStream>,
    state: std::sync::Mutex<RelayState>,
}

#[derive(Default)]
struct RelayState {
    /// Set once the holder's end has closed (the holder died).
    holder_gone: bool,
    /// Relayed events not answered yet.
    outstanding: HashMap<u64, Outstanding>,
}

/// A relayed event not answered yet.
struct Outstanding {
    /// The holder's fd number of the event (answers are matched by it).
    fd: i32,
    /// After a takeover: a descriptor of ours occupying that number, so that no event read
    /// here gets the same number before this one is answered.
    reservation: Option<std::os::fd::OwnedFd>,
    /// An answer the dying holder could not take: given at the takeover.
    deferred: Option<Answer>,
}

impl RelayLink {
    fn new(stream: &std::os::unix::net::UnixStream) -> std::io::Result<RelayLink> {
        let writer = stream.try_clone()?;
        writer.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(RelayLink {
            writer: std::sync::Mutex::new(writer),
            state: std::sync::Mutex::new(RelayState::default()),
        })
    }

    fn received(&self, record: &RelayedEvent) {
        self.state.lock().expect("relay state").outstanding.insert(
            record.id,
            Outstanding {
                fd: record.fd,
                reservation: None,
                deferred: None,
            },
        );
    }

    /// The holder is gone: answer what it could not take, and reserve the fd numbers of the
    /// events still being filled, before this process reads the group itself.
    fn take_over(&self, group: &Group) {
        let mut state = self.state.lock().expect("relay state");
        state.holder_gone = true;
        state.outstanding.retain(|_, event| match event.deferred {
            Some(answer) => {
                if let Err(e) = group.answer_fd(event.fd, answer) {
                    tracing::error!("answering a fanotify event: {e}");
                }
                false
            }
            None => {
                event.reservation = reserve_fd_number(event.fd);
                true
            }
        });
    }

    /// Answers through the holder while it lives, straight to the group once it is gone.
    fn answer(&self, group: &Group, record: &RelayedEvent, answer: Answer) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("relay state");
        if state.holder_gone {
            // Dropping the entry releases the number's reservation, after the answer.
            let result = group.answer_fd(record.fd, answer);
            state.outstanding.remove(&record.id);
            return result;
        }
        let reply = RelayedAnswer {
            id: record.id,
            answer,
        };
        match reply.send(&mut *self.writer.lock().expect("relay writer")) {
            Ok(()) => {
                state.outstanding.remove(&record.id);
            }
            // The holder is going away; the event stays pending in the group and is answered
            // at the takeover.
            Err(_) => {
                if let Some(event) = state.outstanding.get_mut(&record.id) {
                    event.deferred = Some(answer);
                }
            }
        }
        Ok(())
    }
}

/// Occupies fd number `fd` in this process with a descriptor of /dev/null if it is free (if it
/// is taken, whatever holds it keeps it from new events just as well).
fn reserve_fd_number(fd: i32) -> Option<std::os::fd::OwnedFd> {
    let null = std::fs::File::open("/dev/null").ok()?;
    let copy = rustix::io::fcntl_dupfd_cloexec(&null, fd).ok()?;
    (std::os::fd::AsRawFd::as_raw_fd(&copy) == fd).then_some(copy)
}
