//! HTTP plumbing shared by the network providers: one client per provider
//! (rustls), and the default reading of an HTTP failure (transport errors,
//! 408/429/5xx transient with `Retry-After`; other 4xx permanent). Each
//! provider refines this for its own documented answers.

use std::time::Duration;

use reqwest::{Response, StatusCode};

use super::{ErrorKind, ProviderError};
use crate::retry::parse_retry_after;

/// Longest excerpt of a provider's answer kept for error reports.
const EXCERPT_LIMIT: usize = 400;

/// A client with the provider's per-request timeout.
///
/// # Errors
/// A permanent error when the TLS stack cannot be set up.
pub fn client(timeout: Duration) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .read_timeout(timeout)
        .user_agent(concat!("hotfolder/", env!("CARGO_PKG_VERSION")))
        // Below common server keep-alive limits (Node's is 5 s), so a pooled
        // connection is not reused just as the server closes it.
        .pool_idle_timeout(Duration::from_secs(4))
        .build()
        .map_err(|e| {
            ProviderError::new(
                ErrorKind::Permanent,
                format!("cannot build HTTP client: {e}"),
            )
        })
}

/// A request that never got an answer: always worth retrying.
pub fn transport_error(what: &str, error: &reqwest::Error) -> ProviderError {
    // The innermost cause is the useful one (e.g. "connection reset by peer").
    let mut source: &dyn std::error::Error = error;
    while let Some(next) = source.source() {
        source = next;
    }
    let cause = if error.is_timeout() {
        "timed out".to_string()
    } else if error.is_connect() {
        // Name the server an operator has to check (a wrong endpoint, a
        // server down) by host and port only.
        let server = error
            .url()
            .and_then(|u| {
                Some(format!(
                    " to {}:{}",
                    u.host_str()?,
                    u.port_or_known_default()?
                ))
            })
            .unwrap_or_default();
        format!("could not connect{server} ({source})")
    } else {
        source.to_string()
    };
    // reqwest's message carries the whole URL, whose path or query may embed
    // a token: leave it out.
    let mut failed = ProviderError::new(ErrorKind::Transient, format!("{what}: {cause}"));
    // No connection: the request never reached a server.
    failed.unsent = error.is_connect();
    failed
}

/// The server's requested wait, from `Retry-After` or `X-RateLimit-Retry-After`.
pub fn retry_after(response: &Response) -> Option<Duration> {
    ["retry-after", "x-ratelimit-retry-after"]
        .iter()
        .find_map(|name| {
            response
                .headers()
                .get(*name)?
                .to_str()
                .ok()
                .and_then(parse_retry_after)
        })
}

/// Default classification of a status.
pub fn kind_of(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    }
}

/// An error for an unexpected answer, with status, `Retry-After`, and an
/// excerpt of the body with `secrets` removed.
pub async fn status_error(what: &str, response: Response, secrets: &[&str]) -> ProviderError {
    let status = response.status();
    let wait = retry_after(&response);
    let body = response.text().await.unwrap_or_default();
    let excerpt = excerpt(&body, secrets);
    let mut message = format!("{what}: the server answered {status}");
    if let Some(text) = &excerpt {
        message.push_str(&format!(" ({text})"));
    }
    ProviderError {
        kind: kind_of(status),
        message,
        status: Some(status.as_u16()),
        excerpt,
        retry_after: wait,
        unsent: false,
    }
}

/// A delete whose object is already gone (404) did what was asked.
///
/// # Errors
/// Any other failure of the delete.
pub fn gone_is_deleted<T>(result: Result<T, ProviderError>) -> Result<(), ProviderError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.status == Some(404) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Trim and redact an answer body for reports.
pub fn excerpt(body: &str, secrets: &[&str]) -> Option<String> {
    let mut text: String = body.trim().chars().take(EXCERPT_LIMIT).collect();
    if text.is_empty() {
        return None;
    }
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        text = text.replace(secret, "***");
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_redaction() {
        assert_eq!(kind_of(StatusCode::TOO_MANY_REQUESTS), ErrorKind::Transient);
        assert_eq!(kind_of(StatusCode::BAD_GATEWAY), ErrorKind::Transient);
        assert_eq!(kind_of(StatusCode::UNAUTHORIZED), ErrorKind::Permanent);
        assert_eq!(
            excerpt("  token abc123 bad ", &["abc123"]).unwrap(),
            "token *** bad"
        );
        assert_eq!(excerpt("", &[]), None);
        assert_eq!(
            excerpt(&"x".repeat(1000), &[]).unwrap().len(),
            EXCERPT_LIMIT
        );
    }
}
