//! gzip layers are hostile: indexing any bytes as a gzip layer (zran checkpoints, members,
//! padding) must give a valid index or an error, never a panic.
#![no_main]

use lazylayer_index::{BuildOptions, build_from_reader};
use lazylayer_source::{BlobDescriptor, Digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layer = BlobDescriptor {
        digest: Digest::sha256(data),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".to_string(),
        size: data.len() as u64,
    };
    let _ = build_from_reader(std::io::Cursor::new(data.to_vec()), &layer, None, BuildOptions { spacing: 64 << 10, continuation: 16 << 10 });
});
