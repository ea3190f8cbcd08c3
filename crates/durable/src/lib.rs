//! # lazylayer-durable: records written whole or not at all
//!
//! Every record lazylayer keeps under `--root` (layer records, indexes, image records,
//! profiles) is replaced the same way, so that a crash, a full disk or a second process
//! writing the same record at the same moment never leaves a torn or half-written file: the
//! bytes go to a temporary file with a unique name in the target's directory, are synced,
//! the file is renamed over the target, and the directory is synced so that the rename
//! itself survives a crash. Concurrent writers of one record each rename a whole file of their
//! own; the last rename wins.
//!
//! Files are created with an explicit mode, never the caller's umask: the store is shared
//! state, and what it holds (file lists, image configs) is not for every local user.
#![forbid(unsafe_code)]

use std::fs::{File, Permissions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The mode of records lazylayer writes: readable and writable by their owner (root) only.
pub const RECORD_MODE: u32 = 0o600;

/// Replaces `path` with `bytes` (see the crate docs), as a file of mode [`RECORD_MODE`].
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |out| out.write_all(bytes))
}

/// Replaces `path` with `bytes` followed by a hole up to `len` bytes (see [`write`]): a file
/// whose end is filled in later, in place (an index whose windows are fetched on demand).
pub fn write_sized(path: &Path, bytes: &[u8], len: u64) -> std::io::Result<()> {
    replace(path, |out| out.write_all(bytes), Some(len))
}

/// Replaces `path` with what `fill` writes (see the crate docs), as a file of mode
/// [`RECORD_MODE`]. If `fill` fails, `path` is left as it was and the temporary file is gone.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    replace(path, fill, None)
}

/// [`write_with`], the file then extended to `len` bytes if that is longer.
fn replace(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    len: Option<u64>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| std::ffi::OsString::from("record"), |n| n.to_os_string());
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(&name);
    prefix.push(".");
    let temporary = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(Permissions::from_mode(RECORD_MODE))
        .tempfile_in(dir)?;
    {
        let mut out = BufWriter::new(temporary.as_file());
        fill(&mut out)?;
        out.flush()?;
    }
    if let Some(len) = len
        && len > temporary.as_file().metadata()?.len()
    {
        temporary.as_file().set_len(len)?;
    }
    // An explicit mode, whatever the umask did to the one asked for at creation.
    temporary
        .as_file()
        .set_permissions(Permissions::from_mode(RECORD_MODE))?;
    temporary.as_file().sync_all()?;
    temporary.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Whether `name` is a temporary file of [`write`] (left behind only by a crash: safe to
/// remove once no writer runs).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_record_is_replaced_whole_with_the_record_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record");
        write(&path, b"first").unwrap();
        write(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o7777,
            RECORD_MODE
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_failed_fill_leaves_the_old_record_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record");
        write(&path, b"kept").unwrap();
        let failed = write_with(&path, |out| {
            out.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn concurrent_writers_of_one_record_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record");
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        write(&path, format!("writer {i}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("writer "), "{text}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temporary_names_are_recognised() {
        assert!(is_temporary(".abc.Xy12.tmp"));
        assert!(!is_temporary("abc"));
    }
}
