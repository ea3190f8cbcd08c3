//! Image references: `[docker://]host[:port]/name[:tag|@digest]` for registries, with Docker's
//! normalisation (`debian` is `docker.io/library/debian:latest`), and `oci:DIR[:tag]` for an OCI
//! image layout on disk.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Digest, Error, Result};

/// The registry that unqualified names such as `debian` refer to.
pub const DOCKER_HUB: &str = "docker.io";

/// Where an image lives: in a registry or in an OCI layout directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageReference {
    /// An image in a registry that speaks the OCI distribution protocol.
    Registry(RegistryReference),
    /// An image in an OCI image layout on the local filesystem.
    Layout(LayoutReference),
}

/// A fully normalised registry reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryReference {
    /// `host[:port]` as the user names it (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path, e.g. `library/debian`.
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// The manifest digest; when present it wins over the tag and is verified.
    pub digest: Option<Digest>,
}

/// An image in an OCI layout: the directory, and the tag (`org.opencontainers.image.ref.name`)
/// or manifest digest that selects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutReference {
    /// The layout directory (holds `oci-layout`, `index.json` and `blobs/`).
    pub dir: PathBuf,
    /// The tag; when absent the layout must hold exactly one image.
    pub tag: Option<String>,
    /// A manifest digest, instead of a tag.
    pub digest: Option<Digest>,
}

impl RegistryReference {
    /// The tag or digest to ask the registry's manifest endpoint for.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for RegistryReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LayoutReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci:{}", self.dir.display())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageReference::Registry(r) => r.fmt(f),
            ImageReference::Layout(l) => l.fmt(f),
        }
    }
}

impl FromStr for ImageReference {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        match input.strip_prefix("oci:") {
            Some(rest) => parse_layout(input, rest).map(ImageReference::Layout),
            None => parse_registry(input).map(ImageReference::Registry),
        }
    }
}

impl FromStr for RegistryReference {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        parse_registry(input)
    }
}

fn invalid(input: &str, reason: impl Into<String>) -> Error {
    Error::InvalidReference {
        input: input.to_string(),
        reason: reason.into(),
    }
}

fn parse_layout(input: &str, rest: &str) -> Result<LayoutReference> {
    let (path_and_tag, digest) = match rest.rsplit_once('@') {
        Some((path, digest)) if digest.contains(':') => (path, Some(digest.parse::<Digest>()?)),
        _ => (rest, None),
    };
    // The tag follows the last colon, unless what follows it looks like a path.
    let (dir, tag) = match path_and_tag.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, Some(tag)),
        _ => (path_and_tag, None),
    };
    if dir.is_empty() {
        return Err(invalid(
            input,
            "oci: needs a directory, e.g. oci:./image:latest",
        ));
    }
    if let Some(tag) = tag
        && (tag.is_empty() || tag.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(invalid(input, "the layout tag is empty or has blanks"));
    }
    Ok(LayoutReference {
        dir: PathBuf::from(dir),
        tag: tag.map(str::to_string),
        digest,
    })
}

fn parse_registry(input: &str) -> Result<RegistryReference> {
    let text = input.strip_prefix("docker://").unwrap_or(input);
    if text.is_empty() {
        return Err(invalid(input, "empty reference"));
    }
    let (name_and_tag, digest) = match text.split_once('@') {
        Some((name, digest)) => (
            name,
            Some(
                digest
                    .parse::<Digest>()
                    .map_err(|e| invalid(input, e.to_string()))?,
            ),
        ),
        None => (text, None),
    };
    let last_slash = name_and_tag.rfind('/');
    let (name, tag) = match name_and_tag.rfind(':') {
        Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
            (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
        }
        _ => (name_and_tag, None),
    };
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if looks_like_host(first) => (first.to_ascii_lowercase(), rest),
        _ => (DOCKER_HUB.to_string(), name),
    };
    let registry = match registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => registry,
    };
    validate_host(input, &registry)?;
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    validate_repository(input, &repository)?;
    if let Some(tag) = tag {
        validate_tag(input, tag)?;
    }
    let tag = match (tag, &digest) {
        (Some(tag), _) => Some(tag.to_string()),
        (None, None) => Some("latest".to_string()),
        (None, Some(_)) => None,
    };
    Ok(RegistryReference {
        registry,
        repository,
        tag,
        digest,
    })
}

/// Docker's rule: the first component is a host if it has a dot or a port, or is `localhost`.
fn looks_like_host(component: &str) -> bool {
    component.contains('.')
        || component.contains(':')
        || component == "localhost"
        || component.starts_with('[')
}

fn validate_host(input: &str, host: &str) -> Result<()> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid(input, "unterminated IPv6 address"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid(input, format!("{addr:?} is not an IPv6 address")));
        }
        match after {
            "" => ("", None),
            _ => (
                "",
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| invalid(input, "junk after IPv6 address"))?,
                ),
            ),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(invalid(
            input,
            format!("bad port {port:?} in registry {host:?}"),
        ));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !host.starts_with('[') && !name.split('.').all(label_ok) {
        return Err(invalid(
            input,
            format!("{host:?} is not a valid registry host"),
        ));
    }
    Ok(())
}

fn validate_repository(input: &str, repository: &str) -> Result<()> {
    if repository.len() > 255 {
        return Err(invalid(input, "repository name longer than 255 characters"));
    }
    for component in repository.split('/') {
        if component.is_empty() {
            return Err(invalid(input, "empty path component in repository name"));
        }
        if component.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid(input, "repository names must be lowercase"));
        }
        if !component_is_valid(component.as_bytes()) {
            return Err(invalid(
                input,
                format!(
                    "{component:?}: repository path components are lowercase letters and digits, \
                     separated by '.', '_', '__' or dashes"
                ),
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path-component grammar.
fn component_is_valid(bytes: &[u8]) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let run = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && alnum(bytes[*i]) {
            *i += 1;
        }
        *i > start
    };
    if !run(&mut i) {
        return false;
    }
    while i < bytes.len() {
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !run(&mut i) {
            return false;
        }
    }
    true
}

fn validate_tag(input: &str, tag: &str) -> Result<()> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            input,
            format!("{tag:?} is not a valid tag (letters, digits, '_', '.', '-'; at most 128)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(input: &str) -> RegistryReference {
        input.parse().unwrap_or_else(|e| panic!("{input}: {e}"))
    }

    #[test]
    fn docker_hub_normalisation() {
        let r = registry("debian");
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
        assert_eq!(
            registry("docker://debian:bookworm").to_string(),
            "docker.io/library/debian:bookworm"
        );
        assert_eq!(
            registry("user/app").to_string(),
            "docker.io/user/app:latest"
        );
        assert_eq!(
            registry("index.docker.io/library/debian").registry,
            "docker.io"
        );
    }

    #[test]
    fn hosts_ports_and_tags() {
        let r = registry("127.0.0.1:5000/test/debian:bookworm");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/debian");
        assert_eq!(r.tag.as_deref(), Some("bookworm"));
        let r = registry("localhost/app");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "app")
        );
        let r = registry("ghcr.io/owner/image");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = registry("[::1]:5000/a/b:c");
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.repository, "a/b");
    }

    #[test]
    fn digests_replace_the_default_tag() {
        let hex = "a".repeat(64);
        let r = registry(&format!("quay.io/x/y@sha256:{hex}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), format!("sha256:{hex}"));
        let r = registry(&format!("quay.io/x/y:v1@sha256:{hex}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), format!("sha256:{hex}"));
    }

    #[test]
    fn bad_references_are_refused_with_a_reason() {
        for bad in [
            "",
            "Debian",
            "docker.io/library/Debian",
            "host:99999/app",
            "host:5000/app:",
            "app:tag with space",
            "a//b",
            "app@sha256:1234",
            "-bad.host/x",
            "x/y:-tag",
        ] {
            let err = bad.parse::<RegistryReference>().unwrap_err().to_string();
            assert!(err.contains("invalid"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn layouts() {
        let parse = |s: &str| match s.parse::<ImageReference>().unwrap() {
            ImageReference::Layout(l) => l,
            other => panic!("{other:?}"),
        };
        let l = parse("oci:/var/img:bookworm");
        assert_eq!(l.dir, PathBuf::from("/var/img"));
        assert_eq!(l.tag.as_deref(), Some("bookworm"));
        let l = parse("oci:./img");
        assert_eq!((l.dir.to_str(), l.tag), (Some("./img"), None));
        let l = parse("oci:/a:b/c");
        assert_eq!((l.dir.to_str(), l.tag), (Some("/a:b/c"), None));
        let hex = "b".repeat(64);
        let l = parse(&format!("oci:/img@sha256:{hex}"));
        assert_eq!(l.digest.unwrap().hex(), hex);
        assert!("oci:".parse::<ImageReference>().is_err());
    }
}
