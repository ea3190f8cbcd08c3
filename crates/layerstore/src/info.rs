//! The `info` file: the `Layer` record containers/storage (1.43) decodes for a layer it takes
//! from an additional layer store. Every value comes from the layer's lazy index, whose
//! identity (blob digest and size) was checked when it was stored; the uncompressed digest
//! must also agree with the image config, so what podman records is what the config claims
//! and the verified index says alike.

use lazylayer_index::{Compression, IndexMeta};
use serde::Serialize;

/// containers/storage's `Layer` record, as far as it reads one from a store (its other fields
/// are its own).
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// The blob's digest (containers/storage indexes layers by it for reuse).
    #[serde(rename = "compressed-diff-digest")]
    pub compressed_digest: String,
    /// The blob's size.
    #[serde(rename = "compressed-size")]
    pub compressed_size: u64,
    /// The uncompressed tar's digest (the diff ID: podman derives the layer ID from it).
    #[serde(rename = "diff-digest")]
    pub diff_digest: String,
    /// The uncompressed tar's size (`podman save` writes exactly this many bytes).
    #[serde(rename = "diff-size")]
    pub diff_size: u64,
    /// How the blob is compressed, in containers/storage's numbering (0 none, 2 gzip, 4 zstd):
    /// push and save decompress the blob by it.
    pub compression: u8,
}

impl LayerInfo {
    /// The record of the layer `index` describes, whose diff ID the image config says is
    /// `config_diff_id`; refused if the index says otherwise.
    pub fn new(index: &IndexMeta, config_diff_id: &str) -> Result<LayerInfo, String> {
        if index.diff_id.to_string() != config_diff_id {
            return Err(format!(
                "the image config says layer {} uncompresses to {config_diff_id}, its index \
                 says {}",
                index.blob_digest, index.diff_id
            ));
        }
        Ok(LayerInfo {
            compressed_digest: index.blob_digest.to_string(),
            compressed_size: index.blob_size,
            diff_digest: index.diff_id.to_string(),
            diff_size: index.uncompressed_size,
            compression: match index.compression {
                Compression::None => 0,
                Compression::Gzip => 2,
                Compression::Zstd => 4,
            },
        })
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(self).expect("a layer record serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// The config's diff ID of layer `position` (from 0, bottom first) of an image config.
pub fn config_diff_id(config: &serde_json::Value, position: usize) -> Option<&str> {
    config["rootfs"]["diff_ids"].get(position)?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_source::Digest;

    fn index(compression: Compression) -> IndexMeta {
        IndexMeta {
            blob_digest: Digest::sha256(b"blob"),
            blob_size: 1234,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: Digest::sha256(b"tar"),
            compression,
            uncompressed_size: 10240,
            spacing: 1 << 20,
            spans: Vec::new(),
            entries: Vec::new(),
            continuation: 0,
            window_digests: Vec::new(),
        }
    }

    #[test]
    fn the_record_has_the_keys_and_numbers_containers_storage_reads() {
        let index = index(Compression::Gzip);
        let info = LayerInfo::new(&index, &index.diff_id.to_string()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&info.to_bytes()).unwrap();
        assert_eq!(
            json["compressed-diff-digest"],
            index.blob_digest.to_string()
        );
        assert_eq!(json["compressed-size"], 1234);
        assert_eq!(json["diff-digest"], index.diff_id.to_string());
        assert_eq!(json["diff-size"], 10240);
        assert_eq!(json["compression"], 2);
        assert_eq!(json.as_object().unwrap().len(), 5);
        let zstd = index_with(Compression::Zstd);
        assert_eq!(zstd.compression, 4);
        let plain = index_with(Compression::None);
        assert_eq!(plain.compression, 0);
    }

    fn index_with(compression: Compression) -> LayerInfo {
        let index = index(compression);
        LayerInfo::new(&index, &index.diff_id.to_string()).unwrap()
    }

    #[test]
    fn a_config_that_disagrees_with_the_index_is_refused() {
        let index = index(Compression::Gzip);
        let other = Digest::sha256(b"other").to_string();
        let error = LayerInfo::new(&index, &other).unwrap_err();
        assert!(error.contains("uncompresses to"), "{error}");
    }

    #[test]
    fn diff_ids_are_read_by_position() {
        let config =
            serde_json::json!({"rootfs": {"type": "layers", "diff_ids": ["sha256:a", "sha256:b"]}});
        assert_eq!(config_diff_id(&config, 1), Some("sha256:b"));
        assert_eq!(config_diff_id(&config, 2), None);
        assert_eq!(config_diff_id(&serde_json::json!({}), 0), None);
    }
}
