//! Bearer tokens that expire: obtained on first use, refreshed shortly
//! before they expire, forgotten after a 401 so the next call authenticates
//! again. Shared by api.video and movingimage.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::ProviderError;

/// Refresh this long before expiry, or at a fifth of a short lifetime.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

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
}

impl Token {
    /// A token issued now, living `lifetime`.
    pub fn new(access: String, refresh: Option<String>, lifetime: Duration) -> Self {
        Token {
            access,
            refresh,
            expires_at: Instant::now() + lifetime,
            lifetime,
        }
    }

    fn fresh(&self) -> bool {
        let margin = REFRESH_MARGIN.min(self.lifetime / 5);
        self.expires_at > Instant::now() + margin
    }
}

/// One provider's current token.
#[derive(Default)]
pub struct TokenCache {
    slot: Mutex<Option<Token>>,
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
        if let Some(token) = slot.as_ref().filter(|t| t.fresh()) {
            return Ok(token.access.clone());
        }
        let refreshed = match slot.as_ref().and_then(|t| t.refresh.clone()) {
            Some(refresh) => obtain(Some(refresh)).await.ok(),
            None => None,
        };
        let token = match refreshed {
            Some(token) => token,
            None => obtain(None).await?,
        };
        let access = token.access.clone();
        *slot = Some(token);
        Ok(access)
    }

    /// Forget the token (after a 401).
    pub async fn forget(&self) {
        *self.slot.lock().await = None;
    }

    /// The current token's secrets, to redact from error excerpts.
    pub fn secrets(&self) -> Vec<String> {
        match self.slot.try_lock() {
            Ok(slot) => slot
                .iter()
                .flat_map(|t| std::iter::once(t.access.clone()).chain(t.refresh.clone()))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}
