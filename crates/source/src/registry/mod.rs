//! The registry client: the OCI distribution protocol over HTTPS (plain HTTP on loopback),
//! built directly on reqwest + rustls so that every request shares one retry budget, one
//! token cache and one error vocabulary (docs/architecture.md says why not oci-client).

pub mod auth;
mod blobs;
pub mod endpoint;
pub mod hosts;
mod manifests;
mod push;
pub mod retry;
mod transport;

use std::sync::{Arc, Once};
use std::time::Duration;

use url::Url;

use self::auth::Authenticator;
use self::auth::credentials::CredentialSource;
use self::retry::RetryPolicy;
use crate::reference::RegistryReference;
use crate::{Error, Result};

pub use self::transport::Body;

/// How the client talks to registries.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registries (`host` or `host:port`) to reach over plain HTTP although not on loopback.
    pub insecure_registries: Vec<String>,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes; a stalled transfer fails after it
    /// and is retried.
    pub read_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Where credentials come from.
    pub credentials: CredentialSource,
    /// containerd's registry hosts directory (`DIR/<registry>/hosts.toml`: mirrors and the
    /// real server of a registry); `None` reads none.
    pub hosts_dir: Option<std::path::PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_registries: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            credentials: CredentialSource::Environment,
            hosts_dir: Some(hosts::DEFAULT_HOSTS_DIR.into()),
        }
    }
}

/// A client for any number of registries; cheap to clone, shares connections and tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    http: reqwest::Client,
    auth: Authenticator,
    options: ClientOptions,
}

/// One repository on one registry (`127.0.0.1:5000` + `test/debian`).
#[derive(Clone)]
pub struct Repository {
    client: RegistryClient,
    registry: String,
    name: String,
    base: Url,
    /// Hosts tried before `base` (hosts.toml).
    mirrors: Arc<Vec<hosts::Mirror>>,
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl RegistryClient {
    /// Builds a client.
    pub fn new(options: ClientOptions) -> Result<Self> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("lazylayer/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::Transport {
                request: "building the HTTP client".to_string(),
                detail: crate::error::error_chain(&e),
            })?;
        Ok(RegistryClient {
            inner: Arc::new(ClientInner {
                http,
                auth: Authenticator::new(options.credentials.clone()),
                options,
            }),
        })
    }

    /// A handle on `repository` of `registry`.
    pub fn repository(&self, registry: &str, repository: &str) -> Result<Repository> {
        let hosts = match &self.inner.options.hosts_dir {
            Some(dir) => hosts::Hosts::load(dir, registry)?,
            None => hosts::Hosts::default(),
        };
        let base = match hosts.server {
            Some(server) => server,
            None => endpoint::base_url(registry, &self.inner.options.insecure_registries)?,
        };
        Ok(Repository {
            client: self.clone(),
            registry: registry.to_string(),
            name: repository.to_string(),
            base,
            mirrors: Arc::new(hosts.mirrors),
        })
    }

    /// The repository a reference names.
    pub fn repository_of(&self, reference: &RegistryReference) -> Result<Repository> {
        self.repository(&reference.registry, &reference.repository)
    }

    fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.options.retry
    }
}

impl Repository {
    /// The registry (`host[:port]`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `{base}/{name}/{kind}/{reference}`: e.g. the URL of a manifest or blob.
    fn url(&self, kind: &str, reference: &str) -> Result<Url> {
        self.base
            .join(&format!("{}/{kind}/{reference}", self.name))
            .map_err(|e| Error::InvalidReference {
                input: format!("{}/{}", self.registry, self.name),
                reason: e.to_string(),
            })
    }
}
