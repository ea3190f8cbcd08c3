//! Where a registry's API lives: HTTPS by default, plain HTTP for registries on this machine
//! and for hosts the user names with `--insecure-registry`, and Docker Hub's API host.

use std::net::IpAddr;

use url::Url;

use crate::reference::DOCKER_HUB;
use crate::{Error, Result};

/// True for `localhost` and loopback addresses (with or without a port or IPv6 brackets).
pub fn is_loopback_host(host: &str) -> bool {
    let name = host_without_port(host);
    name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(name, _)| &host[..name.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The base URL (`scheme://host[:port]/v2/`) of a registry's API.
pub fn base_url(registry: &str, insecure: &[String]) -> Result<Url> {
    let api_host = if registry == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        registry
    };
    let plain = is_loopback_host(registry)
        || insecure
            .iter()
            .any(|h| h == registry || h == host_without_port(registry));
    let scheme = if plain { "http" } else { "https" };
    Url::parse(&format!("{scheme}://{api_host}/v2/")).map_err(|e| Error::InvalidReference {
        input: registry.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        let none: Vec<String> = vec![];
        assert_eq!(
            base_url("docker.io", &none).unwrap().as_str(),
            "https://registry-1.docker.io/v2/"
        );
        assert_eq!(base_url("127.0.0.1:5000", &none).unwrap().scheme(), "http");
        assert_eq!(base_url("localhost", &none).unwrap().scheme(), "http");
        assert_eq!(base_url("[::1]:5000", &none).unwrap().scheme(), "http");
        assert_eq!(
            base_url("registry.lan:5000", &none).unwrap().scheme(),
            "https"
        );
        let insecure = vec!["registry.lan".to_string()];
        assert_eq!(
            base_url("registry.lan:5000", &insecure).unwrap().scheme(),
            "http"
        );
        assert!(!is_loopback_host("127example.com"));
    }
}
