//! systemd's file descriptor store as a keeper of the fanotify group (see [`crate::keeper`]):
//! under a unit with `FileDescriptorStoreMax=`, the holder hands systemd a duplicate of the
//! group (`FDSTORE=1`, `FDNAME=fanotify-group` on `$NOTIFY_SOCKET`), and when the service is
//! started again after both daemon processes died, systemd passes it back (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`), so that the group, its marks and its waiting readers outlive the
//! daemon. On Debian's systemd 252, `systemctl stop` empties the store (the stop drains every
//! lazy layer first, so nothing needs it then); a crash or a `kill -9` with `Restart=` keeps it.
//! `contrib/lazylayer.service` is such a unit. The protocol is `sd_notify(3)` and
//! `sd_listen_fds(3)`, written here as the few lines they are.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use lazylayer_fanotify::Group;

/// The name the group is stored under.
pub const GROUP_FD_NAME: &str = "fanotify-group";

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The group systemd passed back to this process, if it did. (The worker is started without
/// the `LISTEN_*` and `NOTIFY_SOCKET` variables: they are the holder's.)
pub fn stored_group() -> Option<Group> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    let count: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    if !ours || count == 0 {
        return None;
    }
    let position = names.split(':').position(|n| n == GROUP_FD_NAME)?;
    if position >= count {
        return None;
    }
    let fd = LISTEN_FDS_START + position as RawFd;
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours) under the
    // name we stored it with; nothing else in the process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
    tracing::warn!("taking over the fanotify group systemd kept: the last daemon died");
    Some(Group::from_fd(fd))
}

/// Tells the service manager, if one listens (`$NOTIFY_SOCKET`), that the daemon is ready, and
/// stores a duplicate of `group` with it.
pub fn notify_ready_and_store(group: &Group) {
    let Ok(address) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nFDSTORE=1\nFDNAME={GROUP_FD_NAME}\n");
    let sent = UnixDatagram::unbound().and_then(|socket| {
        if let Some(name) = address.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.connect_addr(&address)?;
        } else {
            socket.connect(&address)?;
        }
        crate::keeper::send_fd(socket.as_fd(), group.as_fd(), message.as_bytes())
    });
    match sent {
        Ok(()) => tracing::info!("stored the fanotify group with the service manager"),
        Err(e) => tracing::warn!("telling the service manager ({address}): {e}"),
    }
}

/// The variables of the service manager protocol, which only the holder may act on.
pub const MANAGER_VARIABLES: [&str; 4] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];
