//! Registry authentication: anonymous, HTTP Basic, and the bearer-token flow Docker Hub, GHCR
//! and CNCF distribution use. Tokens are cached per registry and scope and fetched again when
//! they expire or the registry rejects them, so long populations survive token expiry.
//!
//! Why one file of this size: the token cache, the challenge flow and the retry on 401 are one
//! state machine.

pub mod challenge;
pub mod credentials;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use url::Url;

use self::challenge::Challenge;
use self::credentials::{Credential, CredentialSource, Secret};
use super::endpoint::is_loopback_host;
use super::retry::{
    Attempts, describe_error, is_transient_error, is_transient_status, retry_after,
};
use crate::error::error_chain;
use crate::{Error, Result};

/// What a request needs from the repository: read, or read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Manifest and blob reads.
    Pull,
    /// Uploads (push implies pull).
    Push,
}

/// Who is asking: the registry, repository and access one request needs.
pub(crate) struct AuthContext<'a> {
    pub http: &'a reqwest::Client,
    pub registry: &'a str,
    pub repository: &'a str,
    pub access: Access,
}

impl AuthContext<'_> {
    fn scope(&self) -> String {
        match self.access {
            Access::Pull => format!("repository:{}:pull", self.repository),
            Access::Push => format!("repository:{}:pull,push", self.repository),
        }
    }
}

#[derive(Clone, Debug)]
enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

struct Token {
    header: Secret,
    refresh_at: Instant,
}

#[derive(Default)]
struct RegistryAuth {
    scheme: Option<Scheme>,
    tokens: HashMap<String, Token>,
}

/// Holds what each registry asked for and the tokens it gave.
pub(crate) struct Authenticator {
    credentials: CredentialSource,
    state: Mutex<HashMap<String, RegistryAuth>>,
    /// Credentials found per `registry/repository`, so files are read once, not per request.
    found: tokio::sync::Mutex<HashMap<String, Option<Credential>>>,
}

impl Authenticator {
    pub fn new(credentials: CredentialSource) -> Self {
        Authenticator {
            credentials,
            state: Mutex::new(HashMap::new()),
            found: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The stored credential for the request's repository, looked up once.
    async fn credential(&self, ctx: &AuthContext<'_>) -> Result<Option<Credential>> {
        let key = format!("{}/{}", ctx.registry, ctx.repository);
        let mut found = self.found.lock().await;
        if let Some(credential) = found.get(&key) {
            return Ok(credential.clone());
        }
        let credential = self
            .credentials
            .lookup(ctx.registry, ctx.repository)
            .await?;
        found.insert(key, credential.clone());
        Ok(credential)
    }

    fn scheme(&self, registry: &str) -> Option<Scheme> {
        let state = self.state.lock().expect("auth state lock");
        state.get(registry).and_then(|r| r.scheme.clone())
    }

    /// The `Authorization` value for a request, once the registry has said it wants one.
    /// An expired token is replaced before it is sent.
    pub async fn header(
        &self,
        ctx: &AuthContext<'_>,
        attempts: &mut Attempts,
    ) -> Result<Option<Secret>> {
        match self.scheme(ctx.registry) {
            None => Ok(None),
            Some(Scheme::Basic) => {
                let credential = self.credential(ctx).await?;
                Ok(credential.as_ref().and_then(basic_header))
            }
            Some(Scheme::Bearer { realm, service }) => {
                let scope = ctx.scope();
                {
                    let state = self.state.lock().expect("auth state lock");
                    if let Some(token) = state.get(ctx.registry).and_then(|r| r.tokens.get(&scope))
                        && Instant::now() < token.refresh_at
                    {
                        return Ok(Some(token.header.clone()));
                    }
                }
                let token = self
                    .fetch_token(
                        ctx,
                        &realm,
                        service.as_deref(),
                        std::slice::from_ref(&scope),
                        attempts,
                    )
                    .await?;
                Ok(Some(self.store_token(ctx.registry, scope, token)))
            }
        }
    }

    fn store_token(&self, registry: &str, scope: String, token: Token) -> Secret {
        let header = token.header.clone();
        let mut state = self.state.lock().expect("auth state lock");
        state
            .entry(registry.to_string())
            .or_default()
            .tokens
            .insert(scope, token);
        header
    }

    /// Reacts to a 401: learns the scheme and fetches a token, or explains what is missing.
    /// `sent` says whether the refused request carried credentials or a token.
    pub async fn challenged(
        &self,
        ctx: &AuthContext<'_>,
        challenges: &[Challenge],
        sent: bool,
        attempts: &mut Attempts,
    ) -> Result<()> {
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic => None,
        });
        if let Some((realm, service, challenge_scope)) = bearer {
            let scope = ctx.scope();
            let mut scopes = vec![scope.clone()];
            if let Some(extra) = challenge_scope {
                for s in extra.split(' ').filter(|s| !s.is_empty()) {
                    if !scopes.iter().any(|have| have == s) {
                        scopes.push(s.to_string());
                    }
                }
            }
            let token = self
                .fetch_token(ctx, realm, service.as_deref(), &scopes, attempts)
                .await?;
            {
                let mut state = self.state.lock().expect("auth state lock");
                state.entry(ctx.registry.to_string()).or_default().scheme = Some(Scheme::Bearer {
                    realm: realm.clone(),
                    service: service.clone(),
                });
            }
            self.store_token(ctx.registry, scope, token);
            return Ok(());
        }
        if challenges.contains(&Challenge::Basic) {
            let credential = self.credential(ctx).await?;
            return match (credential, sent) {
                (None, _) => Err(no_credentials(ctx.registry)),
                (Some(credential), true) => Err(Error::Unauthorized {
                    registry: ctx.registry.to_string(),
                    detail: format!(
                        "the registry rejected the stored credentials{}",
                        credential
                            .username()
                            .map(|u| format!(" for user {u:?}"))
                            .unwrap_or_default()
                    ),
                }),
                (Some(_), false) => {
                    let mut state = self.state.lock().expect("auth state lock");
                    state.entry(ctx.registry.to_string()).or_default().scheme = Some(Scheme::Basic);
                    Ok(())
                }
            };
        }
        Err(Error::Unauthorized {
            registry: ctx.registry.to_string(),
            detail: "the registry answered 401 without a Basic or Bearer challenge".to_string(),
        })
    }

    /// The error for a request refused again right after its challenge was answered.
    pub async fn refused(
        &self,
        ctx: &AuthContext<'_>,
        challenges: &[Challenge],
        request: &str,
        detail: &str,
    ) -> Error {
        let user = match self.credential(ctx).await {
            Ok(Some(credential)) => credential.username().map(|u| format!(" for user {u:?}")),
            _ => None,
        };
        let detail = match (challenges.first(), user) {
            (Some(Challenge::Basic), Some(user)) => {
                format!("the registry rejected the stored credentials{user}")
            }
            (Some(Challenge::Bearer { .. }), _) => format!(
                "{request}: the registry refused the token it asked for ({detail}); \
                 the account may lack access to {}",
                ctx.repository
            ),
            _ => format!("{request}: still refused after authenticating: {detail}"),
        };
        Error::Unauthorized {
            registry: ctx.registry.to_string(),
            detail,
        }
    }

    /// Asks the token service for a token covering `scopes`.
    async fn fetch_token(
        &self,
        ctx: &AuthContext<'_>,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        attempts: &mut Attempts,
    ) -> Result<Token> {
        let realm_url = Url::parse(realm).map_err(|e| {
            Error::malformed(format!("token realm {realm:?} from {}", ctx.registry), e)
        })?;
        if !matches!(realm_url.scheme(), "http" | "https") {
            return Err(Error::malformed(
                format!("token realm from {}", ctx.registry),
                "not an http(s) URL",
            ));
        }
        let realm_host = realm_url.host_str().unwrap_or_default().to_string();
        let what = format!("token request to {realm_host}");
        // Credentials travel only over TLS, or to a token service on this machine.
        let credential = self.credential(ctx).await?;
        let credential = match credential {
            Some(c) if realm_url.scheme() == "https" || is_loopback_host(&realm_host) => Some(c),
            Some(_) => {
                tracing::warn!(
                    "not sending credentials to the plain-HTTP token service {realm_host}; asking anonymously"
                );
                None
            }
            None => None,
        };
        loop {
            let request = match &credential {
                Some(Credential::IdentityToken { token }) => {
                    let mut form = url::form_urlencoded::Serializer::new(String::new());
                    form.append_pair("grant_type", "refresh_token");
                    form.append_pair("refresh_token", token.expose());
                    form.append_pair("client_id", "lazylayer");
                    form.append_pair("scope", &scopes.join(" "));
                    if let Some(service) = service {
                        form.append_pair("service", service);
                    }
                    ctx.http
                        .post(realm_url.clone())
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(form.finish())
                }
                other => {
                    let mut url = realm_url.clone();
                    {
                        let mut query = url.query_pairs_mut();
                        if let Some(service) = service {
                            query.append_pair("service", service);
                        }
                        for scope in scopes {
                            query.append_pair("scope", scope);
                        }
                        if let Some(Credential::Password { username, .. }) = other {
                            query.append_pair("account", username);
                        }
                    }
                    let mut request = ctx.http.get(url);
                    if let Some(header) = other.as_ref().and_then(basic_header) {
                        request = request.header(AUTHORIZATION, sensitive(&header)?);
                    }
                    request
                }
            };
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if is_transient_error(&e) => {
                    let wait = attempts.failed(&what, describe_error(&e), None)?;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Transport {
                        request: what,
                        detail: describe_error(&e),
                    });
                }
            };
            let status = response.status().as_u16();
            match status {
                200..=299 => return parse_token(&what, response).await,
                401 | 403 => {
                    return Err(match &credential {
                        None => Error::Unauthorized {
                            registry: ctx.registry.to_string(),
                            detail: format!(
                                "the token service at {realm_host} refused anonymous access to {}; \
                                 log in (docker login / podman login) or set REGISTRY_AUTH_FILE",
                                ctx.repository
                            ),
                        },
                        Some(c) => Error::Unauthorized {
                            registry: ctx.registry.to_string(),
                            detail: format!(
                                "the token service at {realm_host} rejected the stored credentials{}",
                                c.username()
                                    .map(|u| format!(" for user {u:?}"))
                                    .unwrap_or_default()
                            ),
                        },
                    });
                }
                _ if is_transient_status(status) => {
                    let wait = attempts.failed(
                        &what,
                        format!("HTTP {status}"),
                        retry_after(response.headers()),
                    )?;
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    return Err(Error::Http {
                        request: what,
                        status,
                        detail: "the token service refused the request".to_string(),
                    });
                }
            }
        }
    }
}

fn no_credentials(registry: &str) -> Error {
    Error::Unauthorized {
        registry: registry.to_string(),
        detail: "the registry requires a login and no credentials were found for it in \
                 $REGISTRY_AUTH_FILE, containers auth.json or ~/.docker/config.json \
                 (log in with `podman login` or `docker login`)"
            .to_string(),
    }
}

fn basic_header(credential: &Credential) -> Option<Secret> {
    match credential {
        Credential::Password { username, password } => Some(Secret::new(format!(
            "Basic {}",
            STANDARD.encode(format!("{username}:{}", password.expose()))
        ))),
        Credential::IdentityToken { .. } => None,
    }
}

/// Turns a secret into a header value that HTTP libraries will not print.
pub(crate) fn sensitive(secret: &Secret) -> Result<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(secret.expose()).map_err(|_| {
        Error::malformed(
            "stored credential",
            "contains characters not allowed in a header",
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

async fn parse_token(what: &str, response: reqwest::Response) -> Result<Token> {
    #[derive(serde::Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let body = response.bytes().await.map_err(|e| Error::Transport {
        request: what.to_string(),
        detail: error_chain(&e),
    })?;
    if body.len() > 1 << 20 {
        return Err(Error::TooLarge {
            what: what.to_string(),
            limit: 1 << 20,
        });
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|e| Error::malformed(what, e))?;
    let token = answer
        .token
        .or(answer.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::malformed(what, "the answer has no token"))?;
    // The distribution spec says a missing expires_in means 60 seconds.
    let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60).max(1));
    let margin = (lifetime / 10).min(Duration::from_secs(30));
    Ok(Token {
        header: Secret::new(format!("Bearer {token}")),
        refresh_at: Instant::now() + lifetime - margin,
    })
}
