//! A loopback address where connections never complete: a listener with a backlog of 0 whose
//! accept queue is filled by connections held open and never accepted, so the kernel drops
//! further SYNs and a client's connect hangs until its connect timeout.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// A listener that completes no more connections; stops when dropped.
pub struct Blackhole {
    listener: TcpListener,
    _held: Vec<TcpStream>,
}

impl Blackhole {
    /// Binds 127.0.0.1 on a free port and fills its accept queue.
    pub fn start() -> io::Result<Blackhole> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        // SAFETY: listen(2) on a socket this function owns; calling it again on a listening
        // socket only lowers its backlog.
        if unsafe { libc::listen(listener.as_raw_fd(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = listener.local_addr()?;
        let mut held = Vec::new();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => held.push(stream),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => return Err(e),
            }
            if held.len() > 8 {
                return Err(io::Error::other(
                    "the accept queue never filled: connects still complete",
                ));
            }
        }
        Ok(Blackhole {
            listener,
            _held: held,
        })
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> String {
        self.addr().to_string()
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }
}
