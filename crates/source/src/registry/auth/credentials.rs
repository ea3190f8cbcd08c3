//! Registry credentials from the files users already have: `$REGISTRY_AUTH_FILE`, the containers
//! `auth.json` (podman, skopeo, buildah) and Docker's `config.json` (including credential helpers).
//! Secrets are held in [`Secret`], which never prints.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::reference::DOCKER_HUB;
use crate::{Error, Result};

/// A string that must never reach a log or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What proves who we are to one registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or a personal access token used as one).
    Password {
        /// The user name (not secret; may appear in errors).
        username: String,
        /// The password.
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken` from `docker login` to some registries).
    IdentityToken {
        /// The refresh token.
        token: Secret,
    },
}

impl Credential {
    /// The user name to show in messages, if there is one.
    pub fn username(&self) -> Option<&str> {
        match self {
            Credential::Password { username, .. } => Some(username),
            Credential::IdentityToken { .. } => None,
        }
    }
}

/// Where credentials come from.
#[derive(Clone, Debug, Default)]
pub enum CredentialSource {
    /// The usual files, in the order podman uses them: `$REGISTRY_AUTH_FILE`,
    /// `$XDG_RUNTIME_DIR/containers/auth.json` (without a runtime directory,
    /// `/run/containers/UID/auth.json`), `~/.config/containers/auth.json`, then Docker's
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    #[default]
    Environment,
    /// Exactly these files, in order.
    Files(Vec<PathBuf>),
    /// Anonymous access only.
    None,
}

impl CredentialSource {
    fn files(&self) -> Vec<PathBuf> {
        match self {
            CredentialSource::Files(files) => files.clone(),
            CredentialSource::None => Vec::new(),
            CredentialSource::Environment => {
                let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
                let mut files = Vec::new();
                if let Some(file) = env("REGISTRY_AUTH_FILE") {
                    files.push(PathBuf::from(file));
                }
                match env("XDG_RUNTIME_DIR") {
                    Some(runtime) => files.push(Path::new(&runtime).join("containers/auth.json")),
                    // Where podman keeps `podman login` credentials without a runtime
                    // directory (root's: /run/containers/0/auth.json).
                    None => files.push(PathBuf::from(format!(
                        "/run/containers/{}/auth.json",
                        rustix::process::getuid().as_raw()
                    ))),
                }
                let home = env("HOME").map(PathBuf::from);
                if let Some(home) = &home {
                    files.push(home.join(".config/containers/auth.json"));
                }
                match (env("DOCKER_CONFIG"), &home) {
                    (Some(dir), _) => files.push(Path::new(&dir).join("config.json")),
                    (None, Some(home)) => files.push(home.join(".docker/config.json")),
                    (None, None) => {}
                }
                files
            }
        }
    }

    /// Finds the credential for `repository` on `registry`: the most specific entry of the first
    /// file that has one. Missing files are skipped; unreadable or malformed ones are errors.
    pub async fn lookup(&self, registry: &str, repository: &str) -> Result<Option<Credential>> {
        for file in self.files() {
            let text = match std::fs::read(&file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
            };
            let config: AuthFile = serde_json::from_slice(&text)
                .map_err(|e| Error::malformed(file.display().to_string(), e))?;
            if let Some(credential) = config.lookup(&file, registry, repository).await? {
                tracing::debug!(registry, file = %file.display(), "using stored credentials");
                return Ok(Some(credential));
            }
        }
        Ok(None)
    }
}

/// The shape shared by Docker's config.json and containers' auth.json.
#[derive(serde::Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Reduces an auths key (`https://index.docker.io/v1/`, `quay.io/org`, ...) to `host[/path]`.
fn normalise_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.trim_end_matches('/');
    let key = key
        .strip_suffix("/v1")
        .or_else(|| key.strip_suffix("/v2"))
        .unwrap_or(key);
    let (host, path) = match key.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (key, None),
    };
    let host = match host.to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        other => other.to_string(),
    };
    match path {
        Some(path) => format!("{host}/{path}"),
        None => host,
    }
}

impl AuthFile {
    async fn lookup(
        &self,
        file: &Path,
        registry: &str,
        repository: &str,
    ) -> Result<Option<Credential>> {
        let hub_keys: &[&str] = if registry == DOCKER_HUB {
            &[
                "docker.io",
                "index.docker.io",
                "https://index.docker.io/v1/",
                "registry-1.docker.io",
            ]
        } else {
            &[]
        };
        for key in std::iter::once(registry).chain(hub_keys.iter().copied()) {
            if let Some(helper) = self.cred_helpers.get(key) {
                return run_helper(helper, registry).await;
            }
        }
        let full = format!("{registry}/{repository}");
        let best = self
            .auths
            .iter()
            .map(|(key, entry)| (normalise_key(key), entry))
            .filter(|(key, _)| {
                key == registry
                    || (full.starts_with(key.as_str())
                        && full.as_bytes().get(key.len()) == Some(&b'/'))
            })
            .max_by_key(|(key, _)| key.len());
        if let Some((_, entry)) = best
            && let Some(credential) = entry.credential(file, registry)?
        {
            return Ok(Some(credential));
        }
        match &self.creds_store {
            Some(store) if !store.is_empty() => run_helper(store, registry).await,
            _ => Ok(None),
        }
    }
}

impl AuthEntry {
    fn credential(&self, file: &Path, registry: &str) -> Result<Option<Credential>> {
        if let Some(token) = self.identity_token.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credential::IdentityToken {
                token: Secret::new(token),
            }));
        }
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            return Ok(Some(Credential::Password {
                username: username.clone(),
                password: Secret::new(password.clone()),
            }));
        }
        let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let bad = || {
            Error::malformed(
                file.display().to_string(),
                format!("the \"auth\" entry for {registry} is not base64 of USER:PASSWORD"),
            )
        };
        let decoded = STANDARD.decode(auth.trim()).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (username, password) = decoded.split_once(':').ok_or_else(bad)?;
        Ok(Some(Credential::Password {
            username: username.to_string(),
            password: Secret::new(password),
        }))
    }
}

/// Asks `docker-credential-HELPER get` for the registry's credentials.
async fn run_helper(helper: &str, registry: &str) -> Result<Option<Credential>> {
    use tokio::io::AsyncWriteExt;
    let program = format!("docker-credential-{helper}");
    let server = if registry == DOCKER_HUB {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::io(format!("running credential helper {program}"), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| Error::io(format!("writing to {program}"), e))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| Error::io(format!("running {program}"), e))?;
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        if message.to_ascii_lowercase().contains("not found") {
            return Ok(None);
        }
        return Err(Error::Unauthorized {
            registry: registry.to_string(),
            detail: format!("{program} failed: {}", message.trim()),
        });
    }
    #[derive(serde::Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let answer: HelperAnswer = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::malformed(format!("output of {program}"), e))?;
    Ok(Some(if answer.username == "<token>" {
        Credential::IdentityToken {
            token: Secret::new(answer.secret),
        }
    } else {
        Credential::Password {
            username: answer.username,
            password: Secret::new(answer.secret),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, json: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, json).unwrap();
        path
    }

    fn password(c: Option<Credential>) -> (String, String) {
        match c.expect("credential") {
            Credential::Password { username, password } => {
                (username, password.expose().to_string())
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn docker_config_keys_and_most_specific_entry() {
        let dir = tempfile::tempdir().unwrap();
        let auth = STANDARD.encode("hub:hubpass");
        let org = STANDARD.encode("org:orgpass");
        let file = write(
            dir.path(),
            "config.json",
            &format!(
                r#"{{"auths":{{
                  "https://index.docker.io/v1/":{{"auth":"{auth}"}},
                  "quay.io":{{"username":"q","password":"qp"}},
                  "quay.io/org":{{"auth":"{org}"}}
                }}}}"#
            ),
        );
        let source = CredentialSource::Files(vec![file]);
        assert_eq!(
            password(source.lookup("docker.io", "library/debian").await.unwrap()),
            ("hub".into(), "hubpass".into())
        );
        assert_eq!(
            password(source.lookup("quay.io", "org/app").await.unwrap()),
            ("org".into(), "orgpass".into())
        );
        assert_eq!(
            password(source.lookup("quay.io", "organisation/app").await.unwrap()),
            ("q".into(), "qp".into())
        );
        assert!(source.lookup("ghcr.io", "x/y").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn first_file_with_an_entry_wins_and_missing_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.json",
            r#"{"auths":{"other.io":{"auth":"eDp5"}}}"#,
        );
        let b = write(
            dir.path(),
            "b.json",
            &format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{}"}}}}}}"#,
                STANDARD.encode("u:p:with:colons")
            ),
        );
        let source = CredentialSource::Files(vec![dir.path().join("missing.json"), a, b]);
        assert_eq!(
            password(source.lookup("127.0.0.1:5000", "test/x").await.unwrap()),
            ("u".into(), "p:with:colons".into())
        );
    }

    #[tokio::test]
    async fn malformed_files_are_errors_that_hide_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.json",
            r#"{"auths":{"r.io":{"auth":"not-base64-$$$"}}}"#,
        );
        let err = CredentialSource::Files(vec![file])
            .lookup("r.io", "x")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("base64") && !err.contains("$$$"), "{err}");
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
