//! A layer directory built from the index: every path of the layer created as a placeholder
//! with its final metadata (regular files sparse, of their final size), and file data written
//! into place later. Every path operation resolves beneath the layer root without following
//! symlinks (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) and acts on a single name
//! in an already-opened parent, so a hostile layer cannot reach outside its directory.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lazylayer_index::{Entry, EntryKind};
use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};

use crate::{Error, Result};

/// The xattr overlayfs reads to know a directory hides the layers below.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// File capabilities: a data write clears them, so they are set again after population.
pub const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// The directory of the last entry looked up, kept open for the next: entries in tar order
/// mostly share their parent, and each lookup beneath the root walks the whole path.
#[derive(Default)]
pub struct LastParent {
    path: Vec<u8>,
    dir: Option<OwnedFd>,
}

/// `relative` split into its parent directory and its last name.
fn split_parent(relative: &[u8]) -> (&[u8], &[u8]) {
    match relative.iter().rposition(|b| *b == b'/') {
        Some(slash) => (&relative[..slash], &relative[slash + 1..]),
        None => (&relative[..0], relative),
    }
}

/// A layer directory, opened.
pub struct LayerTree {
    root: OwnedFd,
    path: PathBuf,
}

/// Threads creating placeholders at once ([`LayerTree::create_all`]): creations are short
/// system calls that mostly wait for the filesystem's journal and metadata reads.
const CREATE_THREADS: usize = 8;

/// How deep `path` is in the layer (the root is 0, `etc` 1, `etc/ssl` 2).
fn depth(path: &[u8]) -> usize {
    if path.is_empty() {
        0
    } else {
        1 + path.iter().filter(|&&b| b == b'/').count()
    }
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

impl LayerTree {
    /// Opens (creating if needed) the layer directory at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::sys(format!("opening {}", path.display()), e))?;
        Ok(LayerTree {
            root,
            path: path.to_path_buf(),
        })
    }

    /// Opens the existing layer directory `path` (beneath `store_root`) through `private`,
    /// the store root opened on a private clone of its mount (see `Store::private_mount`),
    /// so that what the tree writes is reached through that mount only. `None` when the
    /// directory seen through it is not the one at `path` (another filesystem mounted over
    /// a part of the store, which a clone of one mount does not show): open it by path then.
    pub fn open_through(private: &OwnedFd, store_root: &Path, path: &Path) -> Result<Option<Self>> {
        let Ok(relative) = path.strip_prefix(store_root) else {
            return Ok(None);
        };
        let root = rustix::fs::openat2(
            private,
            relative,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            beneath(),
        )
        .map_err(|e| Error::sys(format!("opening {} privately", path.display()), e))?;
        let seen = rustix::fs::fstat(&root).map_err(|e| Error::sys("fstat", e))?;
        let named = rustix::fs::stat(path)
            .map_err(|e| Error::sys(format!("stat {}", path.display()), e))?;
        if (seen.st_dev, seen.st_ino) != (named.st_dev, named.st_ino) {
            return Ok(None);
        }
        Ok(Some(LayerTree {
            root,
            path: path.to_path_buf(),
        }))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The absolute path of an entry (for messages and for marks).
    pub fn path_of(&self, relative: &[u8]) -> PathBuf {
        if relative.is_empty() {
            self.path.clone()
        } else {
            self.path.join(std::ffi::OsStr::from_bytes(relative))
        }
    }

    /// The open root directory.
    pub fn root_fd(&self) -> &OwnedFd {
        &self.root
    }

    /// Opens the parent directory of `relative` beneath the root; returns it and the last name.
    pub fn parent<'a>(&self, relative: &'a [u8]) -> Result<(OwnedFd, &'a [u8])> {
        let (parent, name) = split_parent(relative);
        Ok((self.open_dir(parent)?, name))
    }

    /// [`parent`](Self::parent), opened again only when it is not the one `last` holds.
    pub fn parent_after<'c, 'a>(
        &self,
        relative: &'a [u8],
        last: &'c mut LastParent,
    ) -> Result<(&'c OwnedFd, &'a [u8])> {
        let (parent, name) = split_parent(relative);
        let dir = match last.dir.take() {
            Some(dir) if last.path == parent => last.dir.insert(dir),
            _ => {
                let dir = self.open_dir(parent)?;
                last.path.clear();
                last.path.extend_from_slice(parent);
                last.dir.insert(dir)
            }
        };
        Ok((dir, name))
    }

    /// Opens the directory `relative` beneath the root (the root itself when empty).
    fn open_dir(&self, relative: &[u8]) -> Result<OwnedFd> {
        if relative.is_empty() {
            return rustix::io::dup(&self.root).map_err(|e| Error::sys("dup", e));
        }
        rustix::fs::openat2(
            &self.root,
            std::ffi::OsStr::from_bytes(relative),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            beneath(),
        )
        .map_err(|e| Error::sys(format!("opening {}", self.path_of(relative).display()), e))
    }

    /// Opens an entry beneath the root (never through a symlink).
    pub fn open_entry(&self, relative: &[u8], flags: OFlags) -> Result<OwnedFd> {
        let path = if relative.is_empty() {
            &b"."[..]
        } else {
            relative
        };
        rustix::fs::openat2(
            &self.root,
            std::ffi::OsStr::from_bytes(path),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            beneath(),
        )
        .map_err(|e| Error::sys(format!("opening {}", self.path_of(relative).display()), e))
    }

    /// Creates the placeholder for `entry`: everything but a regular file's data. Times of
    /// directories are set later ([`set_dir_times`](Self::set_dir_times)), since creating their
    /// children changes them.
    pub fn create(&self, entry: &Entry) -> Result<()> {
        self.create_after(entry, &mut LastParent::default())
    }

    /// [`create`](Self::create), in the parent `last` holds open when it is the same.
    fn create_after(&self, entry: &Entry, last: &mut LastParent) -> Result<()> {
        let shown = || self.path_of(&entry.path).display().to_string();
        let sys = |what: &str, e: rustix::io::Errno| Error::sys(format!("{what} {}", shown()), e);
        if entry.path.is_empty() {
            // The layer root itself.
            return self.apply_metadata(&self.root, entry, true);
        }
        let (dir, name) = self.parent_after(&entry.path, last)?;
        let name = std::ffi::OsStr::from_bytes(name);
        match entry.kind {
            EntryKind::Dir => {
                match rustix::fs::mkdirat(dir, name, created_mode(entry)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(sys("creating directory", e)),
                }
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| sys("opening directory", e))?;
                if entry.opaque {
                    rustix::fs::fsetxattr(&fd, OPAQUE_XATTR, b"y", XattrFlags::empty())
                        .map_err(|e| sys("marking opaque", e))?;
                }
                self.apply_metadata(&fd, entry, false)
            }
            EntryKind::File => {
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    created_mode(entry),
                )
                .map_err(|e| sys("creating file", e))?;
                if entry.size > 0 {
                    rustix::fs::ftruncate(&fd, entry.size).map_err(|e| sys("sizing", e))?;
                }
                self.apply_metadata(&fd, entry, true)
            }
            EntryKind::Symlink => {
                let target = std::ffi::OsStr::from_bytes(entry.link.as_deref().unwrap_or_default());
                rustix::fs::symlinkat(target, dir, name).map_err(|e| sys("creating symlink", e))?;
                self.apply_metadata_at(dir, name, entry, false)
            }
            EntryKind::Hardlink => {
                let target = entry.link.as_deref().unwrap_or_default();
                let (target_dir, target_name) = self.parent(target)?;
                rustix::fs::linkat(
                    &target_dir,
                    std::ffi::OsStr::from_bytes(target_name),
                    dir,
                    name,
                    AtFlags::empty(),
                )
                .map_err(|e| sys("creating hardlink", e))
            }
            EntryKind::CharDevice
            | EntryKind::BlockDevice
            | EntryKind::Fifo
            | EntryKind::Whiteout => {
                let (kind, device) = match entry.kind {
                    EntryKind::CharDevice => {
                        (FileType::CharacterDevice, entry.device.unwrap_or((0, 0)))
                    }
                    EntryKind::BlockDevice => {
                        (FileType::BlockDevice, entry.device.unwrap_or((0, 0)))
                    }
                    EntryKind::Fifo => (FileType::Fifo, (0, 0)),
                    // overlayfs whiteout: a character device 0:0.
                    _ => (FileType::CharacterDevice, (0, 0)),
                };
                rustix::fs::mknodat(
                    dir,
                    name,
                    kind,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(device.0, device.1),
                )
                .map_err(|e| sys("creating node", e))?;
                self.apply_metadata_at(dir, name, entry, true)
            }
        }
    }

    /// Creates the placeholders of all `entries` ([`create`](Self::create)), several at a time:
    /// directories level by level (parents first, whatever the order of the table), then
    /// everything else but hard links, then hard links (their targets exist by then). On a
    /// busy filesystem each creation waits on the disk, and waits overlap.
    pub fn create_all(&self, entries: &[Entry]) -> Result<()> {
        let mut dirs: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .collect();
        dirs.sort_by_key(|e| depth(&e.path));
        for level in dirs.chunk_by(|a, b| depth(&a.path) == depth(&b.path)) {
            self.create_concurrently(level)?;
        }
        let (links, others): (Vec<&Entry>, Vec<&Entry>) = entries
            .iter()
            .filter(|e| e.kind != EntryKind::Dir)
            .partition(|e| e.kind == EntryKind::Hardlink);
        self.create_concurrently(&others)?;
        self.create_concurrently(&links)
    }

    /// [`create`](Self::create) for each of `entries`, on up to [`CREATE_THREADS`] threads.
    fn create_concurrently(&self, entries: &[&Entry]) -> Result<()> {
        if entries.len() < 2 * CREATE_THREADS {
            let mut last = LastParent::default();
            return entries
                .iter()
                .try_for_each(|e| self.create_after(e, &mut last));
        }
        let chunk = entries.len().div_ceil(CREATE_THREADS);
        std::thread::scope(|scope| {
            let workers: Vec<_> = entries
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        let mut last = LastParent::default();
                        part.iter()
                            .try_for_each(|e| self.create_after(e, &mut last))
                    })
                })
                .collect();
            // The scope joins every thread before it returns, also after an early error.
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("placeholder thread"))
        })
    }

    /// Metadata of a symlink or node, by name in its directory, never following the name:
    /// owner, mode (not for symlinks), xattrs, times.
    fn apply_metadata_at(
        &self,
        dir: &OwnedFd,
        name: &std::ffi::OsStr,
        entry: &Entry,
        chmod: bool,
    ) -> Result<()> {
        let sys = |what: &str, e: rustix::io::Errno| {
            Error::sys(format!("{what} {}", self.path_of(&entry.path).display()), e)
        };
        let made =
            rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| sys("stat", e))?;
        let chowned = !owned_as(&made, entry);
        if chowned {
            rustix::fs::chownat(
                dir,
                name,
                Some(uid(entry.uid)),
                Some(gid(entry.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| sys("chown", e))?;
        }
        if chmod && (chowned || (made.st_mode & 0o7777) != entry.mode & 0o7777) {
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(entry.mode), AtFlags::empty())
                .map_err(|e| sys("chmod", e))?;
        }
        for (key, value) in &entry.xattrs {
            rustix::fs::lsetxattr(
                proc_path(dir, name),
                std::ffi::OsStr::from_bytes(key),
                value,
                XattrFlags::empty(),
            )
            .map_err(|e| sys("setting an xattr on", e))?;
        }
        rustix::fs::utimensat(dir, name, &times(entry), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| sys("setting times of", e))
    }

    /// Owner, then mode (chown clears setuid), then xattrs, then (for files) times. A data
    /// write clears `security.capability`; [`finish_file`](Self::finish_file) sets it again.
    fn apply_metadata(&self, fd: &OwnedFd, entry: &Entry, set_times: bool) -> Result<()> {
        let shown = || self.path_of(&entry.path).display().to_string();
        // A new placeholder mostly has its owner already (root's, or a setgid parent's group):
        // each change it skips is one metadata update fewer.
        let made = rustix::fs::fstat(fd).map_err(|e| Error::sys(format!("stat {}", shown()), e))?;
        let chowned = !owned_as(&made, entry);
        if chowned {
            rustix::fs::fchown(fd, Some(uid(entry.uid)), Some(gid(entry.gid)))
                .map_err(|e| Error::sys(format!("chown {}", shown()), e))?;
        }
        // chown clears setuid and setgid: the mode goes on after it.
        if chowned || (made.st_mode & 0o7777) != entry.mode & 0o7777 {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(entry.mode))
                .map_err(|e| Error::sys(format!("chmod {}", shown()), e))?;
        }
        for (key, value) in &entry.xattrs {
            rustix::fs::fsetxattr(
                fd,
                std::ffi::OsStr::from_bytes(key),
                value,
                XattrFlags::empty(),
            )
            .map_err(|e| {
                Error::sys(
                    format!(
                        "setting xattr {} on {}",
                        String::from_utf8_lossy(key),
                        shown()
                    ),
                    e,
                )
            })?;
        }
        if set_times {
            rustix::fs::futimens(fd, &times(entry))
                .map_err(|e| Error::sys(format!("setting times of {}", shown()), e))?;
        }
        Ok(())
    }

    /// Sets the times of directories, deepest first, once their contents exist.
    pub fn set_dir_times<'a>(
        &self,
        entries: impl DoubleEndedIterator<Item = &'a Entry>,
    ) -> Result<()> {
        for entry in entries.rev().filter(|e| e.kind == EntryKind::Dir) {
            let fd = self.open_entry(&entry.path, OFlags::RDONLY | OFlags::DIRECTORY)?;
            rustix::fs::futimens(&fd, &times(entry)).map_err(|e| {
                Error::sys(
                    format!("setting times of {}", self.path_of(&entry.path).display()),
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Opens a regular file's placeholder for writing its data.
    pub fn open_for_data(&self, entry: &Entry) -> Result<File> {
        let fd = self.open_entry(&entry.path, OFlags::WRONLY)?;
        Ok(File::from(fd))
    }

    /// After a file's data is written: its times and capabilities again (writes change both).
    pub fn finish_file(&self, file: &File, entry: &Entry) -> Result<()> {
        let shown = || self.path_of(&entry.path).display().to_string();
        if let Some((_, value)) = entry.xattrs.iter().find(|(k, _)| k == CAPABILITY_XATTR) {
            rustix::fs::fsetxattr(file, "security.capability", value, XattrFlags::empty())
                .map_err(|e| Error::sys(format!("setting capabilities of {}", shown()), e))?;
        }
        rustix::fs::futimens(file, &times(entry))
            .map_err(|e| Error::sys(format!("setting times of {}", shown()), e))
    }

    /// Writes `data` at `offset` of an open placeholder.
    pub fn write_at(&self, file: &File, entry: &Entry, offset: u64, data: &[u8]) -> Result<()> {
        file.write_all_at(data, offset).map_err(|e| {
            Error::io(
                format!("writing {}", self.path_of(&entry.path).display()),
                e,
            )
        })
    }

    /// Flushes everything written in the layer's filesystem to disk.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(&self.root)
            .map_err(|e| Error::sys(format!("syncfs {}", self.path.display()), e))
    }

    /// The `(device, inode)` of an entry, as fanotify events and overlay report it.
    pub fn inode(&self, relative: &[u8]) -> Result<(u64, u64)> {
        self.inode_after(relative, &mut LastParent::default())
    }

    /// [`inode`](Self::inode), through the parent `last` holds open when it is the same.
    pub fn inode_after(&self, relative: &[u8], last: &mut LastParent) -> Result<(u64, u64)> {
        let (dir, name) = self.parent_after(relative, last)?;
        let stat = rustix::fs::statat(
            dir,
            std::ffi::OsStr::from_bytes(name),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::sys(format!("stat {}", self.path_of(relative).display()), e))?;
        Ok((stat.st_dev, stat.st_ino))
    }
}

/// `/proc/self/fd/DIR/NAME`: names `name` in the already-opened `dir` for calls that take a
/// path and must not follow a final symlink (the `l*xattr` family).
fn proc_path(dir: &impl AsFd, name: &std::ffi::OsStr) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd())).join(name)
}

/// The mode a placeholder is created with: its permissions, never more (the umask may take
/// some away; setuid, setgid and sticky bits come with the final chmod).
fn created_mode(entry: &Entry) -> Mode {
    Mode::from_raw_mode(entry.mode & 0o777)
}

/// Whether the inode `made` is owned as `entry` says.
fn owned_as(made: &rustix::fs::Stat, entry: &Entry) -> bool {
    u64::from(made.st_uid) == entry.uid && u64::from(made.st_gid) == entry.gid
}

fn uid(id: u64) -> Uid {
    Uid::from_raw(id as u32)
}

fn gid(id: u64) -> Gid {
    Gid::from_raw(id as u32)
}

fn times(entry: &Entry) -> Timestamps {
    let time = Timespec {
        tv_sec: entry.mtime,
        tv_nsec: i64::from(entry.mtime_nsec) as _,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn entry(path: &str, kind: EntryKind, mode: u32, uid: u64, gid: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid,
            gid,
            mtime: 1_000_000_000,
            mtime_nsec: 5,
            size: if kind == EntryKind::File { 3 } else { 0 },
            link: (kind == EntryKind::Symlink).then(|| b"target".to_vec()),
            device: None,
            xattrs: Vec::new(),
            data_offset: 0,
            sparse: None,
            digest: None,
            opaque: false,
            implied: false,
        }
    }

    /// Placeholders skip the owner and mode changes they do not need, and still end with what
    /// the index says: in a setgid directory (whose group new entries inherit), with setuid
    /// bits that a chown would clear, under a umask that takes bits away.
    #[test]
    fn placeholders_get_the_owner_and_mode_of_their_entry_whatever_they_inherit() {
        if !lazylayer_testkit::require_root(
            "placeholders_get_the_owner_and_mode_of_their_entry_whatever_they_inherit",
        ) {
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let tree = LayerTree::open(&scratch.path().join("fs")).unwrap();
        let entries = [
            entry("", EntryKind::Dir, 0o755, 0, 0),
            entry("shared", EntryKind::Dir, 0o2775, 0, 50),
            entry("shared/root-owned", EntryKind::File, 0o644, 0, 0),
            entry("shared/group-owned", EntryKind::File, 0o664, 0, 50),
            entry("shared/sub", EntryKind::Dir, 0o755, 0, 0),
            entry("shared/link", EntryKind::Symlink, 0o777, 0, 0),
            entry("shared/their-link", EntryKind::Symlink, 0o777, 1000, 1000),
            entry("suid", EntryKind::File, 0o4755, 1000, 1000),
            entry("private", EntryKind::File, 0o600, 0, 0),
            entry("open", EntryKind::File, 0o666, 0, 0),
            entry("empty", EntryKind::Dir, 0o555, 7, 8),
        ];
        tree.create_all(&entries).unwrap();
        for e in &entries {
            let meta = std::fs::symlink_metadata(tree.path_of(&e.path)).unwrap();
            let shown = e.display_path();
            assert_eq!(
                (u64::from(meta.uid()), u64::from(meta.gid())),
                (e.uid, e.gid),
                "owner of {shown}"
            );
            if e.kind != EntryKind::Symlink {
                assert_eq!(meta.mode() & 0o7777, e.mode, "mode of {shown}");
            }
            if e.kind == EntryKind::File {
                assert_eq!(meta.len(), e.size, "size of {shown}");
                assert_eq!(
                    (meta.mtime(), meta.mtime_nsec()),
                    (e.mtime, 5),
                    "time of {shown}"
                );
            }
        }
    }
}
