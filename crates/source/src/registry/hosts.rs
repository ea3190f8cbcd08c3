//! Registry hosts as containerd configures them: `HOSTS_DIR/<registry>/hosts.toml` (or
//! `HOSTS_DIR/_default/hosts.toml`), with `server` (where the registry's API really is) and
//! `[host."URL"]` mirrors tried first, in file order, for what their `capabilities` allow
//! (containerd's `docs/hosts.md`). So a Harbor proxy cache, a Spegel or Dragonfly mirror, or a
//! registry behind another name serves lazylayer exactly as it serves containerd on the node.
//!
//! Read: `server`, `[host."URL"]` with `capabilities` and `override_path`. Not read: `ca`,
//! `client` (certificates come from the system store or `SSL_CERT_FILE`) and `header`. A host
//! with `skip_verify = true` is left out (with a warning): lazylayer never talks HTTPS without
//! verifying the certificate.

use std::path::Path;

use url::Url;

use crate::{Error, Result};

/// The directory containerd reads hosts from by default.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// What a host may be used for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Manifests by tag (resolving a reference).
    pub resolve: bool,
    /// Blobs, and manifests by digest.
    pub pull: bool,
}

/// A mirror: another host to try first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// Its API base (`scheme://host[:port]/path/v2/`, or the path as written with
    /// `override_path`).
    pub base: Url,
    /// `host[:port]`: whose credentials and tokens it gets.
    pub host: String,
    /// What it may serve.
    pub capabilities: Capabilities,
}

/// The hosts of one registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hosts {
    /// The registry's own API base, when `server` names it.
    pub server: Option<Url>,
    /// Mirrors, in the order they are tried.
    pub mirrors: Vec<Mirror>,
}

impl Hosts {
    /// The hosts of `registry` configured under `dir` (none when it has no file).
    pub fn load(dir: &Path, registry: &str) -> Result<Hosts> {
        let mut path = dir.join(registry).join("hosts.toml");
        if !path.exists() {
            // `_default` covers every registry without a file of its own.
            path = dir.join("_default").join("hosts.toml");
            if !path.exists() {
                return Ok(Hosts::default());
            }
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Hosts::parse(&text).map_err(|reason| Error::InvalidReference {
            input: path.display().to_string(),
            reason,
        })
    }

    /// Parses a hosts.toml.
    pub fn parse(text: &str) -> std::result::Result<Hosts, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let server = match table.get("server") {
            None => None,
            Some(toml::Value::String(server)) => Some(api_base(server, false)?),
            Some(_) => return Err("`server` is not a string".into()),
        };
        let mut mirrors = Vec::new();
        if let Some(hosts) = table.get("host") {
            let hosts = hosts.as_table().ok_or("`host` is not a table")?;
            for (url, settings) in hosts {
                let settings = settings
                    .as_table()
                    .ok_or(format!("host {url:?} is not a table"))?;
                if settings.get("skip_verify").and_then(|v| v.as_bool()) == Some(true) {
                    tracing::warn!(
                        "hosts.toml: leaving out {url}: skip_verify is not supported (use \
                         SSL_CERT_FILE for a private CA)"
                    );
                    continue;
                }
                let override_path = settings
                    .get("override_path")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                // containerd's default: every capability.
                let capabilities = match settings.get("capabilities") {
                    None => Capabilities {
                        resolve: true,
                        pull: true,
                    },
                    Some(list) => {
                        let list = list
                            .as_array()
                            .ok_or(format!("capabilities of {url:?} is not a list"))?;
                        let has = |name: &str| list.iter().any(|c| c.as_str() == Some(name));
                        Capabilities {
                            resolve: has("resolve"),
                            pull: has("pull"),
                        }
                    }
                };
                let base = api_base(url, override_path)?;
                let host = match base.port() {
                    Some(port) => format!("{}:{port}", base.host_str().unwrap_or_default()),
                    None => base.host_str().unwrap_or_default().to_string(),
                };
                mirrors.push(Mirror {
                    base,
                    host,
                    capabilities,
                });
            }
        }
        Ok(Hosts { server, mirrors })
    }
}

/// The API base of a host URL: `/v2/` appended to its path unless `override_path`.
fn api_base(url: &str, override_path: bool) -> std::result::Result<Url, String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let mut base = Url::parse(&with_scheme).map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(format!("{url:?}: only http and https hosts"));
    }
    let path = base.path().trim_end_matches('/').to_string();
    base.set_path(&if override_path {
        format!("{path}/")
    } else {
        format!("{path}/v2/")
    });
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_order_with_their_capabilities() {
        let hosts = Hosts::parse(
            r#"
server = "https://registry.example.com"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]

[host."https://harbor.lan/proxy"]
  capabilities = ["pull"]
  override_path = true

[host."https://unverified.lan"]
  skip_verify = true
"#,
        )
        .unwrap();
        assert_eq!(
            hosts.server.unwrap().as_str(),
            "https://registry.example.com/v2/"
        );
        assert_eq!(hosts.mirrors.len(), 2, "skip_verify hosts are left out");
        assert_eq!(hosts.mirrors[0].base.as_str(), "http://127.0.0.1:5000/v2/");
        assert_eq!(hosts.mirrors[0].host, "127.0.0.1:5000");
        assert!(hosts.mirrors[0].capabilities.resolve);
        assert_eq!(hosts.mirrors[1].base.as_str(), "https://harbor.lan/proxy/");
        assert_eq!(hosts.mirrors[1].host, "harbor.lan");
        assert_eq!(
            hosts.mirrors[1].capabilities,
            Capabilities {
                resolve: false,
                pull: true
            }
        );
    }

    #[test]
    fn bad_files_are_errors_and_missing_ones_are_empty() {
        assert!(Hosts::parse("server = 5").is_err());
        assert!(Hosts::parse("[host.\"ftp://x\"]").is_err());
        assert!(Hosts::parse("not toml [").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Hosts::load(dir.path(), "registry.lan:5000").unwrap(),
            Hosts::default()
        );
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            "[host.\"http://mirror.lan\"]\n",
        )
        .unwrap();
        let hosts = Hosts::load(dir.path(), "registry.lan:5000").unwrap();
        assert_eq!(hosts.mirrors[0].host, "mirror.lan");
    }
}
