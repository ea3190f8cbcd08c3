//! Content digests (`sha256:<hex>`): parsing, printing, and hashing that checks what was read.
//!
//! Every byte lazylayer hands on is checked against a digest; this module is where the
//! algorithm names and the hex form are validated, so a hostile manifest cannot smuggle a
//! path or an unknown algorithm through a digest string.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::Error;

/// The hash functions the OCI image spec registers and lazylayer verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    /// SHA-256, used by virtually every image.
    Sha256,
    /// SHA-512, allowed by the spec and rare in practice.
    Sha512,
}

impl DigestAlgorithm {
    /// The algorithm's name as it appears before the colon.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest such as `sha256:e3b0c442...`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: DigestAlgorithm,
    hex: String,
}

impl Digest {
    /// The digest of `bytes` under `algorithm`.
    pub fn compute(algorithm: DigestAlgorithm, bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    /// The sha256 digest of `bytes`: what manifests and blobs are named by.
    pub fn sha256(bytes: &[u8]) -> Digest {
        Digest::compute(DigestAlgorithm::Sha256, bytes)
    }

    /// The hash function.
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The lowercase hex encoding of the hash (safe to use as a file name).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Checks that `bytes` hash to this digest; `what` names them in the error.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<(), Error> {
        let actual = Digest::compute(self.algorithm, bytes);
        if &actual == self {
            Ok(())
        } else {
            Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: self.clone(),
                actual,
            })
        }
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| Error::InvalidDigest {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let (name, hex) = input
            .split_once(':')
            .ok_or_else(|| invalid("expected ALGORITHM:HEX"))?;
        let algorithm = match name {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => {
                return Err(invalid(
                    "unsupported algorithm (sha256 and sha512 are supported)",
                ));
            }
        };
        if hex.len() != algorithm.hex_len() {
            return Err(invalid(&format!(
                "{} digests have {} hex digits, this one has {}",
                algorithm.name(),
                algorithm.hex_len(),
                hex.len()
            )));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("the hex part must be lowercase hexadecimal"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental hashing of a byte stream, for verifying blobs while they stream past.
#[derive(Clone)]
pub struct DigestHasher {
    state: HasherState,
    len: u64,
}

#[derive(Clone)]
enum HasherState {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl DigestHasher {
    /// A hasher for `algorithm` that has seen no bytes yet.
    pub fn new(algorithm: DigestAlgorithm) -> Self {
        let state = match algorithm {
            DigestAlgorithm::Sha256 => HasherState::Sha256(Sha256::new()),
            DigestAlgorithm::Sha512 => HasherState::Sha512(Sha512::new()),
        };
        DigestHasher { state, len: 0 }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        match &mut self.state {
            HasherState::Sha256(h) => h.update(bytes),
            HasherState::Sha512(h) => h.update(bytes),
        }
    }

    /// How many bytes have been fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before the first byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let (algorithm, bytes) = match self.state {
            HasherState::Sha256(h) => (DigestAlgorithm::Sha256, h.finalize().to_vec()),
            HasherState::Sha512(h) => (DigestAlgorithm::Sha512, h.finalize().to_vec()),
        };
        Digest {
            algorithm,
            hex: hex::encode(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let text = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let digest: Digest = text.parse().unwrap();
        assert_eq!(digest.to_string(), text);
        assert_eq!(digest, Digest::sha256(b""));
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c442",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn verify_reports_both_digests() {
        let digest = Digest::sha256(b"hello");
        assert!(digest.verify("greeting", b"hello").is_ok());
        let err = digest.verify("greeting", b"hellO").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("greeting") && text.contains(&digest.to_string()),
            "{text}"
        );
    }

    #[test]
    fn hasher_matches_one_shot() {
        let mut hasher = DigestHasher::new(DigestAlgorithm::Sha512);
        hasher.update(b"hel");
        hasher.update(b"lo");
        assert_eq!(hasher.len(), 5);
        assert_eq!(
            hasher.finish(),
            Digest::compute(DigestAlgorithm::Sha512, b"hello")
        );
    }
}
