//! The records the holder and the worker exchange over their socket pair: the holder relays
//! each permission event it read from the shared group (which file, who, what range) and the
//! worker answers it by id. Fixed-size, native-endian records: both ends are the same binary.

use std::io::{Read, Write};

use crate::group::Answer;

/// A permission event the holder keeps pending until the worker answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayedEvent {
    /// The holder's name for the event (unique for the holder's life).
    pub id: u64,
    /// Event bits.
    pub mask: u64,
    /// The process that caused the event.
    pub pid: i32,
    /// The event's fd number in the holder, by which the kernel matches an answer written to
    /// the group: a worker that outlives the holder answers the event with it.
    pub fd: i32,
    /// Device and inode of the file (the holder keeps the event's fd).
    pub inode: (u64, u64),
    /// For pre-access events: offset and length of the access.
    pub range: Option<(u64, u64)>,
}

/// The worker's answer to a relayed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayedAnswer {
    /// The event's id.
    pub id: u64,
    /// The answer.
    pub answer: Answer,
}

/// Bytes of an encoded [`RelayedEvent`].
pub const EVENT_RECORD: usize = 64;
/// Bytes of an encoded [`RelayedAnswer`].
pub const ANSWER_RECORD: usize = 16;

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(field)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(field)
}

impl RelayedEvent {
    /// The record on the wire.
    pub fn encode(&self) -> [u8; EVENT_RECORD] {
        let mut out = [0u8; EVENT_RECORD];
        out[0..8].copy_from_slice(&self.id.to_ne_bytes());
        out[8..16].copy_from_slice(&self.mask.to_ne_bytes());
        out[16..20].copy_from_slice(&self.pid.to_ne_bytes());
        out[20..24].copy_from_slice(&self.fd.to_ne_bytes());
        out[24..32].copy_from_slice(&self.inode.0.to_ne_bytes());
        out[32..40].copy_from_slice(&self.inode.1.to_ne_bytes());
        out[40..44].copy_from_slice(&u32::from(self.range.is_some()).to_ne_bytes());
        let (offset, count) = self.range.unwrap_or_default();
        out[48..56].copy_from_slice(&offset.to_ne_bytes());
        out[56..64].copy_from_slice(&count.to_ne_bytes());
        out
    }

    /// The event a record describes; `None` for a malformed record.
    pub fn decode(bytes: &[u8; EVENT_RECORD]) -> Option<RelayedEvent> {
        let has_range = match u32_at(bytes, 40) {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some(RelayedEvent {
            id: u64_at(bytes, 0),
            mask: u64_at(bytes, 8),
            pid: u32_at(bytes, 16) as i32,
            fd: u32_at(bytes, 20) as i32,
            inode: (u64_at(bytes, 24), u64_at(bytes, 32)),
            range: has_range.then(|| (u64_at(bytes, 48), u64_at(bytes, 56))),
        })
    }

    /// Writes the record.
    pub fn send(&self, to: &mut impl Write) -> std::io::Result<()> {
        to.write_all(&self.encode())
    }

    /// Reads one record; `Ok(None)` at the end of the stream.
    pub fn receive(from: &mut impl Read) -> std::io::Result<Option<RelayedEvent>> {
        let mut record = [0u8; EVENT_RECORD];
        if !read_record(from, &mut record)? {
            return Ok(None);
        }
        RelayedEvent::decode(&record)
            .map(Some)
            .ok_or_else(|| malformed("event"))
    }
}

impl RelayedAnswer {
    /// The record on the wire.
    pub fn encode(&self) -> [u8; ANSWER_RECORD] {
        let mut out = [0u8; ANSWER_RECORD];
        out[0..8].copy_from_slice(&self.id.to_ne_bytes());
        let (kind, errno) = match self.answer {
            Answer::Allow => (0u32, 0i32),
            Answer::Deny(errno) => (1, errno),
        };
        out[8..12].copy_from_slice(&kind.to_ne_bytes());
        out[12..16].copy_from_slice(&errno.to_ne_bytes());
        out
    }

    /// The answer a record describes; `None` for a malformed record.
    pub fn decode(bytes: &[u8; ANSWER_RECORD]) -> Option<RelayedAnswer> {
        let answer = match u32_at(bytes, 8) {
            0 => Answer::Allow,
            1 => Answer::Deny(u32_at(bytes, 12) as i32),
            _ => return None,
        };
        Some(RelayedAnswer {
            id: u64_at(bytes, 0),
            answer,
        })
    }

    /// Writes the record.
    pub fn send(&self, to: &mut impl Write) -> std::io::Result<()> {
        to.write_all(&self.encode())
    }

    /// Reads one record; `Ok(None)` at the end of the stream.
    pub fn receive(from: &mut impl Read) -> std::io::Result<Option<RelayedAnswer>> {
        let mut record = [0u8; ANSWER_RECORD];
        if !read_record(from, &mut record)? {
            return Ok(None);
        }
        RelayedAnswer::decode(&record)
            .map(Some)
            .ok_or_else(|| malformed("answer"))
    }
}

fn malformed(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("malformed relayed {what} record"),
    )
}

/// Fills `record`; false at a clean end of stream, an error for a record cut short.
fn read_record(from: &mut impl Read, record: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < record.len() {
        match from.read(&mut record[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        for event in [
            RelayedEvent {
                id: 7,
                mask: libc::FAN_OPEN_PERM,
                pid: 1234,
                fd: 17,
                inode: (2049, 99),
                range: None,
            },
            RelayedEvent {
                id: u64::MAX,
                mask: crate::group::FAN_PRE_ACCESS,
                pid: -1,
                fd: i32::MAX,
                inode: (u64::MAX, 0),
                range: Some((4096, 65536)),
            },
        ] {
            assert_eq!(RelayedEvent::decode(&event.encode()), Some(event));
            let mut wire = Vec::new();
            event.send(&mut wire).unwrap();
            assert_eq!(
                RelayedEvent::receive(&mut wire.as_slice()).unwrap(),
                Some(event)
            );
        }
        for answer in [Answer::Allow, Answer::Deny(libc::EIO)] {
            let record = RelayedAnswer { id: 3, answer };
            assert_eq!(RelayedAnswer::decode(&record.encode()), Some(record));
        }
        let mut bad = [0u8; EVENT_RECORD];
        bad[40] = 2;
        assert_eq!(RelayedEvent::decode(&bad), None);
        let mut bad = [0u8; ANSWER_RECORD];
        bad[8] = 9;
        assert_eq!(RelayedAnswer::decode(&bad), None);
        assert!(RelayedEvent::receive(&mut &[0u8; 10][..]).is_err());
        assert_eq!(RelayedEvent::receive(&mut &[][..]).unwrap(), None);
    }
}
