//! Platforms (`os/arch[/variant]`) and choosing one image from a multi-platform index.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// An OS, CPU architecture and optional variant in OCI terms (`linux/arm64/v8`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// GOARCH-style architecture, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// CPU variant, e.g. `v7` for 32-bit arm; `None` when it does not matter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// Which platform to pick from a multi-platform image, and whether the user asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformChoice {
    /// The wanted platform.
    pub platform: Platform,
    /// True when given by `--platform`: a single-platform image of another platform is then
    /// refused instead of used.
    pub explicit: bool,
}

impl PlatformChoice {
    /// The platform of the machine lazylayer runs on, not insisted on.
    pub fn host() -> Self {
        PlatformChoice {
            platform: Platform::host(),
            explicit: false,
        }
    }

    /// `--platform` if given, else the host platform.
    pub fn from_flag(flag: Option<&str>) -> Result<Self> {
        match flag {
            Some(text) => Ok(PlatformChoice {
                platform: text.parse()?,
                explicit: true,
            }),
            None => Ok(PlatformChoice::host()),
        }
    }
}

impl Platform {
    /// Builds a normalised platform (architecture aliases such as `x86_64` become `amd64`).
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        let (architecture, implied_variant) = normalise_architecture(architecture);
        let variant = variant
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .or(implied_variant.map(str::to_string));
        let variant = match (architecture.as_str(), variant.as_deref()) {
            // arm64 has only one variant in practice; "v8" and none mean the same.
            ("arm64", Some("v8" | "8")) => None,
            ("arm", Some(v)) if !v.starts_with('v') => Some(format!("v{v}")),
            _ => variant,
        };
        Platform {
            os: os.to_ascii_lowercase(),
            architecture,
            variant,
        }
    }

    /// The platform of this machine (what `uname -m` maps to in OCI terms).
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform::new(std::env::consts::OS, architecture, variant)
    }

    /// Whether an image built for `candidate` runs here. A wanted platform without a variant
    /// accepts any variant; one with a variant accepts only that variant.
    pub fn accepts(&self, candidate: &Platform) -> bool {
        self.os == candidate.os
            && self.architecture == candidate.architecture
            && (self.variant.is_none() || self.variant == candidate.variant)
    }
}

fn normalise_architecture(architecture: &str) -> (String, Option<&'static str>) {
    let lower = architecture.to_ascii_lowercase();
    match lower.as_str() {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), None),
        "aarch64" | "arm64" => ("arm64".into(), None),
        "armhf" => ("arm".into(), Some("v7")),
        "armel" => ("arm".into(), Some("v6")),
        "i386" | "i686" | "386" => ("386".into(), None),
        _ => (lower, None),
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidPlatform {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = input.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(invalid("empty component"));
        }
        if parts.iter().any(|p| {
            !p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }) {
            return Err(invalid("unexpected character"));
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(invalid("wrong number of components")),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        let p: Platform = "linux/x86_64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        let p: Platform = "linux/arm/7".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_rules() {
        let want: Platform = "linux/arm".parse().unwrap();
        assert!(want.accepts(&Platform::new("linux", "arm", Some("v6"))));
        let want: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!want.accepts(&Platform::new("linux", "arm", Some("v6"))));
        let want: Platform = "linux/arm64".parse().unwrap();
        assert!(want.accepts(&Platform::new("linux", "arm64", Some("v8"))));
        assert!(!want.accepts(&Platform::new("linux", "amd64", None)));
        assert!(!want.accepts(&Platform::new("windows", "arm64", None)));
    }

    #[test]
    fn host_is_linux_here() {
        assert_eq!(Platform::host().os, "linux");
    }
}
