//! Index files from a registry are hostile: decoding any bytes must give an index that passed
//! validation or an error, never a panic or unbounded memory. A decoded index must also encode.
#![no_main]

use lazylayer_index::LayerIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = LayerIndex::decode("fuzz", data) {
        let encoded = index.encode().expect("a valid index encodes");
        LayerIndex::decode("fuzz again", &encoded).expect("and decodes again");
        for span in &index.spans {
            let _ = index.window(span);
        }
    }
});
