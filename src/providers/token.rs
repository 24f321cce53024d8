//! Bearer tokens that expire: obtained on first use, refreshed shortly
//! before they expire, forgotten after a 401 so the next call authenticates
//! again, and a token refused again right after that re-authentication
//! reported as such (SPEC §3.4: authentication still refused after one
//! re-authentication is permanent). Shared by api.video and movingimage.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use reqwest::StatusCode;

use super::{ErrorKind, ProviderError};

/// Refresh this long before expiry, or at a fifth of a short lifetime.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Longest lifetime believed: a server's `expires_in` beyond this (or one
/// too large to add to a clock) is taken as this, and the token is renewed
/// after a day like any other.
const LONGEST_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// An access token and how to renew it.
#[derive(Clone)]
pub struct Token {
    /// The bearer value.
    pub access: String,
    /// For the refresh grant.
    pub refresh: Option<String>,
    /// When it stops working.
    pub expires_at: Instant,
    /// Its lifetime when issued (decides the refresh margin).
    pub lifetime: Duration,
    /// Obtained after a refusal and not accepted by the server yet.
    after_refusal: bool,
}

impl Token {
    /// A token issued now, living `lifetime`.
    pub fn new(access: String, refresh: Option<String>, lifetime: Duration) -> Self {
        let lifetime = lifetime.min(LONGEST_LIFETIME);
        Token {
            access,
            refresh,
            expires_at: Instant::now() + lifetime,
            lifetime,
            after_refusal: false,
        }
    }

    fn fresh(&self) -> bool {
        let margin = REFRESH_MARGIN.min(self.lifetime / 5);
        self.expires_at > Instant::now() + margin
    }
}

/// What a 401 on a request made with a token means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Forgotten: authenticate again and retry once.
    Reauthenticate,
    /// The token was the re-authentication after a refusal, and it was
    /// refused too: retrying cannot help.
    StillRefused,
}

/// One provider's current token.
#[derive(Default)]
pub struct TokenCache {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    token: Option<Token>,
    /// A token was refused; the next one obtained is the re-authentication.
    refused: bool,
}

impl TokenCache {
    /// A valid access token. `obtain(Some(refresh))` refreshes,
    /// `obtain(None)` authenticates from the credentials; a failed refresh
    /// falls back to a full authentication.
    ///
    /// # Errors
    /// Whatever `obtain` answers for a full authentication.
    pub async fn bearer<F, Fut>(&self, obtain: F) -> Result<String, ProviderError>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: Future<Output = Result<Token, ProviderError>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(token) = slot.token.as_ref().filter(|t| t.fresh()) {
            return Ok(token.access.clone());
        }
        let refreshed = match slot.token.as_ref().and_then(|t| t.refresh.clone()) {
            Some(refresh) => obtain(Some(refresh)).await.ok(),
            None => None,
        };
        let mut token = match refreshed {
            Some(token) => token,
            None => obtain(None).await?,
        };
        // A re-authentication stays one until the server accepts its token.
        let unproven = slot.token.as_ref().is_some_and(|t| t.after_refusal);
        token.after_refusal = std::mem::take(&mut slot.refused) || unproven;
        let access = token.access.clone();
        slot.token = Some(token);
        Ok(access)
    }

    /// The server refused `access` (a 401): forget it so the next call
    /// authenticates again, unless it was itself that re-authentication.
    /// A refusal of an older token than the current one changes nothing.
    pub async fn refused(&self, access: &str) -> Refusal {
        let mut slot = self.slot.lock().await;
        let Some(current) = slot.token.as_ref().filter(|t| t.access == access) else {
            return Refusal::Reauthenticate;
        };
        let again = current.after_refusal;
        slot.token = None;
        slot.refused = true;
        if again {
            Refusal::StillRefused
        } else {
            Refusal::Reauthenticate
        }
    }

    /// The server accepted `access`: it is no longer an unproven re-authentication.
    pub async fn accepted(&self, access: &str) {
        let mut slot = self.slot.lock().await;
        if let Some(token) = slot.token.as_mut().filter(|t| t.access == access) {
            token.after_refusal = false;
        }
    }

    /// The current token's secrets, to redact from error excerpts.
    pub fn secrets(&self) -> Vec<String> {
        match self.slot.try_lock() {
            Ok(slot) => slot
                .token
                .iter()
                .flat_map(|t| std::iter::once(t.access.clone()).chain(t.refresh.clone()))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// What an operator should check when a login is refused.
pub struct LoginHints {
    /// The address answered 404/405: no login endpoint there.
    pub no_endpoint: &'static str,
    /// Any other client error: the credentials were refused.
    pub refused: &'static str,
}

/// Classify a refused login answer: a client error other than 429 will not
/// change by retrying, so it is permanent; a first login (not a refresh)
/// also names the setting to check.
pub fn login_refused(
    mut error: ProviderError,
    status: StatusCode,
    refreshing: bool,
    hints: LoginHints,
) -> ProviderError {
    if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
        error.kind = ErrorKind::Permanent;
        if !refreshing {
            error.message.push_str(match status.as_u16() {
                404 | 405 => hints.no_endpoint,
                _ => hints.refused,
            });
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_token_refused_right_after_reauthentication_is_final() {
        let issued = AtomicU32::new(0);
        let obtain = |_refresh: Option<String>| {
            let n = issued.fetch_add(1, Ordering::Relaxed);
            async move { Ok(Token::new(format!("t{n}"), None, Duration::from_secs(3600))) }
        };
        let cache = TokenCache::default();
        let first = cache.bearer(obtain).await.unwrap();
        cache.accepted(&first).await;
        assert_eq!(cache.refused(&first).await, Refusal::Reauthenticate);
        let second = cache.bearer(obtain).await.unwrap();
        assert_ne!(first, second);
        // A late refusal of the older token changes nothing.
        assert_eq!(cache.refused(&first).await, Refusal::Reauthenticate);
        assert_eq!(cache.bearer(obtain).await.unwrap(), second);
        assert_eq!(cache.refused(&second).await, Refusal::StillRefused);
        // Once a re-authentication is accepted, a later refusal starts over.
        let third = cache.bearer(obtain).await.unwrap();
        cache.accepted(&third).await;
        assert_eq!(cache.refused(&third).await, Refusal::Reauthenticate);
    }
}
