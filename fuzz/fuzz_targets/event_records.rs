//! What the daemon decodes from outside its own process: fanotify event buffers (as the kernel
//! writes them) and the messages the holder and worker exchange. Any bytes must decode to
//! messages or be refused, never panic; a decoded message survives encoding unchanged.
#![no_main]

use lazylayer_daemon::relay::{ToHolder, ToWorker, decode, receive, send};
use lazylayer_fanotify::group::decode_events;
use libfuzzer_sys::fuzz_target;

fn round_trips<M>(message: M)
where
    M: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut wire = Vec::new();
    send(&mut wire, &message).expect("encoding into memory");
    assert_eq!(receive::<M>(&mut wire.as_slice()).expect("decodes"), Some(message));
}

fuzz_target!(|data: &[u8]| {
    for record in decode_events(data) {
        if let Some((offset, count)) = record.range {
            let _ = offset.checked_add(count);
        }
    }
    if let Ok(message) = decode::<ToWorker>(data) {
        round_trips(message);
    }
    if let Ok(message) = decode::<ToHolder>(data) {
        round_trips(message);
    }
    let mut stream = data;
    while let Ok(Some(message)) = receive::<ToWorker>(&mut stream) {
        round_trips(message);
    }
    let mut stream = data;
    while let Ok(Some(message)) = receive::<ToHolder>(&mut stream) {
        round_trips(message);
    }
});
