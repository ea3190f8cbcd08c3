//! The holder's relay: what waits for the worker. The fanotify mechanism fails open: when the
//! last fd of a group closes, its pending events are allowed and its marks vanish, so readers
//! of unfilled placeholders would get zeros. The holder keeps the group open, reads its events
//! and relays them to the worker (which fetches and fills), as it relays the opens of its own
//! FUSE mounts, and gives the worker's answers back. When the worker dies, the holder still
//! holds the group: readers keep waiting, and what the dead worker never answered is handed to
//! the next worker. Whatever nobody answers within the holder's budget is denied with EIO.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazylayer_fanotify::group::{Answer, Event, Group};

use crate::relay::{self, RelayedEvent, ToHolder, ToWorker, Verdict};

/// An event or fill request the worker has not answered yet.
struct Pending {
    waiter: Waiter,
    message: ToWorker,
    since: Instant,
}

/// Who waits for an answer.
enum Waiter {
    /// A fanotify permission event, answered to the group.
    Event(Event),
    /// A FUSE open served by this process, waiting for its file to be filled.
    Fill(std::sync::mpsc::Sender<Verdict>),
}

impl Waiter {
    fn pid(&self) -> i32 {
        match self {
            Waiter::Event(event) => event.pid,
            Waiter::Fill(_) => 0,
        }
    }
}

/// The worker the holder relays to.
struct Link {
    pid: i32,
    stream: UnixStream,
}

/// The holder's side of the link to its worker: the shared group, what waits for an answer,
/// and the current worker.
pub struct Relay {
    group: Group,
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_id: AtomicU64,
    worker: Mutex<Option<Link>>,
    give_up_after: Duration,
}

impl Relay {
    /// A relay for `group` that denies an event with EIO when no worker answered it within
    /// `give_up_after`.
    pub fn new(group: Group, give_up_after: Duration) -> Arc<Relay> {
        Arc::new(Relay {
            group,
            pending: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            worker: Mutex::new(None),
            give_up_after,
        })
    }

    /// The shared group (its fd is handed to each worker, which places and removes marks).
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Reads the group's events forever on the calling thread, relaying them.
    pub fn run(&self) -> std::io::Result<()> {
        loop {
            for event in self.group.read_few_events()? {
                self.take(event);
            }
        }
    }

    fn take(&self, event: Event) {
        let mut worker = self.worker.lock().expect("worker link");
        // The worker's own writes into placeholders: allowed at once, or it would wait on itself.
        if worker.as_ref().is_some_and(|link| link.pid == event.pid) {
            return self.answer_event(&event, Answer::Allow);
        }
        let inode = match rustix::fs::fstat(&event.fd) {
            Ok(stat) => (stat.st_dev, stat.st_ino),
            Err(e) => {
                tracing::warn!("a fanotify event's file cannot be examined: {e}; denied");
                return self.answer_event(&event, Answer::Deny(libc::EIO));
            }
        };
        let record = RelayedEvent {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            mask: event.mask,
            pid: event.pid,
            fd: std::os::fd::AsRawFd::as_raw_fd(&event.fd),
            inode,
            range: event.range,
        };
        self.relay(
            &mut worker,
            record.id,
            ToWorker::Event(record),
            Waiter::Event(event),
        );
    }

    /// Keeps `message` pending for `waiter` and sends it to the worker, if one is attached
    /// (else the next one gets it when it attaches).
    fn relay(&self, worker: &mut Option<Link>, id: u64, message: ToWorker, waiter: Waiter) {
        self.pending.lock().expect("pending events").insert(
            id,
            Pending {
                waiter,
                message: message.clone(),
                since: Instant::now(),
            },
        );
        if let Some(link) = worker.as_mut()
            && let Err(e) = relay::send(&mut link.stream, &message)
        {
            tracing::warn!("relaying to worker {}: {e}", link.pid);
            Self::replace(worker);
        }
    }

    /// Has the worker fill the regular file `inode` (device, inode of its placeholder in the
    /// layer directory) and waits for the answer: the FUSE frontend's open, served by this
    /// process. Survives worker restarts like a fanotify event; denied with EIO when no worker
    /// answers within the budget.
    pub fn request_fill(&self, inode: (u64, u64)) -> Verdict {
        let (sender, receiver) = std::sync::mpsc::channel();
        let mut worker = self.worker.lock().expect("worker link");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = ToWorker::Fill { id, inode };
        self.relay(&mut worker, id, message, Waiter::Fill(sender));
        drop(worker);
        // `expire` answers it at the latest after the budget.
        receiver.recv().unwrap_or(Verdict::Deny(libc::EIO))
    }

    /// A worker that cannot take events is killed; the supervisor starts the next one, which
    /// is handed every pending event.
    fn replace(worker: &mut Option<Link>) {
        if let Some(pid) = worker
            .take()
            .and_then(|link| rustix::process::Pid::from_raw(link.pid))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// Relays to the worker `pid` from now on, starting with every event still pending.
    pub fn attach_worker(&self, pid: i32, stream: UnixStream) {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let mut worker = self.worker.lock().expect("worker link");
        *worker = Some(Link { pid, stream });
        let messages: Vec<ToWorker> = self
            .pending
            .lock()
            .expect("pending events")
            .values()
            .map(|p| p.message.clone())
            .collect();
        if !messages.is_empty() {
            tracing::info!("handing {} pending events to worker {pid}", messages.len());
        }
        for message in messages {
            let Some(link) = worker.as_mut() else { break };
            if let Err(e) = relay::send(&mut link.stream, &message) {
                tracing::warn!("relaying to worker {pid}: {e}");
                Self::replace(&mut worker);
            }
        }
    }

    /// The worker is gone: events wait for the next one.
    pub fn detach_worker(&self) {
        *self.worker.lock().expect("worker link") = None;
    }

    /// The current worker's pid.
    pub fn worker_pid(&self) -> Option<i32> {
        self.worker
            .lock()
            .expect("worker link")
            .as_ref()
            .map(|l| l.pid)
    }

    /// Sends the current worker a message that waits for nothing (an answer to one of its
    /// requests); dropped if no worker is attached, as the requester is gone then.
    pub fn send_to_worker(&self, message: &ToWorker) {
        let mut worker = self.worker.lock().expect("worker link");
        if let Some(link) = worker.as_mut()
            && let Err(e) = relay::send(&mut link.stream, message)
        {
            tracing::warn!("answering worker {}: {e}", link.pid);
            Self::replace(&mut worker);
        }
    }

    /// Reads a worker's messages until its end of the socket closes: answers go to what waits
    /// for them, requests to `requests`.
    pub fn take_answers(&self, mut stream: UnixStream, requests: &dyn Fn(ToHolder)) {
        loop {
            match relay::receive::<ToHolder>(&mut stream) {
                Ok(Some(ToHolder::Answer { id, verdict })) => {
                    let pending = self.pending.lock().expect("pending events").remove(&id);
                    // An unknown id was answered already (twice asked, or expired).
                    if let Some(pending) = pending {
                        self.answer(pending.waiter, verdict.into());
                    }
                }
                Ok(Some(request)) => requests(request),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("reading the worker's answers: {e}");
                    return;
                }
            }
        }
    }

    /// Denies, with EIO, every event older than the budget (no worker managed to answer it).
    pub fn expire(&self) {
        let expired: Vec<Pending> = {
            let mut pending = self.pending.lock().expect("pending events");
            let old: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.since.elapsed() > self.give_up_after)
                .map(|(id, _)| *id)
                .collect();
            old.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for pending in expired {
            tracing::warn!(
                "an access by pid {} waited {:?} without an answer from a worker; it gets EIO",
                pending.waiter.pid(),
                self.give_up_after
            );
            self.answer(pending.waiter, Answer::Deny(libc::EIO));
        }
    }

    /// How many events wait for an answer.
    pub fn pending(&self) -> usize {
        self.pending.lock().expect("pending events").len()
    }

    fn answer(&self, waiter: Waiter, answer: Answer) {
        match waiter {
            Waiter::Event(event) => self.answer_event(&event, answer),
            Waiter::Fill(sender) => {
                let _ = sender.send(answer.into());
            }
        }
    }

    fn answer_event(&self, event: &Event, answer: Answer) {
        if let Err(e) = self.group.answer(event, answer) {
            tracing::error!("answering a fanotify event: {e}");
        }
    }
}
