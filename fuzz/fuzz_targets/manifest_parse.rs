//! Manifests are hostile: parsing any bytes served as any manifest type must give a manifest
//! or an error, never a panic.
#![no_main]

use bytes_free::fetched;
use lazylayer_source::manifest::{media_type, parse_manifest};
use libfuzzer_sys::fuzz_target;

mod bytes_free {
    use lazylayer_source::Digest;
    use lazylayer_source::manifest::FetchedManifest;

    pub fn fetched(data: &[u8], media_type: &str) -> FetchedManifest {
        FetchedManifest {
            bytes: data.to_vec().into(),
            media_type: media_type.to_string(),
            digest: Digest::sha256(data),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for kind in ["", media_type::OCI_MANIFEST, media_type::OCI_INDEX, media_type::DOCKER_MANIFEST, media_type::DOCKER_LIST] {
        let _ = parse_manifest("fuzz", &fetched(data, kind));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<lazylayer_source::ImageReference>();
        let _ = text.parse::<lazylayer_source::Platform>();
        let _ = text.parse::<lazylayer_source::Digest>();
    }
});
