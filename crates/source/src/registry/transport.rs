//! Sending one registry request: authentication challenges answered, transient failures
//! retried within the operation's budget, and registry error bodies turned into messages.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Method, Response};
use url::Url;

use super::Repository;
use super::auth::challenge::parse_challenges;
use super::auth::{Access, AuthContext, sensitive};
use super::retry::{
    Attempts, RetryPolicy, describe_error, is_transient_error, is_transient_status, retry_after,
};
use crate::{Error, Result};

/// A request body that can be sent again on retry.
#[derive(Clone, Debug)]
pub enum Body {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A file, streamed; its length is sent as Content-Length.
    File(std::path::PathBuf),
}

/// One registry request, kept so that it can be re-sent.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Body>,
    pub access: Access,
    /// Names the request in errors, e.g. `GET manifest test/debian:bookworm`.
    pub what: String,
}

impl Request {
    pub fn new(method: Method, url: Url, access: Access, what: String) -> Self {
        Request {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            access,
            what,
        }
    }

    pub fn header(mut self, name: reqwest::header::HeaderName, value: &str) -> Self {
        if let Ok(value) = value.parse() {
            self.headers.insert(name, value);
        }
        self
    }
}

/// How long a mirror is tried before the next host: one retry, soon.
fn mirror_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        max_elapsed: Duration::from_secs(30),
        max_retry_after: Duration::from_secs(1),
    }
}

impl Repository {
    /// Sends `request` until it succeeds, fails for good, or `attempts` runs out. Only 2xx
    /// answers come back as `Ok`. A read is tried on the registry's mirrors (hosts.toml) first,
    /// in order, each with a short budget of its own; the registry itself comes last.
    pub(crate) async fn send(
        &self,
        request: &Request,
        attempts: &mut Attempts,
    ) -> Result<Response> {
        let reading =
            matches!(request.method, Method::GET | Method::HEAD) && request.access == Access::Pull;
        if reading && !self.mirrors.is_empty() {
            let resolving = is_tag_lookup(request.url.path());
            for mirror in self.mirrors.iter() {
                let allowed = if resolving {
                    mirror.capabilities.resolve
                } else {
                    mirror.capabilities.pull
                };
                let Some(url) = allowed
                    .then(|| rebase(&request.url, &self.base, &mirror.base))
                    .flatten()
                else {
                    continue;
                };
                let mut mirror_attempts = Attempts::new(&mirror_policy());
                match self
                    .send_to(request, &url, &mirror.host, &mut mirror_attempts)
                    .await
                {
                    Ok(response) => return Ok(response),
                    Err(e) => tracing::debug!(
                        "{}: mirror {} did not serve it ({e}); trying the next host",
                        request.what,
                        mirror.host
                    ),
                }
            }
        }
        self.send_to(request, &request.url, &self.registry, attempts)
            .await
    }

    /// Sends `request` to `url` on `host` (whose credentials and tokens it uses).
    async fn send_to(
        &self,
        request: &Request,
        url: &Url,
        host: &str,
        attempts: &mut Attempts,
    ) -> Result<Response> {
        let client = &self.client.inner;
        let ctx = AuthContext {
            http: &client.http,
            registry: host,
            repository: &self.name,
            access: request.access,
        };
        let mut answered_challenge = false;
        loop {
            let authorization = client.auth.header(&ctx, attempts).await?;
            let mut builder = client
                .http
                .request(request.method.clone(), url.clone())
                .headers(request.headers.clone());
            if let Some(secret) = &authorization {
                builder = builder.header(AUTHORIZATION, sensitive(secret)?);
            }
            builder = match &request.body {
                None => builder,
                Some(Body::Bytes(bytes)) => builder.body(bytes.clone()),
                Some(Body::File(path)) => {
                    let file = tokio::fs::File::open(path)
                        .await
                        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                    let len = file
                        .metadata()
                        .await
                        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
                        .len();
                    builder.header(reqwest::header::CONTENT_LENGTH, len).body(
                        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file)),
                    )
                }
            };
            let response = match builder.send().await {
                Ok(response) => response,
                Err(e) if is_transient_error(&e) => {
                    let wait = attempts.failed(&request.what, describe_error(&e), None)?;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Transport {
                        request: request.what.clone(),
                        detail: describe_error(&e),
                    });
                }
            };
            let status = response.status().as_u16();
            match status {
                200..=299 => return Ok(response),
                401 => {
                    let challenges = parse_challenges(
                        response
                            .headers()
                            .get_all(WWW_AUTHENTICATE)
                            .iter()
                            .filter_map(|v| v.to_str().ok()),
                    );
                    if answered_challenge {
                        let detail = registry_message(response).await;
                        return Err(client
                            .auth
                            .refused(&ctx, &challenges, &request.what, &detail)
                            .await);
                    }
                    client
                        .auth
                        .challenged(&ctx, &challenges, authorization.is_some(), attempts)
                        .await?;
                    answered_challenge = true;
                }
                403 => {
                    return Err(Error::Denied {
                        registry: self.registry.clone(),
                        detail: format!("{}: {}", request.what, registry_message(response).await),
                    });
                }
                404 => {
                    return Err(Error::NotFound {
                        what: format!("{} ({})", request.what, registry_message(response).await),
                    });
                }
                _ if is_transient_status(status) => {
                    let wait = retry_after(response.headers());
                    let reason = format!("HTTP {status}");
                    let wait = attempts.failed(&request.what, reason, wait)?;
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    return Err(Error::Http {
                        request: request.what.clone(),
                        status,
                        detail: registry_message(response).await,
                    });
                }
            }
        }
    }
}

/// Whether the API path asks for a manifest by tag (what hosts.toml calls `resolve`), not by
/// digest (`pull`, as blobs).
fn is_tag_lookup(path: &str) -> bool {
    match path.rsplit_once("/manifests/") {
        Some((_, reference)) => !reference.contains(':') && !reference.contains("%3A"),
        None => false,
    }
}

/// `url` (under `base`) moved under `mirror`.
fn rebase(url: &Url, base: &Url, mirror: &Url) -> Option<Url> {
    let rest = url.as_str().strip_prefix(base.as_str())?;
    mirror.join(rest).ok()
}

/// The message of a registry error body (`{"errors":[{"code":..,"message":..}]}`), or the
/// status text when the body says nothing useful.
async fn registry_message(response: Response) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let reason = response
        .status()
        .canonical_reason()
        .unwrap_or("error")
        .to_string();
    let body = match response.bytes().await {
        Ok(body) if body.len() <= 64 << 10 => body,
        _ => return reason,
    };
    match serde_json::from_slice::<Errors>(&body) {
        Ok(errors) if !errors.errors.is_empty() => errors
            .errors
            .iter()
            .map(|e| match (&e.code, &e.message) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.clone(),
                (None, Some(message)) => message.clone(),
                (None, None) => reason.clone(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => reason,
    }
}
