//! A bearer-token service for the registry's `token` auth mode, as Docker Hub and GHCR run
//! one: `GET /token?service=..&scope=repository:NAME:pull,push` with optional Basic
//! credentials answers `{"token": JWT, "expires_in": N}`. Tokens are ES256 JWTs whose `x5c`
//! header carries a self-signed certificate that the registry trusts (`rootcertbundle`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use tokio::net::TcpListener;

use crate::background::{self, Background};
use crate::http_wire::Conn;

/// The `service` the registry and the issuer agree on.
pub const SERVICE: &str = "lazylayer-test-registry";
/// The `iss` claim the registry checks.
pub const ISSUER: &str = "lazylayer-test-issuer";
/// CNCF distribution 2.8 accepts tokens up to this long after their `exp`.
const REGISTRY_LEEWAY: Duration = Duration::from_secs(60);

/// How the issuer behaves.
#[derive(Clone, Debug)]
pub struct IssuerOptions {
    /// Accepted `(user, password)` pairs.
    pub users: Vec<(String, String)>,
    /// Whether a request without credentials gets a pull token.
    pub anonymous_pull: bool,
    /// How long the registry accepts a token.
    pub lifetime: Duration,
    /// The `expires_in` told to clients (defaults to `lifetime`); telling more than the real
    /// lifetime makes clients discover expiry through a 401.
    pub advertised_lifetime: Option<Duration>,
}

impl Default for IssuerOptions {
    fn default() -> Self {
        IssuerOptions {
            users: vec![("tester".into(), "s3cret-token-pass".into())],
            anonymous_pull: false,
            lifetime: Duration::from_secs(300),
            advertised_lifetime: None,
        }
    }
}

struct Inner {
    options: IssuerOptions,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    issued: AtomicU64,
    refused: AtomicU64,
}

/// A running token issuer; stops when dropped.
pub struct TokenIssuer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    _dir: tempfile::TempDir,
    bundle: PathBuf,
    _server: Background,
}

impl TokenIssuer {
    /// Starts the issuer on 127.0.0.1, on its own thread.
    pub fn start(options: IssuerOptions) -> io::Result<TokenIssuer> {
        let other = |e: String| io::Error::other(e);
        let key = rcgen::KeyPair::generate().map_err(|e| other(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["lazylayer-token-issuer".to_string()])
            .map_err(|e| other(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| other(e.to_string()))?;
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| other(e.to_string()))?;
        let dir = tempfile::tempdir()?;
        let bundle = dir.path().join("issuer.pem");
        std::fs::write(&bundle, cert.pem())?;
        let inner = Arc::new(Inner {
            options,
            key: signer,
            cert_der: cert.der().to_vec(),
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let task_inner = inner.clone();
        let server = background::spawn("token-issuer", move |_stop| async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    let inner = task_inner.clone();
                    tokio::spawn(async move {
                        let _ = answer(&inner, Conn::new(stream)).await;
                    });
                }
            }
        })?;
        Ok(TokenIssuer {
            addr,
            inner,
            _dir: dir,
            bundle,
            _server: server,
        })
    }

    /// The realm URL to configure in the registry.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The PEM certificate the registry must trust.
    pub fn cert_bundle(&self) -> &Path {
        &self.bundle
    }

    /// How many tokens were handed out.
    pub fn issued(&self) -> u64 {
        self.inner.issued.load(Ordering::SeqCst)
    }

    /// How many token requests were refused.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }
}

async fn answer(inner: &Inner, mut conn: Conn) -> io::Result<()> {
    let Some(head) = conn.read_head().await? else {
        return Ok(());
    };
    let (_, target) = head.method_and_target();
    let url = url::Url::parse(&format!("http://issuer{target}"))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let scopes: Vec<String> = url
        .query_pairs()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let service = url
        .query_pairs()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.to_string());
    let user = match head.header("authorization") {
        None => None,
        Some(value) => {
            let decoded = value
                .strip_prefix("Basic ")
                .and_then(|b| STANDARD.decode(b.trim()).ok())
                .and_then(|b| String::from_utf8(b).ok());
            let known = decoded
                .as_deref()
                .and_then(|pair| pair.split_once(':'))
                .filter(|(u, p)| {
                    inner
                        .options
                        .users
                        .iter()
                        .any(|(uu, pp)| uu == u && pp == p)
                });
            match known {
                Some((user, _)) => Some(user.to_string()),
                None => return refuse(inner, &mut conn, "unknown user or wrong password").await,
            }
        }
    };
    if user.is_none() && !inner.options.anonymous_pull {
        return refuse(inner, &mut conn, "anonymous requests are not allowed").await;
    }
    if service.as_deref() != Some(SERVICE) {
        return refuse(inner, &mut conn, "wrong service").await;
    }
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| *a == "pull" || (*a == "push" && user.is_some()))
                .collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let token = sign(inner, user.as_deref().unwrap_or(""), access)?;
    inner.issued.fetch_add(1, Ordering::SeqCst);
    let advertised = inner
        .options
        .advertised_lifetime
        .unwrap_or(inner.options.lifetime);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": advertised.as_secs(),
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await
}

async fn refuse(inner: &Inner, conn: &mut Conn, why: &str) -> io::Result<()> {
    inner.refused.fetch_add(1, Ordering::SeqCst);
    eprintln!("token issuer: refused: {why}");
    let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await
}

fn sign(inner: &Inner, subject: &str, access: Vec<serde_json::Value>) -> io::Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // The registry tolerates a minute past `exp`; move `exp` back so the token really lives
    // only `lifetime`.
    let exp = now + inner.options.lifetime.as_secs() - REGISTRY_LEEWAY.as_secs().min(now);
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [STANDARD.encode(&inner.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": exp,
        "nbf": now - 120,
        "iat": now - 120,
        "jti": format!("{:016x}", fastrand::u64(..)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = inner
        .key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .map_err(|_| io::Error::other("signing failed"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}
