//! A fanotify group of the pre-content class (Linux 6.14+): inode marks for open-permission and
//! pre-access events, reading events, answering them. The fanotify syscalls are called here and
//! only here; constants the libc crate lacks are defined locally (docs/kernel.md, "Constants
//! the libc crate lacks").

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// `FAN_PRE_ACCESS`: a read or write of a range is about to happen (6.14+).
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// Info record type of the range of a pre-access event.
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
/// The events a placeholder is marked for: every open (including exec) and every access.
pub const PLACEHOLDER_MASK: u64 = libc::FAN_OPEN_PERM | libc::FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS;

/// `FAN_DENY` with an errno for the denied caller (6.14+).
fn deny_with(errno: i32) -> u32 {
    libc::FAN_DENY | (((errno & 0xff) as u32) << 24)
}

/// One permission event.
#[derive(Debug)]
pub struct Event {
    /// Event bits.
    pub mask: u64,
    /// An fd on the file (read-only); closed when the event is dropped after its answer.
    pub fd: OwnedFd,
    /// The process that caused the event.
    pub pid: i32,
    /// For pre-access events: offset and length of the access.
    pub range: Option<(u64, u64)>,
}

/// How to answer a permission event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Let the access happen.
    Allow,
    /// Fail it with this errno (EIO when data could not be fetched).
    Deny(i32),
}

/// A pre-content fanotify group.
pub struct Group {
    fd: OwnedFd,
}

impl Group {
    /// A new group. Needs CAP_SYS_ADMIN.
    pub fn new() -> std::io::Result<Group> {
        let flags = libc::FAN_CLASS_PRE_CONTENT
            | libc::FAN_CLOEXEC
            | libc::FAN_UNLIMITED_QUEUE
            | libc::FAN_UNLIMITED_MARKS;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        // SAFETY: fanotify_init takes two integer flag sets and returns a new fd or -1.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Group { fd })
    }

    /// The group whose fd a parent process handed down (the holder's shared group).
    pub fn from_fd(fd: OwnedFd) -> Group {
        Group { fd }
    }

    /// The group's fd, to hand to a worker process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    fn mark(&self, flags: u32, dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> std::io::Result<()> {
        let name = CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the group fd and the directory fd are open for the duration of the call, and
        // `name` is a NUL-terminated string that outlives it.
        let result = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags | libc::FAN_MARK_DONT_FOLLOW,
                PLACEHOLDER_MASK,
                dir.as_raw_fd(),
                name.as_ptr(),
            )
        };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Opens and accesses made through the mount `dir` is on raise no event of this group.
    /// For the daemon's own private clone of the store's mount: its writes into placeholders
    /// then cost no event, no answer, no wait, while every other mount (overlay's clone of
    /// the lower included) still raises them. An ignore mark on the mount: the inode marks
    /// stay, and the kernel drops the event for this mount only.
    pub fn ignore_mount(&self, dir: BorrowedFd<'_>) -> std::io::Result<()> {
        // SAFETY: the group fd and `dir` are open for the duration of the call; a null path
        // names `dir` itself.
        let result = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_ADD
                    | libc::FAN_MARK_MOUNT
                    | libc::FAN_MARK_IGNORE
                    | libc::FAN_MARK_IGNORED_SURV_MODIFY,
                PLACEHOLDER_MASK,
                dir.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Marks the file `name` in `dir` (an inode mark; the name is not followed if a symlink).
    pub fn add_mark(&self, dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> std::io::Result<()> {
        self.mark(libc::FAN_MARK_ADD, dir, name)
    }

    /// Removes the mark of the file `name` in `dir`; a file without a mark is fine.
    pub fn remove_mark(&self, dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> std::io::Result<()> {
        match self.mark(libc::FAN_MARK_REMOVE, dir, name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Waits for events and returns them (blocking).
    pub fn read_events(&self) -> std::io::Result<Vec<Event>> {
        self.read_events_up_to(64 << 10)
    }

    /// Waits for events and returns one or two (blocking): what a relaying reader uses, so
    /// that few events are ever read and not yet passed on.
    pub fn read_few_events(&self) -> std::io::Result<Vec<Event>> {
        // Room for one event with a range record (48 bytes), or two without.
        self.read_events_up_to(64)
    }

    fn read_events_up_to(&self, bytes: usize) -> std::io::Result<Vec<Event>> {
        let mut buffer = vec![0u8; bytes];
        let n = loop {
            // SAFETY: the buffer is valid for writes of its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        };
        Ok(parse_events(&buffer[..n]))
    }

    /// Answers a permission event; the event's fd is closed when `event` is dropped.
    pub fn answer(&self, event: &Event, answer: Answer) -> std::io::Result<()> {
        self.answer_fd(event.fd.as_raw_fd(), answer)
    }

    /// Answers the pending event that was read with fd number `fd` (the kernel matches answers
    /// by that number, in whichever process it was installed).
    pub fn answer_fd(&self, fd: RawFd, answer: Answer) -> std::io::Result<()> {
        let response = libc::fanotify_response {
            fd,
            response: match answer {
                Answer::Allow => libc::FAN_ALLOW,
                Answer::Deny(errno) => deny_with(errno),
            },
        };
        let size = std::mem::size_of::<libc::fanotify_response>();
        // SAFETY: `response` is a plain struct of the size passed, alive for the call.
        let written = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&response as *const libc::fanotify_response).cast(),
                size,
            )
        };
        if written != size as isize {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The group's fd (to see its marks in /proc/self/fdinfo).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One event record as the kernel wrote it, before its fd is owned by anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// Event bits.
    pub mask: u64,
    /// The fd the kernel installed for the event (negative for overflow records).
    pub fd: i32,
    /// The process that caused the event.
    pub pid: i32,
    /// For pre-access events: offset and length of the access.
    pub range: Option<(u64, u64)>,
}

/// Splits a buffer read from a group into event records; a record that does not fit, or whose
/// lengths contradict each other, ends the list.
pub fn decode_events(mut bytes: &[u8]) -> Vec<EventRecord> {
    let header = std::mem::size_of::<libc::fanotify_event_metadata>();
    let mut events = Vec::new();
    while bytes.len() >= header {
        // SAFETY: at least `header` bytes are available; read_unaligned copes with alignment,
        // and every bit pattern is a valid fanotify_event_metadata (plain integers).
        let metadata: libc::fanotify_event_metadata =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let len = metadata.event_len as usize;
        let metadata_len = metadata.metadata_len as usize;
        if len < header || len > bytes.len() || metadata_len < header || metadata_len > len {
            break;
        }
        let mut range = None;
        let mut info = &bytes[metadata_len..len];
        while info.len() >= 4 {
            let (info_type, info_len) = (info[0], u16::from_ne_bytes([info[2], info[3]]) as usize);
            if info_len < 4 || info_len > info.len() {
                break;
            }
            if info_type == FAN_EVENT_INFO_TYPE_RANGE && info_len >= 24 {
                let offset = u64::from_ne_bytes(info[8..16].try_into().expect("8 bytes"));
                let count = u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes"));
                range = Some((offset, count));
            }
            info = &info[info_len..];
        }
        events.push(EventRecord {
            mask: metadata.mask,
            fd: metadata.fd,
            pid: metadata.pid,
            range,
        });
        bytes = &bytes[len..];
    }
    events
}

/// The events of a buffer the kernel just filled, each owning the fd installed for it.
fn parse_events(bytes: &[u8]) -> Vec<Event> {
    decode_events(bytes)
        .into_iter()
        .filter(|record| record.fd >= 0)
        .map(|record| Event {
            mask: record.mask,
            // SAFETY: the kernel installed this fd for us with the event, in the buffer we
            // just read; nothing else owns it, so it is owned exactly once from here.
            fd: unsafe { OwnedFd::from_raw_fd(record.fd) },
            pid: record.pid,
            range: record.range,
        })
        .collect()
}

/// Whether the filesystem holding `dir` takes pre-content marks (ext4, xfs, btrfs do; tmpfs
/// and overlayfs do not).
pub fn supports_pre_content(dir: &std::path::Path) -> std::io::Result<bool> {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let group = Group::new()?;
    // A name of this probe's own: several commands may probe one store at once.
    let name = format!(
        ".lazylayer-probe.{}.{}",
        std::process::id(),
        PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let probe = dir.join(&name);
    std::fs::write(&probe, b"")?;
    let parent = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let result = group.add_mark(
        std::os::fd::AsFd::as_fd(&parent),
        std::ffi::OsStr::new(&name),
    );
    let _ = std::fs::remove_file(&probe);
    match result {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
