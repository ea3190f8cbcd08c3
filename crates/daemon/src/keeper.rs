//! Keepers of the fanotify group: processes other than the daemon that hold a duplicate of its
//! group fd, so that the group (and with it every mark and every waiting reader) outlives the
//! death of both daemon processes. fanotify fails open only when the group's last fd closes;
//! while a keeper holds one, readers of unfilled files keep waiting instead of reading zeros.
//!
//! A keeper (`lazylayer run`, for the life of its container) gets the fd from the daemon
//! ([`crate::client::group_fd`]), offers it on `ROOT/keepers/<pid>.sock` ([`Keeper`]), and
//! starts a new daemon when none answers. A holder starting up takes the group from the first
//! keeper that answers ([`collect_group`]) instead of making a new one, and before it reads any
//! event denies (EIO) every event the dead daemon had read and not answered
//! ([`deny_orphans`]): the kernel matches an answer by the fd number the event was read with,
//! in any process that holds the group, and those numbers died with the daemon. Such a reader
//! gets EIO, never zeros, and never waits for ever; events the dead daemon never read are read
//! and answered as usual.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use lazylayer_fanotify::{Answer, Group};
use lazylayer_store::Store;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// Sends `fd` over the unix socket `stream`, with `bytes` (at least one byte) as the message.
pub fn send_fd(stream: BorrowedFd<'_>, fd: BorrowedFd<'_>, bytes: &[u8]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the descriptor"));
    }
    let mut sent = sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )?;
    // The descriptor went with the first bytes; the rest, if any, plainly.
    while sent < bytes.len() {
        sent += rustix::io::write(stream, &bytes[sent..])?;
    }
    Ok(())
}

/// Receives one descriptor sent with [`send_fd`], and the bytes that came with it (up to
/// `buffer.len()`).
pub fn recv_fd(stream: BorrowedFd<'_>, buffer: &mut [u8]) -> std::io::Result<(OwnedFd, usize)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        stream,
        &mut [IoSliceMut::new(buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received in fds {
                fd.get_or_insert(received);
            }
        }
    }
    let fd = fd.ok_or_else(|| std::io::Error::other("no descriptor came with the message"))?;
    Ok((fd, received.bytes))
}

/// A keeper's offer of the group fd to the next holder, on `ROOT/keepers/<pid>.sock`; gone
/// when dropped.
pub struct Keeper {
    path: PathBuf,
    _group: std::sync::Arc<OwnedFd>,
}

impl Keeper {
    /// Holds `group` and offers it on a socket of this process's own.
    pub fn start(store: &Store, group: OwnedFd) -> std::io::Result<Keeper> {
        use std::os::unix::fs::PermissionsExt;
        let dir = store.keepers_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let path = dir.join(format!("{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let group = std::sync::Arc::new(group);
        let offered = group.clone();
        std::thread::Builder::new()
            .name("group-keeper".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if let Err(refusal) = crate::peer::check_peer(&stream) {
                        tracing::warn!("{refusal}: not handing it the fanotify group");
                        continue;
                    }
                    if let Err(e) = send_fd(stream.as_fd(), offered.as_fd(), b"g") {
                        tracing::warn!("handing the fanotify group to a new daemon: {e}");
                    }
                }
            })?;
        Ok(Keeper {
            path,
            _group: group,
        })
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The group a keeper holds, if one answers (stale offers of dead keepers are removed).
pub fn collect_group(store: &Store) -> Option<Group> {
    let listing = std::fs::read_dir(store.keepers_dir()).ok()?;
    for entry in listing.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "sock") {
            continue;
        }
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        match recv_fd(stream.as_fd(), &mut [0u8; 1]) {
            Ok((fd, _)) => {
                tracing::warn!(
                    "taking over the fanotify group a keeper held ({}): the last daemon died",
                    path.display()
                );
                return Some(Group::from_fd(fd));
            }
            Err(e) => tracing::warn!("{}: {e}", path.display()),
        }
    }
    None
}

/// Denies (EIO) every event of `group` that a dead daemon read and left unanswered: it tries
/// every fd number below `limit` (the dead daemon's open-file limit); numbers with no pending
/// event are refused by the kernel and change nothing. Returns how many were denied. Must run
/// before this process reads any event of the group.
pub fn deny_orphans(group: &Group, limit: u64) -> usize {
    (0..limit.min(i32::MAX as u64) as i32)
        .filter(|&fd| group.answer_fd(fd, Answer::Deny(libc::EIO)).is_ok())
        .count()
}

/// This process's open-file limit: the dead daemon's, as it ran with the same.
pub fn fd_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
        .min(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_crosses_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        send_fd(a.as_fd(), file.as_fd(), b"hello").unwrap();
        let mut buffer = [0u8; 16];
        let (fd, n) = recv_fd(b.as_fd(), &mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"hello");
        let ours = rustix::fs::fstat(&file).unwrap();
        let theirs = rustix::fs::fstat(&fd).unwrap();
        assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));
    }
}
