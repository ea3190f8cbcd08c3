//! The messages the holder and the worker exchange over their socket pair: the holder relays
//! each permission event it read from the shared group and each FUSE open waiting for its
//! file, and answers the worker's requests (mount a layer with FUSE, report the FUSE
//! counters); the worker answers events and fill requests by id.
//!
//! On the wire each message is a little-endian `u32` length followed by that many bytes of
//! postcard-encoded message. Both ends are the same binary, but a record is still checked: a
//! malformed one ends the link instead of being guessed at.

use std::io::{Read, Write};

use lazylayer_fanotify::group::Answer;
use serde::{Deserialize, Serialize};

/// The longest message either end accepts (a list of mounted layers fits many times over).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The answer to an event or a fill request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The data is there: let the reader go on.
    Allow,
    /// The reader gets this errno.
    Deny(i32),
}

impl From<Verdict> for Answer {
    fn from(verdict: Verdict) -> Answer {
        match verdict {
            Verdict::Allow => Answer::Allow,
            Verdict::Deny(errno) => Answer::Deny(errno),
        }
    }
}

impl From<Answer> for Verdict {
    fn from(answer: Answer) -> Verdict {
        match answer {
            Answer::Allow => Verdict::Allow,
            Answer::Deny(errno) => Verdict::Deny(errno),
        }
    }
}

/// A fanotify permission event the holder keeps pending until the worker answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// What the holder sends the worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// A permission event read from the group: fill the file if it lacks data, then answer.
    Event(RelayedEvent),
    /// A FUSE open (served by the holder) waits for the regular file `inode` (device, inode
    /// of its placeholder in the layer directory): fill it, then answer.
    Fill {
        /// The holder's name for the request.
        id: u64,
        /// The placeholder's device and inode.
        inode: (u64, u64),
    },
    /// The answer to [`ToHolder::MountFuse`].
    FuseMounted {
        /// The request's id.
        request: u64,
        /// Why the layer could not be mounted, if it could not.
        error: Option<String>,
    },
    /// The answer to [`ToHolder::QueryFuse`].
    FuseState {
        /// The request's id.
        request: u64,
        /// READ requests that reached the holder's FUSE mounts (zero with passthrough).
        reads: u64,
        /// The layers (blob digests) the holder serves with FUSE.
        mounted: Vec<String>,
    },
}

/// What the worker sends the holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHolder {
    /// The answer to a [`ToWorker::Event`] or [`ToWorker::Fill`] with this id.
    Answer {
        /// The event's or request's id.
        id: u64,
        /// The answer.
        verdict: Verdict,
    },
    /// Serve the lazy layer `layer` (a blob digest) with FUSE now, and say when it is mounted.
    MountFuse {
        /// The request's id, repeated in the answer.
        request: u64,
        /// The layer's blob digest.
        layer: String,
    },
    /// Report the FUSE counters and mounts.
    QueryFuse {
        /// The request's id, repeated in the answer.
        request: u64,
    },
}

/// Writes one message.
pub fn send<M: Serialize>(to: &mut impl Write, message: &M) -> std::io::Result<()> {
    let body = postcard::to_stdvec(message).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    to.write_all(&frame)
}

/// Reads one message; `Ok(None)` at a clean end of the stream, an error for a message cut
/// short, too long or malformed.
pub fn receive<M: for<'de> Deserialize<'de>>(from: &mut impl Read) -> std::io::Result<Option<M>> {
    let mut length = [0u8; 4];
    if !read_exact_or_end(from, &mut length)? {
        return Ok(None);
    }
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_MESSAGE {
        return Err(malformed(format!("a relayed message of {length} bytes")));
    }
    let mut body = vec![0u8; length];
    if !read_exact_or_end(from, &mut body)? && length > 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    decode(&body).map(Some)
}

/// The message `body` encodes (no length prefix); an error for anything else, trailing bytes
/// included.
pub fn decode<M: for<'de> Deserialize<'de>>(body: &[u8]) -> std::io::Result<M> {
    match postcard::take_from_bytes::<M>(body) {
        Ok((message, [])) => Ok(message),
        Ok(_) => Err(malformed("trailing bytes after a relayed message".into())),
        Err(e) => Err(malformed(format!("a malformed relayed message: {e}"))),
    }
}

fn malformed(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Fills `buffer`; false at a clean end of stream before its first byte, an error for one
/// cut short.
fn read_exact_or_end(from: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buffer.len() {
        match from.read(&mut buffer[filled..]) {
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

    fn round_trip<M>(message: M)
    where
        M: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let mut wire = Vec::new();
        send(&mut wire, &message).unwrap();
        let mut reader = wire.as_slice();
        assert_eq!(receive::<M>(&mut reader).unwrap(), Some(message));
        assert_eq!(
            receive::<M>(&mut reader).unwrap(),
            None,
            "one message, then the end"
        );
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(ToWorker::Event(RelayedEvent {
            id: u64::MAX,
            mask: lazylayer_fanotify::group::FAN_PRE_ACCESS,
            pid: -1,
            fd: i32::MAX,
            inode: (u64::MAX, 0),
            range: Some((4096, 65536)),
        }));
        round_trip(ToWorker::Fill {
            id: 7,
            inode: (2049, 99),
        });
        round_trip(ToWorker::FuseMounted {
            request: 1,
            error: Some("no index".into()),
        });
        round_trip(ToWorker::FuseState {
            request: 2,
            reads: 5,
            mounted: vec!["sha256:ab".into()],
        });
        round_trip(ToHolder::Answer {
            id: 3,
            verdict: Verdict::Deny(libc::EIO),
        });
        round_trip(ToHolder::MountFuse {
            request: 4,
            layer: "sha256:cd".into(),
        });
        round_trip(ToHolder::QueryFuse { request: 5 });
    }

    #[test]
    fn cut_short_oversized_and_garbage_messages_are_refused() {
        let mut wire = Vec::new();
        send(&mut wire, &ToHolder::QueryFuse { request: 9 }).unwrap();
        let short = &wire[..wire.len() - 1];
        assert!(receive::<ToHolder>(&mut &short[..]).is_err());
        assert!(receive::<ToHolder>(&mut &wire[..2]).is_err());
        let huge = (MAX_MESSAGE as u32 + 1).to_le_bytes();
        assert!(receive::<ToHolder>(&mut &huge[..]).is_err());
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(receive::<ToWorker>(&mut &garbage[..]).is_err());
        let mut trailing = postcard::to_stdvec(&ToHolder::QueryFuse { request: 1 }).unwrap();
        trailing.push(0);
        assert!(decode::<ToHolder>(&trailing).is_err());
        assert_eq!(receive::<ToWorker>(&mut &[][..]).unwrap(), None);
    }

    #[test]
    fn the_fuzz_seed_holds_messages_of_the_current_format() {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/event_records/seed-relay-messages");
        let bytes = std::fs::read(&seed).unwrap();
        let mut stream = bytes.as_slice();
        assert_eq!(
            receive::<ToWorker>(&mut stream).unwrap(),
            Some(ToWorker::Fill {
                id: 7,
                inode: (2049, 99)
            })
        );
        assert_eq!(
            receive::<ToHolder>(&mut stream).unwrap(),
            Some(ToHolder::Answer {
                id: 3,
                verdict: Verdict::Deny(5)
            })
        );
        assert!(stream.is_empty());
    }
}
