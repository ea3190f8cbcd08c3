//! The descriptors the holder hands each worker across exec, named on its command line.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::ServeError;

/// The descriptors the holder hands its worker: the shared fanotify group, the worker's end
/// of the relay, and the listening control socket (so that commands queue while a worker
/// restarts).
pub struct WorkerFds {
    /// The shared fanotify group.
    pub group: OwnedFd,
    /// The worker's end of the relay socket pair.
    pub relay: OwnedFd,
    /// The bound, listening control socket.
    pub listener: OwnedFd,
}

impl WorkerFds {
    /// The `--worker-fds` value naming these descriptors.
    pub fn to_arg(group: RawFd, relay: RawFd, listener: RawFd) -> String {
        format!("{group},{relay},{listener}")
    }

    /// Takes ownership of the descriptors named by a `--worker-fds` value.
    pub fn from_arg(arg: &str) -> Result<WorkerFds, ServeError> {
        let bad = |reason: &str| ServeError::BadWorkerFds {
            arg: arg.to_string(),
            reason: reason.to_string(),
        };
        let numbers: Vec<RawFd> = arg
            .split(',')
            .map(|n| n.parse::<RawFd>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("expected three fd numbers"))?;
        let [group, relay, listener] = numbers[..] else {
            return Err(bad("expected three fd numbers"));
        };
        let mut owned = Vec::new();
        for fd in [group, relay, listener] {
            // SAFETY: fcntl(F_GETFD) only queries the descriptor table; it fails for a number
            // that is not open.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 || owned.contains(&fd) {
                return Err(bad(&format!(
                    "fd {fd} is not a descriptor the holder handed down"
                )));
            }
            owned.push(fd);
        }
        // SAFETY: the holder opened these descriptors, left them open across exec for us and
        // named them on our command line; nothing else in this process owns them (checked open
        // and distinct above), so each is owned exactly once from here.
        let take = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WorkerFds {
            group: take(group),
            relay: take(relay),
            listener: take(listener),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_that_were_not_handed_down_are_refused() {
        for arg in ["", "1,2", "a,b,c", "0,1,2", "900,901,902"] {
            assert!(WorkerFds::from_arg(arg).is_err(), "{arg}");
        }
    }
}
