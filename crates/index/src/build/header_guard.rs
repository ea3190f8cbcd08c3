//! A cap on the tar headers that the `tar` crate reads whole into memory.
//!
//! A PAX extended header (`x`) or a GNU long name or link (`L`, `K`) is read into memory in one
//! piece before the entry it describes, whatever size its header claims: a gigabyte of
//! compressed zeros in one PAX header would take a gigabyte of memory. This reader sits under
//! the tar walker, follows the stream's headers exactly as the `tar` crate (0.4) does —
//! including the size a PAX `size=` record gives the next entry — and fails the read with a
//! clear error when such a header is larger than lazylayer accepts. No crate offers this.

use std::io::{self, Read};

/// The largest PAX extended header accepted (path, link, times, ids and xattrs of one entry).
pub const MAX_PAX_HEADER: u64 = 16 << 20;
/// The largest GNU long name or long link accepted (paths are far shorter than this).
pub const MAX_LONG_NAME: u64 = 1 << 20;

const BLOCK: u64 = 512;

/// Passes a tar stream through, failing it at an oversized extension header.
pub struct HeaderGuard<R> {
    inner: R,
    /// Stream offset of the next byte `inner` returns.
    pos: u64,
    /// Where the next header starts.
    next_header: u64,
    header: Vec<u8>,
    /// The PAX header being read: its bytes so far, and how many it has.
    pax: Option<(Vec<u8>, u64)>,
    /// The last complete PAX header, which applies to the next entry.
    pending_pax: Option<Vec<u8>>,
    /// Past the end of the archive, or past something the walker refuses anyway.
    done: bool,
    failed: Option<String>,
}

impl<R: Read> HeaderGuard<R> {
    /// Guards the tar stream `inner`, which starts at a header.
    pub fn new(inner: R) -> Self {
        HeaderGuard {
            inner,
            pos: 0,
            next_header: 0,
            header: Vec::with_capacity(BLOCK as usize),
            pax: None,
            pending_pax: None,
            done: false,
            failed: None,
        }
    }

    /// The wrapped reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn observe(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut i = 0usize;
        while i < bytes.len() && !self.done {
            let at = self.pos + i as u64;
            if at < self.next_header {
                let take = (self.next_header - at).min((bytes.len() - i) as u64) as usize;
                if let Some((data, size)) = &mut self.pax {
                    let wanted = (*size - data.len() as u64).min(take as u64) as usize;
                    data.extend_from_slice(&bytes[i..i + wanted]);
                    if data.len() as u64 == *size {
                        self.pending_pax = self.pax.take().map(|(data, _)| data);
                    }
                }
                i += take;
                continue;
            }
            let take = (BLOCK as usize - self.header.len()).min(bytes.len() - i);
            self.header.extend_from_slice(&bytes[i..i + take]);
            i += take;
            if self.header.len() == BLOCK as usize {
                let end = self.pos + i as u64;
                self.on_header(end)?;
                self.header.clear();
            }
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// A whole header has passed, ending at stream offset `end`.
    fn on_header(&mut self, end: u64) -> Result<(), String> {
        if self.header.iter().all(|&b| b == 0) {
            // The end of the archive (what follows is padding).
            self.done = true;
            return Ok(());
        }
        let block: [u8; BLOCK as usize] = self.header[..].try_into().expect("a full block");
        let header = tar::Header::from_byte_slice(&block);
        let kind = block[156];
        let is_extension = matches!(kind, b'L' | b'K' | b'x' | b'g');
        let recognised = header.as_ustar().is_some() || header.as_gnu().is_some();
        let mut size = match header.entry_size() {
            Ok(size) => size,
            // The walker reports a broken header itself.
            Err(_) => {
                self.done = true;
                return Ok(());
            }
        };
        if !is_extension
            && let Some(pax) = self.pending_pax.take()
            && let Some(pax_size) = pax_size(&pax)
        {
            size = pax_size;
        }
        if recognised {
            let limit = match kind {
                b'x' => Some((MAX_PAX_HEADER, "a PAX extended header")),
                b'L' => Some((MAX_LONG_NAME, "a GNU long name")),
                b'K' => Some((MAX_LONG_NAME, "a GNU long link name")),
                _ => None,
            };
            if let Some((limit, what)) = limit
                && size > limit
            {
                return Err(format!(
                    "{what} of {size} bytes at offset {} (lazylayer accepts up to {limit})",
                    end - BLOCK
                ));
            }
            if kind == b'x' {
                self.pax = Some((Vec::new(), size));
                if size == 0 {
                    self.pending_pax = self.pax.take().map(|(data, _)| data);
                }
            }
            if kind == b'S' {
                // Old GNU sparse entries carry more headers; the walker refuses them anyway.
                self.done = true;
                return Ok(());
            }
        }
        self.next_header = size
            .checked_add(BLOCK - 1)
            .map(|s| s & !(BLOCK - 1))
            .and_then(|s| end.checked_add(s))
            .ok_or_else(|| "a tar entry size overflows".to_string())?;
        Ok(())
    }
}

/// The `size` record of a PAX header, as the `tar` crate reads it (none if a record is bad).
fn pax_size(pax: &[u8]) -> Option<u64> {
    for extension in tar::PaxExtensions::new(pax) {
        let extension = extension.ok()?;
        if extension.key() == Ok("size") {
            return extension.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(reason) = &self.failed {
            return Err(io::Error::other(reason.clone()));
        }
        let n = self.inner.read(out)?;
        if let Err(reason) = self.observe(&out[..n]) {
            self.failed = Some(reason.clone());
            return Err(io::Error::other(reason));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(tar: &[u8], chunk: usize) -> Result<Vec<(String, u64)>, String> {
        struct Chunked<'a>(&'a [u8], usize);
        impl Read for Chunked<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(out.len()).min(self.1);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut archive = tar::Archive::new(HeaderGuard::new(Chunked(tar, chunk)));
        let mut seen = Vec::new();
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            seen.push((
                String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                entry.size(),
            ));
        }
        Ok(seen)
    }

    fn append(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, data).unwrap();
    }

    #[test]
    fn ordinary_archives_pass_unchanged_in_any_chunking() {
        let mut builder = tar::Builder::new(Vec::new());
        append(&mut builder, "short", b"hello");
        let long = "d/".repeat(120) + "file";
        append(&mut builder, &long, &[7u8; 3000]);
        builder
            .append_pax_extensions([("SCHILY.xattr.user.x", b"v".as_slice())])
            .unwrap();
        append(&mut builder, "with-xattr", b"");
        let tar = builder.into_inner().unwrap();
        for chunk in [1, 7, 512, 513, 1 << 20] {
            assert_eq!(
                walk(&tar, chunk).unwrap(),
                [
                    ("short".to_string(), 5),
                    (long.clone(), 3000),
                    ("with-xattr".to_string(), 0)
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_pax_size_record_is_followed() {
        // `big`'s ustar size says 0 and its PAX record says 1000: its data (1000 bytes of 1s)
        // is followed by an oversized GNU long name, which only a guard that moved 1000 bytes
        // on from `big` finds (one that believed the 0 would parse the 1s as a header).
        let record = b"13 size=1000\n";
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::new(b'x'));
        header.set_path("PaxHeader").unwrap();
        header.set_size(record.len() as u64);
        header.set_cksum();
        let mut tar = header.as_bytes().to_vec();
        tar.extend_from_slice(record);
        tar.resize(1024, 0);
        let mut header = tar::Header::new_ustar();
        header.set_size(0);
        header.set_path("big").unwrap();
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        tar.extend_from_slice(&[1u8; 1024]);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::new(b'L'));
        header.set_size(2 << 20);
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        tar.resize(tar.len() + (2 << 20) + 2048, b'p');
        let error = walk(&tar, 4096).unwrap_err();
        assert!(
            error.contains("a GNU long name of 2097152 bytes"),
            "{error}"
        );
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_they_are_read() {
        for (kind, limit) in [(b'x', MAX_PAX_HEADER), (b'L', MAX_LONG_NAME)] {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::new(kind));
            header.set_size(1 << 30);
            header.set_cksum();
            let mut tar = header.as_bytes().to_vec();
            tar.resize(tar.len() + (limit as usize + 4096), 0);
            let error = walk(&tar, 1 << 16).unwrap_err();
            assert!(error.contains("1073741824 bytes"), "{error}");
            assert!(error.contains("accepts up to"), "{error}");
        }
    }
}
