//! The names containers/storage looks up in an additional layer store:
//! `<base64 of the image reference>/<layer digest>/{diff,info,blob,use}`.
//!
//! containers/storage (overlay driver, `getAdditionalLayerPath`) encodes the reference with
//! standard base64, padding included, and names the layer by its compressed digest
//! (`sha256:<hex>`). Only registry references are accepted: a name that decodes to a local
//! layout (`oci:DIR`) or to anything else is not a layer this store serves.

use base64::Engine as _;
use lazylayer_source::{Digest, ImageReference};

/// The layer's tree (a symlink to the layer directory).
pub const DIFF: &str = "diff";
/// The layer record containers/storage reads (JSON).
pub const INFO: &str = "info";
/// The compressed layer blob.
pub const BLOB: &str = "blob";
/// Created by containers/storage to say it uses the layer (answered with ENOENT).
pub const USE: &str = "use";

/// The image reference a first-level name stands for (as containers/storage wrote it,
/// normalised), or `None` if the name is not one.
pub fn decode_reference(name: &[u8]) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(name)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    match text.parse::<ImageReference>().ok()? {
        ImageReference::Registry(reference) => Some(reference.to_string()),
        ImageReference::Layout(_) => None,
    }
}

/// The first-level name of an image reference (what containers/storage looks up).
pub fn encode_reference(reference: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(reference)
}

/// The layer digest a second-level name stands for, or `None` if the name is not one.
pub fn decode_digest(name: &[u8]) -> Option<Digest> {
    std::str::from_utf8(name).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_as_containers_storage_encodes_them() {
        // What Go's base64.StdEncoding gives for this reference (padding included).
        let name = "MTI3LjAuMC4xOjUwMDAvdGVzdC9kZWJpYW46Ym9va3dvcm0=";
        assert_eq!(
            decode_reference(name.as_bytes()).as_deref(),
            Some("127.0.0.1:5000/test/debian:bookworm")
        );
        assert_eq!(
            encode_reference("127.0.0.1:5000/test/debian:bookworm"),
            name
        );
        let hub = encode_reference("docker.io/library/alpine:latest");
        assert_eq!(
            decode_reference(hub.as_bytes()).as_deref(),
            Some("docker.io/library/alpine:latest")
        );
    }

    #[test]
    fn other_names_are_not_references() {
        for name in [
            "not base64!",
            "MTI3LjAuMC4xOjUwMDAvdGVzdC9kZWJpYW46Ym9va3dvcm0", // padding missing
            &encode_reference("oci:/var/lib/images:latest"),
            &encode_reference("UPPER/Case:tag"),
            &encode_reference(""),
        ] {
            assert_eq!(decode_reference(name.as_bytes()), None, "{name}");
        }
    }

    #[test]
    fn digests_are_full_digest_strings() {
        let hex = "a".repeat(64);
        assert_eq!(
            decode_digest(format!("sha256:{hex}").as_bytes()).map(|d| d.to_string()),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(decode_digest(hex.as_bytes()), None);
        assert_eq!(decode_digest(b"sha256:xyz"), None);
    }
}
