//! The FUSE filesystem containers/storage looks into:
//!
//! ```text
//! MOUNTPOINT/<base64 of the image reference>/<layer digest>/
//!     diff   symlink to the layer's directory (its FUSE mount while lazy in FUSE mode)
//!     info   the layer record (JSON)
//!     blob   the compressed layer
//!     use    created to count a use (answered ENOENT, as containers/storage expects)
//! ```
//! Removing a layer directory ends a use (also answered ENOENT). Names are decoded on lookup
//! without any I/O; `diff`, `info` and `blob` resolve the layer (pulling it lazily if need be)
//! and answer "not here" when it cannot be served. No file data of the layer crosses this
//! filesystem: overlayfs follows `diff` to the layer directory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyPoll, Request,
};
use lazylayer_source::Digest;

use crate::layers::{Layers, ServedLayer};
use crate::names::{self, BLOB, DIFF, INFO, USE};

/// How long the kernel may keep names and attributes that cannot change (directories, and a
/// served layer's `info` and `blob`).
const TTL: Duration = Duration::from_secs(1);

/// The root's inode number.
const ROOT: u64 = 1;

/// What an inode is.
#[derive(Clone, Debug)]
enum Node {
    Root,
    /// `<base64 reference>`
    Image {
        reference: String,
    },
    /// `<base64 reference>/<digest>`
    Layer {
        reference: String,
        digest: Digest,
    },
    /// `diff`, `info` or `blob` of a layer directory.
    File {
        kind: FileKind,
        reference: String,
        digest: Digest,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Diff,
    Info,
    Blob,
}

/// Inodes, made on lookup and kept (a handful per layer path).
#[derive(Default)]
struct Inodes {
    nodes: Vec<Node>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
}

impl Inodes {
    fn get(&self, ino: u64) -> Option<&Node> {
        if ino == ROOT {
            return Some(&Node::Root);
        }
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(2)?)
    }

    fn insert(&mut self, parent: u64, name: &[u8], node: Node) -> u64 {
        if let Some(&ino) = self.by_name.get(&(parent, name.to_vec())) {
            return ino;
        }
        self.nodes.push(node);
        let ino = self.nodes.len() as u64 + 1;
        self.by_name.insert((parent, name.to_vec()), ino);
        ino
    }

    fn children(&self, parent: u64) -> Vec<(u64, Vec<u8>)> {
        let mut children: Vec<(u64, Vec<u8>)> = self
            .by_name
            .iter()
            .filter(|((p, _), _)| *p == parent)
            .map(|((_, name), ino)| (*ino, name.clone()))
            .collect();
        children.sort();
        children
    }
}

/// The layer store's filesystem.
pub struct StoreFs {
    layers: Arc<Layers>,
    runtime: tokio::runtime::Handle,
    inodes: Mutex<Inodes>,
    started: SystemTime,
}

impl StoreFs {
    /// Serves `layers`, running their async work on `runtime` (FUSE requests come on threads
    /// of their own).
    pub fn new(layers: Arc<Layers>, runtime: tokio::runtime::Handle) -> StoreFs {
        StoreFs {
            layers,
            runtime,
            inodes: Mutex::new(Inodes::default()),
            started: SystemTime::now(),
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes
            .lock()
            .expect("inodes")
            .get(ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// The layer a path stands for, or "not here" (containers/storage then downloads it).
    fn resolve(&self, reference: &str, digest: &Digest) -> Result<Arc<ServedLayer>, Errno> {
        self.runtime
            .block_on(self.layers.resolve(reference, digest))
            .map_err(|why| {
                tracing::info!("not serving {reference} layer {digest}: {why}");
                Errno::ENOENT
            })
    }

    /// Where `diff` points: the layer's lower directory now.
    fn diff_target(&self, digest: &Digest) -> Result<Vec<u8>, Errno> {
        let path = self
            .layers
            .engine()
            .store()
            .lower_dir(digest)
            .map_err(|e| {
                tracing::warn!("finding layer {digest}: {e}");
                Errno::EIO
            })?;
        Ok(path.as_os_str().as_bytes().to_vec())
    }

    fn attr(&self, ino: u64, node: &Node) -> Result<FileAttr, Errno> {
        let (kind, perm, size) = match node {
            Node::Root | Node::Image { .. } | Node::Layer { .. } => (FileType::Directory, 0o700, 0),
            Node::File {
                kind,
                reference,
                digest,
            } => {
                let served = self.resolve(reference, digest)?;
                match kind {
                    FileKind::Diff => (
                        FileType::Symlink,
                        0o777,
                        self.diff_target(digest)?.len() as u64,
                    ),
                    FileKind::Info => (FileType::RegularFile, 0o400, served.info.len() as u64),
                    FileKind::Blob => (FileType::RegularFile, 0o400, served.blob.size),
                }
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The child `name` of `parent`, made into an inode if it is one.
    fn child(&self, parent: INodeNo, name: &[u8]) -> Result<(u64, Node), Errno> {
        let node = match self.node(parent)? {
            Node::Root => Node::Image {
                reference: names::decode_reference(name).ok_or(Errno::ENOENT)?,
            },
            Node::Image { reference } => Node::Layer {
                reference,
                digest: names::decode_digest(name).ok_or(Errno::ENOENT)?,
            },
            Node::Layer { reference, digest } => {
                let kind = match name {
                    n if n == DIFF.as_bytes() => FileKind::Diff,
                    n if n == INFO.as_bytes() => FileKind::Info,
                    n if n == BLOB.as_bytes() => FileKind::Blob,
                    _ => return Err(Errno::ENOENT),
                };
                // Decided now: containers/storage takes the layer if these three exist.
                self.resolve(&reference, &digest)?;
                Node::File {
                    kind,
                    reference,
                    digest,
                }
            }
            Node::File { .. } => return Err(Errno::ENOTDIR),
        };
        let ino = self
            .inodes
            .lock()
            .expect("inodes")
            .insert(parent.0, name, node.clone());
        Ok((ino, node))
    }
}

impl Filesystem for StoreFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self
            .child(parent, name.as_bytes())
            .and_then(|(ino, node)| Ok((self.attr(ino, &node)?, node)));
        match result {
            Ok((attr, node)) => {
                // `diff` is looked up afresh each time: it moves when a FUSE layer detaches.
                let ttl = match node {
                    Node::File {
                        kind: FileKind::Diff,
                        ..
                    } => Duration::ZERO,
                    _ => TTL,
                };
                reply.entry(&ttl, &attr, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|node| self.attr(ino.0, &node)) {
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Ok(Node::File {
                kind: FileKind::Diff,
                reference,
                digest,
            }) => match self
                .resolve(&reference, &digest)
                .and_then(|_| self.diff_target(&digest))
            {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(e),
            },
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino) {
            Ok(Node::File {
                kind: FileKind::Info | FileKind::Blob,
                ..
            }) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Ok(Node::File {
            kind,
            reference,
            digest,
        }) = self.node(ino)
        else {
            return reply.error(Errno::EBADF);
        };
        let served = match self.resolve(&reference, &digest) {
            Ok(served) => served,
            // Opened, then gone (collected): an error, never a short file.
            Err(_) => return reply.error(Errno::EIO),
        };
        let end = offset.saturating_add(u64::from(size));
        match kind {
            FileKind::Info => {
                let len = served.info.len() as u64;
                let (from, to) = (offset.min(len) as usize, end.min(len) as usize);
                reply.data(&served.info[from..to]);
            }
            FileKind::Blob => match self
                .runtime
                .block_on(self.layers.read_blob(&served, offset..end))
            {
                Ok(bytes) => reply.data(&bytes),
                Err(why) => {
                    tracing::warn!("reading the blob of {digest}: {why}");
                    reply.error(Errno::EIO)
                }
            },
            FileKind::Diff => reply.error(Errno::EINVAL),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is written here.
        reply.ok();
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // Go's runtime polls every file it opens (containers/storage reading `info`): ENOSYS
        // tells the kernel these files are always ready, as regular files are.
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(Node::Layer { reference, digest }) = self.node(parent) else {
            return reply.error(Errno::EROFS);
        };
        if name.as_bytes() != USE.as_bytes() {
            return reply.error(Errno::EROFS);
        }
        // containers/storage's "notification-aware" store counts the use and answers ENOENT;
        // any other answer tells it the use was not counted (it logs a warning and goes on).
        let served_from = match self.resolve(&reference, &digest) {
            Ok(served) => Some(served.manifest.clone()),
            Err(_) => self.layers.recorded_image(&reference, &digest),
        };
        let Some(served_from) = served_from else {
            tracing::warn!("a use of {reference} layer {digest}, which is not served");
            return reply.error(Errno::EIO);
        };
        match self.layers.add_use(&reference, &digest, &served_from) {
            Ok(()) => reply.error(Errno::ENOENT),
            Err(why) => {
                tracing::warn!("counting a use of {reference} layer {digest}: {why}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(Node::Image { reference }) = self.node(parent) else {
            return reply.error(Errno::EROFS);
        };
        let Some(digest) = names::decode_digest(name.as_bytes()) else {
            return reply.error(Errno::ENOENT);
        };
        if let Err(why) = self.layers.release(&reference, &digest) {
            tracing::warn!("ending a use of {reference} layer {digest}: {why}");
        }
        reply.error(Errno::ENOENT)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No file flags or other ioctls here (`lsattr`, tar and podman ask for FS_IOC_GETFLAGS).
        reply.error(Errno::ENOTTY);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes (podman asks for security.selinux): ENOSYS tells the kernel
        // not to ask again.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        if let Node::File { .. } = node {
            return reply.error(Errno::ENOTDIR);
        }
        // What was looked up so far: this filesystem has no listing of its own.
        let children = self.inodes.lock().expect("inodes").children(ino.0);
        let mut entries = vec![
            (ino.0, FileType::Directory, b".".to_vec()),
            (ino.0, FileType::Directory, b"..".to_vec()),
        ];
        for (child, name) in children {
            let kind = match self.inodes.lock().expect("inodes").get(child) {
                Some(Node::File {
                    kind: FileKind::Diff,
                    ..
                }) => FileType::Symlink,
                Some(Node::File { .. }) => FileType::RegularFile,
                _ => FileType::Directory,
            };
            entries.push((child, kind, name));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(child),
                (i + 1) as u64,
                kind,
                OsStr::from_bytes(&name),
            ) {
                break;
            }
        }
        reply.ok();
    }
}
