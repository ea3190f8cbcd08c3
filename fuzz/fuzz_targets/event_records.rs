//! What the daemon decodes from outside its own process: fanotify event buffers (as the kernel
//! writes them) and the records the holder and worker exchange. Any bytes must decode to
//! records or be refused, never panic; a decoded relay record survives encoding unchanged.
#![no_main]

use lazylayer_fanotify::group::decode_events;
use lazylayer_fanotify::relay::{ANSWER_RECORD, EVENT_RECORD, RelayedAnswer, RelayedEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for record in decode_events(data) {
        if let Some((offset, count)) = record.range {
            let _ = offset.checked_add(count);
        }
    }
    for chunk in data.chunks_exact(EVENT_RECORD) {
        let bytes: &[u8; EVENT_RECORD] = chunk.try_into().expect("exact chunk");
        if let Some(event) = RelayedEvent::decode(bytes) {
            assert_eq!(RelayedEvent::decode(&event.encode()), Some(event));
        }
    }
    for chunk in data.chunks_exact(ANSWER_RECORD) {
        let bytes: &[u8; ANSWER_RECORD] = chunk.try_into().expect("exact chunk");
        if let Some(answer) = RelayedAnswer::decode(bytes) {
            assert_eq!(RelayedAnswer::decode(&answer.encode()), Some(answer));
        }
    }
    let _ = RelayedEvent::receive(&mut &data[..]);
    let _ = RelayedAnswer::receive(&mut &data[..]);
});
