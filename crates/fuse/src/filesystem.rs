//! The FUSE filesystem of one lazy layer: metadata from the index, data from the layer
//! directory. `open` has the file filled first when its data is not local (by whoever provides
//! [`LayerContent`]: `EIO` when that fails, never zeros), then replies with a passthrough backing
//! file so that reads and mmaps go straight to the layer directory. Without passthrough (older kernels)
//! reads are answered from the same filled file.
//!
//! Why one file of this size: it is one `fuser::Filesystem` implementation, whose methods share the
//! inode table and the open files.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use lazylayer_index::{Entry, EntryKind, LayerIndex};
use lazylayer_store::LayerTree;
use rustix::fs::OFlags;

use crate::inodes::{InodeTable, ROOT};

/// Layers never change: the kernel may keep names and attributes as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// What the daemon counts of a FUSE layer (for `status`, and for tests that prove passthrough).
#[derive(Debug, Default)]
pub struct FuseStats {
    /// READ requests that came to the daemon (zero when every open got passthrough).
    pub reads: AtomicU64,
    /// Opens answered with a passthrough backing file.
    pub passthrough_opens: AtomicU64,
    /// Opens of regular files with data (each has the file made local first, if it is not).
    pub file_opens: AtomicU64,
}

/// What a FUSE layer is made of: its index and directory, and a way to have a file's data
/// made local. The holder implements it by relaying fill requests to the worker, so that the
/// FUSE connection outlives any worker.
pub trait LayerContent: Send + Sync {
    /// The layer's index (names, attributes, where data sits).
    fn index(&self) -> &LayerIndex;
    /// The layer directory holding the data.
    fn tree(&self) -> &LayerTree;
    /// Makes entry `i`'s data local (blocking), or fails with the errno the reader gets.
    fn fill(&self, i: usize) -> Result<(), Errno>;
}

/// An open file: the filled file, and its backing id when passed through.
type OpenFile = (std::fs::File, Option<Arc<BackingId>>);

/// Extended attributes: (name, value).
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The FUSE filesystem of one layer.
pub struct LayerFs {
    content: Arc<dyn LayerContent>,
    inodes: InodeTable,
    stats: Arc<FuseStats>,
    passthrough: bool,
    next_fh: AtomicU64,
    /// Open files: the filled file, and its backing id when passed through.
    handles: Mutex<HashMap<u64, OpenFile>>,
    /// One backing id per inode while any open of it lives.
    backing: Mutex<HashMap<u64, Weak<BackingId>>>,
}

impl LayerFs {
    /// The filesystem of the layer `content` describes.
    pub fn new(content: Arc<dyn LayerContent>, stats: Arc<FuseStats>) -> LayerFs {
        let inodes = InodeTable::new(content.index());
        LayerFs {
            content,
            inodes,
            stats,
            passthrough: false,
            next_fh: AtomicU64::new(1),
            handles: Mutex::new(HashMap::new()),
            backing: Mutex::new(HashMap::new()),
        }
    }

    fn entry_of(&self, ino: u64) -> Result<Option<&Entry>, Errno> {
        match self.inodes.entry(ino) {
            Some(Some(i)) => Ok(Some(&self.content.index().entries[i])),
            Some(None) => Ok(None),
            None => Err(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let entry = self.entry_of(ino)?;
        let time = |e: Option<&Entry>| {
            e.map_or(UNIX_EPOCH, |e| {
                if e.mtime >= 0 {
                    UNIX_EPOCH + Duration::new(e.mtime as u64, e.mtime_nsec)
                } else {
                    UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
                }
            })
        };
        let (kind, perm, size, rdev) = match entry {
            None => (FileType::Directory, 0o755, 0, 0),
            Some(e) => {
                let kind = match e.kind {
                    EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
                    EntryKind::Dir => FileType::Directory,
                    EntryKind::Symlink => FileType::Symlink,
                    EntryKind::CharDevice | EntryKind::Whiteout => FileType::CharDevice,
                    EntryKind::BlockDevice => FileType::BlockDevice,
                    EntryKind::Fifo => FileType::NamedPipe,
                };
                let size = match e.kind {
                    EntryKind::File => e.size,
                    EntryKind::Symlink => e.link.as_ref().map_or(0, |l| l.len() as u64),
                    _ => 0,
                };
                let rdev = e
                    .device
                    .map_or(0, |(major, minor)| libc::makedev(major, minor) as u32);
                let perm = if e.kind == EntryKind::Whiteout {
                    0
                } else {
                    e.mode as u16
                };
                (kind, perm, size, rdev)
            }
        };
        let mtime = time(entry);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink: self.inodes.nlink(self.content.index(), ino),
            uid: entry.map_or(0, |e| e.uid as u32),
            gid: entry.map_or(0, |e| e.gid as u32),
            rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    fn open_filled(&self, i: usize) -> Result<std::fs::File, Errno> {
        let entry = &self.content.index().entries[i];
        self.content
            .tree()
            .open_entry(&entry.path, OFlags::RDONLY)
            .map(std::fs::File::from)
            .map_err(|e| {
                tracing::warn!("opening a filled file: {e}");
                Errno::EIO
            })
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Listings come with attributes: a cold `find` or `ls -l` makes no LOOKUP per name.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough = true;
        } else {
            tracing::warn!("this kernel offers no FUSE passthrough: reads go through the daemon");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(i) = self.inodes.lookup(parent.0, name.as_bytes()) else {
            return reply.error(Errno::ENOENT);
        };
        let ino = self.inodes.ino_of(self.content.index(), i);
        match self.attr(ino) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry_of(ino.0) {
            Ok(Some(e)) if e.kind == EntryKind::Symlink => {
                reply.data(e.link.as_deref().unwrap_or_default())
            }
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(Some(i)) = self.inodes.entry(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let entry = &self.content.index().entries[i];
        if entry.kind == EntryKind::File && entry.stored_size() > 0 {
            self.stats.file_opens.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.content.fill(i) {
                return reply.error(e);
            }
        }
        let file = match self.open_filled(i) {
            Ok(file) => file,
            Err(e) => return reply.error(e),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if self.passthrough {
            let mut backing = self.backing.lock().expect("backing ids");
            let id = match backing.get(&ino.0).and_then(Weak::upgrade) {
                Some(id) => id,
                None => match reply.open_backing(&file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        backing.insert(ino.0, Arc::downgrade(&id));
                        id
                    }
                    Err(e) => {
                        tracing::warn!(
                            "FUSE passthrough refused ({e}): reads go through the daemon"
                        );
                        drop(backing);
                        self.handles
                            .lock()
                            .expect("handles")
                            .insert(fh, (file, None));
                        return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                    }
                },
            };
            drop(backing);
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            self.handles
                .lock()
                .expect("handles")
                .insert(fh, (file, Some(id.clone())));
            reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        } else {
            self.handles
                .lock()
                .expect("handles")
                .insert(fh, (file, None));
            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let handles = self.handles.lock().expect("handles");
        let Some((file, _)) = handles.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut buffer = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read_at(&mut buffer[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        reply.data(&buffer[..filled]);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Read-only: nothing to write back.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().expect("handles").remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if !self.inodes.is_dir(ino.0) {
            return reply.error(Errno::ENOTDIR);
        }
        let index = self.content.index();
        let dots = [
            (ino.0, FileType::Directory, &b"."[..]),
            (ROOT, FileType::Directory, &b".."[..]),
        ];
        let listing = dots
            .into_iter()
            .chain(self.inodes.children(ino.0).iter().map(|(name, i)| {
                let child = self.inodes.ino_of(index, *i);
                let kind = self.attr(child).map_or(FileType::RegularFile, |a| a.kind);
                (child, kind, name.as_slice())
            }));
        for (k, (child, kind, name)) in listing.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), k as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if !self.inodes.is_dir(ino.0) {
            return reply.error(Errno::ENOTDIR);
        }
        let index = self.content.index();
        let dots = [(ino.0, &b"."[..]), (ROOT, &b".."[..])];
        let listing = dots.into_iter().chain(
            self.inodes
                .children(ino.0)
                .iter()
                .map(|(name, i)| (self.inodes.ino_of(index, *i), name.as_slice())),
        );
        for (k, (child, name)) in listing.enumerate().skip(offset as usize) {
            let Ok(attr) = self.attr(child) else {
                continue;
            };
            if reply.add(
                INodeNo(child),
                k as u64 + 1,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::fstatvfs(self.content.tree().root_fd()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(_) => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
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

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = match self.xattrs(ino.0) {
            Ok(xattrs) => xattrs
                .into_iter()
                .find(|(n, _)| n.as_slice() == name.as_bytes())
                .map(|(_, v)| v),
            Err(e) => return reply.error(e),
        };
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(value) if size == 0 => reply.size(value.len() as u32),
            Some(value) if value.len() > size as usize => reply.error(Errno::ERANGE),
            Some(value) => reply.data(&value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names: Vec<u8> = match self.xattrs(ino.0) {
            Ok(xattrs) => xattrs
                .into_iter()
                .flat_map(|(mut n, _)| {
                    n.push(0);
                    n
                })
                .collect(),
            Err(e) => return reply.error(e),
        };
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }
}

impl LayerFs {
    /// The entry's xattrs, with overlayfs's opaque marker on opaque directories.
    fn xattrs(&self, ino: u64) -> Result<Xattrs, Errno> {
        let Some(entry) = self.entry_of(ino)? else {
            return Ok(Vec::new());
        };
        let mut xattrs = entry.xattrs.clone();
        if entry.opaque {
            xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
        }
        Ok(xattrs)
    }
}
