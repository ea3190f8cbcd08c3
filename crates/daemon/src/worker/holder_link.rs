//! The worker's end of the relay from the holder: events and fill requests come in and go to
//! [`Demand`](super::demand::Demand), answers go back by id, and the worker's own requests
//! (mount a FUSE layer, report the FUSE counters) get their answers matched by request id.
//! When the holder is gone, the worker answers what the holder had relayed straight to the
//! shared group, and reads the group itself from then on.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazylayer_fanotify::Group;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::relay::{self, ToHolder, ToWorker, Verdict};
use crate::worker::demand::Demand;

/// How long the worker waits for the holder to answer one of its requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The worker's end of the relay.
pub struct HolderLink {
    writer: Mutex<UnixStream>,
    state: Mutex<LinkState>,
    next_request: AtomicU64,
}

#[derive(Default)]
struct LinkState {
    /// Set once the holder's end has closed (the holder died).
    holder_gone: bool,
    /// Relayed events and fill requests not answered yet, by id.
    outstanding: HashMap<u64, Outstanding>,
    /// The worker's requests waiting for the holder's answer, by request id.
    requests: HashMap<u64, oneshot::Sender<ToWorker>>,
}

/// A relayed event or fill request not answered yet.
struct Outstanding {
    /// For a fanotify event, the holder's fd number of it (answers are matched by it); none
    /// for a FUSE fill request (which died with the holder's FUSE mount).
    fd: Option<i32>,
    /// After a takeover: a descriptor of ours occupying that number, so that no event read
    /// here gets the same number before this one is answered.
    reservation: Option<std::os::fd::OwnedFd>,
    /// An answer the dying holder could not take: given at the takeover.
    deferred: Option<Verdict>,
}

impl HolderLink {
    /// The link over `stream` (the worker's end of the socket pair).
    pub fn new(stream: &UnixStream) -> std::io::Result<Arc<HolderLink>> {
        let writer = stream.try_clone()?;
        writer.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Arc::new(HolderLink {
            writer: Mutex::new(writer),
            state: Mutex::new(LinkState::default()),
            next_request: AtomicU64::new(1),
        }))
    }

    /// Asks the holder something and waits for its answer (see [`ToHolder`]).
    pub async fn request(&self, make: impl FnOnce(u64) -> ToHolder) -> Result<ToWorker, String> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut state = self.state.lock().expect("link state");
            if state.holder_gone {
                return Err("the holder process is gone".into());
            }
            state.requests.insert(id, sender);
        }
        let sent = relay::send(&mut *self.writer.lock().expect("relay writer"), &make(id));
        if let Err(e) = sent {
            self.state.lock().expect("link state").requests.remove(&id);
            return Err(format!("asking the holder: {e}"));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, receiver).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("the holder went away before it answered".into()),
            Err(_) => {
                self.state.lock().expect("link state").requests.remove(&id);
                Err(format!(
                    "the holder did not answer within {REQUEST_TIMEOUT:?}"
                ))
            }
        }
    }

    /// Reads the holder's messages on `reader` until the holder is gone, having `demand`
    /// answer its events and fill requests (fills run on `runtime`); then takes over: answers
    /// what the holder had relayed straight to `group`, and reads the group itself from then
    /// on. Returns only if reading the group fails.
    pub fn serve(
        self: &Arc<Self>,
        mut reader: UnixStream,
        demand: Arc<Demand>,
        group: Arc<Group>,
        runtime: Handle,
    ) -> std::io::Result<()> {
        loop {
            match relay::receive::<ToWorker>(&mut reader) {
                Ok(Some(ToWorker::Event(event))) => {
                    self.received(event.id, Some(event.fd));
                    let (link, group) = (self.clone(), group.clone());
                    demand.wait_for(Some(event.inode), event.pid, &runtime, move |verdict| {
                        link.answer(&group, event.id, verdict)
                    });
                }
                Ok(Some(ToWorker::Fill { id, inode })) => {
                    self.received(id, None);
                    let (link, group) = (self.clone(), group.clone());
                    // A FUSE open comes from the holder's own threads: no pid to check.
                    demand.wait_for(Some(inode), 0, &runtime, move |verdict| {
                        link.answer(&group, id, verdict)
                    });
                }
                Ok(Some(answer @ (ToWorker::FuseMounted { .. } | ToWorker::FuseState { .. }))) => {
                    let request = match &answer {
                        ToWorker::FuseMounted { request, .. }
                        | ToWorker::FuseState { request, .. } => *request,
                        _ => unreachable!("matched above"),
                    };
                    let waiter = self
                        .state
                        .lock()
                        .expect("link state")
                        .requests
                        .remove(&request);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(answer);
                    }
                }
                Ok(None) => break,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // The holder lives but speaks another language (an upgrade changed the
                    // messages): taking over its group beside it would answer events twice.
                    // Leave; the holder starts the next worker.
                    tracing::error!("a message from the holder that this worker cannot read: {e}");
                    std::process::exit(1);
                }
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
        self.take_over(&group);
        read_group(&group, &demand, &runtime)
    }

    fn received(&self, id: u64, fd: Option<i32>) {
        self.state.lock().expect("link state").outstanding.insert(
            id,
            Outstanding {
                fd,
                reservation: None,
                deferred: None,
            },
        );
    }

    /// The holder is gone: answer what it could not take, reserve the fd numbers of the events
    /// still being filled, and fail the requests still waiting, before this process reads the
    /// group itself.
    fn take_over(&self, group: &Group) {
        let mut state = self.state.lock().expect("link state");
        state.holder_gone = true;
        state.requests.clear();
        state
            .outstanding
            .retain(|_, event| match (event.fd, event.deferred) {
                (None, _) => false,
                (Some(fd), Some(verdict)) => {
                    if let Err(e) = group.answer_fd(fd, verdict.into()) {
                        tracing::error!("answering a fanotify event: {e}");
                    }
                    false
                }
                (Some(fd), None) => {
                    event.reservation = reserve_fd_number(fd);
                    true
                }
            });
    }

    /// Answers through the holder while it lives, straight to the group once it is gone.
    fn answer(&self, group: &Group, id: u64, verdict: Verdict) {
        let mut state = self.state.lock().expect("link state");
        if state.holder_gone {
            // Dropping the entry releases the number's reservation, after the answer.
            if let Some(Outstanding { fd: Some(fd), .. }) = state.outstanding.get(&id)
                && let Err(e) = group.answer_fd(*fd, verdict.into())
            {
                tracing::error!("answering a fanotify event: {e}");
            }
            state.outstanding.remove(&id);
            return;
        }
        let reply = ToHolder::Answer { id, verdict };
        match relay::send(&mut *self.writer.lock().expect("relay writer"), &reply) {
            Ok(()) => {
                state.outstanding.remove(&id);
            }
            // The holder is going away; the event stays pending in the group and is answered
            // at the takeover.
            Err(_) => {
                if let Some(event) = state.outstanding.get_mut(&id) {
                    event.deferred = Some(verdict);
                }
            }
        }
    }
}

/// Reads `group`'s events on the calling thread for ever, answering each through `demand`
/// (after the holder is gone).
fn read_group(group: &Arc<Group>, demand: &Arc<Demand>, runtime: &Handle) -> std::io::Result<()> {
    loop {
        for event in group.read_events()? {
            let inode = rustix::fs::fstat(&event.fd)
                .ok()
                .map(|stat| (stat.st_dev, stat.st_ino));
            let pid = event.pid;
            let group = group.clone();
            demand.wait_for(inode, pid, runtime, move |verdict| {
                if let Err(e) = group.answer(&event, verdict.into()) {
                    tracing::error!("answering a fanotify event: {e}");
                }
            });
        }
    }
}

/// Occupies fd number `fd` in this process with a descriptor of /dev/null if it is free (if it
/// is taken, whatever holds it keeps it from new events just as well).
fn reserve_fd_number(fd: i32) -> Option<std::os::fd::OwnedFd> {
    let null = std::fs::File::open("/dev/null").ok()?;
    let copy = rustix::io::fcntl_dupfd_cloexec(&null, fd).ok()?;
    (std::os::fd::AsRawFd::as_raw_fd(&copy) == fd).then_some(copy)
}
