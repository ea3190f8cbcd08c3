//! Retrying transient failures: exponential backoff with jitter, `Retry-After`, and a bounded
//! budget per operation that ends in an error saying what failed and how often.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::{Error, Result};

/// How hard to retry one registry operation (a manifest fetch, a ranged read, a whole blob).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt; it doubles per attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest backoff between two attempts.
    pub max_backoff: Duration,
    /// Longest time an operation may spend retrying before it gives up.
    pub max_elapsed: Duration,
    /// Longest `Retry-After` honoured; a registry that asks for more is given up on.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(300),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// The retry budget of one operation: counts attempts and time, and computes the next wait.
#[derive(Debug)]
pub struct Attempts {
    policy: RetryPolicy,
    started: Instant,
    failures: u32,
}

impl Attempts {
    /// A fresh budget under `policy`.
    pub fn new(policy: &RetryPolicy) -> Self {
        Attempts {
            policy: policy.clone(),
            started: Instant::now(),
            failures: 0,
        }
    }

    /// Records a transient failure of `request`. Returns how long to wait before trying again,
    /// or the final error when the budget is spent.
    pub fn failed(
        &mut self,
        request: &str,
        error: String,
        retry_after: Option<Duration>,
    ) -> Result<Duration> {
        self.failures += 1;
        let exhausted = |last: String| Error::RetriesExhausted {
            request: request.to_string(),
            attempts: self.failures,
            elapsed: self.started.elapsed(),
            last,
        };
        if self.failures >= self.policy.max_attempts {
            return Err(exhausted(error));
        }
        if let Some(wait) = retry_after
            && wait > self.policy.max_retry_after
        {
            return Err(exhausted(format!(
                "{error} (the registry asked to retry after {}s, more than the {}s allowed)",
                wait.as_secs(),
                self.policy.max_retry_after.as_secs()
            )));
        }
        let delay = self.backoff().max(retry_after.unwrap_or_default());
        if self.started.elapsed() + delay > self.policy.max_elapsed {
            return Err(exhausted(format!(
                "{error} (retry time limit of {:?} reached)",
                self.policy.max_elapsed
            )));
        }
        tracing::debug!(
            request,
            attempt = self.failures,
            ?delay,
            "retrying after: {error}"
        );
        Ok(delay)
    }

    /// "Equal jitter": half the exponential step, plus a random part of the other half.
    fn backoff(&self) -> Duration {
        let exponent = self.failures.saturating_sub(1).min(20);
        let step = self
            .policy
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.policy.max_backoff);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Whether an HTTP status is worth retrying: overload, timeouts and server errors.
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// Whether a transport error is worth retrying: resets, timeouts, refused connections, broken
/// bodies. TLS and URL errors are not: a refused certificate or a server that does not speak
/// TLS fails the same way every time.
pub fn is_transient_error(error: &reqwest::Error) -> bool {
    if error.is_builder() || error.is_redirect() || error.is_decode() {
        return false;
    }
    if tls_error(error).is_some() {
        return false;
    }
    let chain = crate::error::error_chain(error).to_ascii_lowercase();
    if chain.contains("certificate") || chain.contains("invalid dns name") {
        return false;
    }
    if unknown_host(&chain) {
        return false;
    }
    error.is_timeout() || error.is_connect() || error.is_request() || error.is_body()
}

/// Whether a (lower-cased) error chain says the host name does not exist: the resolver's
/// answer, not a passing failure (a temporary failure in name resolution is retried).
fn unknown_host(chain: &str) -> bool {
    chain.contains("name or service not known")
        || chain.contains("no address associated with hostname")
        || chain.contains("nodename nor servname provided")
}

/// A transport error in words, with a hint when the server answered TLS with something else
/// (a registry that serves plain HTTP, reached as HTTPS).
pub fn describe_error(error: &reqwest::Error) -> String {
    let chain = crate::error::error_chain(error);
    match tls_error(error) {
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
            format!(
                "{chain} (the server does not speak TLS; if the registry serves plain HTTP, \
                 name it with --insecure-registry)"
            )
        }
        _ if unknown_host(&chain.to_ascii_lowercase()) => format!(
            "{chain} (the registry's host name does not resolve: check the image reference, or \
             this machine's DNS)"
        ),
        _ => chain,
    }
}

/// The TLS error behind a transport error, if the failure was in TLS.
fn tls_error(error: &reqwest::Error) -> Option<&rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // TLS errors arrive nested in io::Errors, whose source() skips the error they wrap.
        cause = match e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn an_unknown_host_is_told_apart_from_a_passing_resolver_failure() {
        assert!(unknown_host(
            "dns error: failed to lookup address information: name or service not known"
        ));
        assert!(!unknown_host(
            "dns error: failed to lookup address information: temporary failure in name resolution"
        ));
    }

    #[test]
    fn budget_ends_in_a_clear_error() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let mut attempts = Attempts::new(&policy);
        assert!(attempts.failed("GET x", "HTTP 503".into(), None).is_ok());
        assert!(attempts.failed("GET x", "HTTP 503".into(), None).is_ok());
        let err = attempts
            .failed("GET x", "HTTP 503".into(), None)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("GET x: gave up after 3 attempts"),
            "{err}"
        );
    }

    #[test]
    fn retry_after_wins_over_shorter_backoff_and_is_capped() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_retry_after: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        let mut attempts = Attempts::new(&policy);
        let wait = attempts
            .failed("GET x", "HTTP 429".into(), Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(wait, Duration::from_secs(2));
        let err = attempts
            .failed("GET x", "HTTP 429".into(), Some(Duration::from_secs(3600)))
            .unwrap_err();
        assert!(err.to_string().contains("retry after 3600s"), "{err}");
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let policy = RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(3600),
            ..RetryPolicy::default()
        };
        let mut attempts = Attempts::new(&policy);
        let first = attempts.failed("x", "e".into(), None).unwrap();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            let wait = attempts.failed("x", "e".into(), None).unwrap();
            assert!(wait <= Duration::from_secs(1));
        }
    }

    #[test]
    fn parses_retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(30);
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
