//! Who may talk to lazylayer's sockets: the kernel's word on the process at the other end
//! (`SO_PEERCRED`), checked on every connection, not only the socket's mode. The control socket
//! and the keepers' sockets answer root (and the user the daemon runs as, for a store of one's
//! own); anyone else is turned away before a request is read or a descriptor is sent.

use std::os::fd::AsFd;

/// The uid of the process at the other end of `socket`, if the kernel says.
pub fn peer_uid(socket: impl AsFd) -> std::io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(socket)?.uid.as_raw())
}

/// Whether the peer of `socket` may use it; `Err` says why not.
pub fn check_peer(socket: impl AsFd) -> Result<(), String> {
    let own = rustix::process::geteuid().as_raw();
    match peer_uid(socket) {
        Ok(uid) if uid == 0 || uid == own => Ok(()),
        Ok(uid) => Err(format!(
            "lazylayer's socket answers root only (the peer is uid {uid})"
        )),
        Err(e) => Err(format!("the peer's credentials are unknown: {e}")),
    }
}
