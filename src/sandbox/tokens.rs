//! Bearer tokens as the simulated token endpoints hand them out: an access
//! token that expires, a refresh token redeemable once, and counters of how
//! many were issued per grant so tests can see a refresh happen.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::HeaderMap;

/// Seconds since the epoch (simulators compare lifetimes in these).
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One simulated service's tokens.
#[derive(Default)]
pub struct BearerTokens {
    access: Mutex<HashMap<String, f64>>,
    refresh: Mutex<HashSet<String>>,
    by_credentials: AtomicU64,
    by_refresh: AtomicU64,
}

impl BearerTokens {
    /// Issue an access token living `lifetime` seconds and a refresh token;
    /// `refreshed` says which grant asked (for the counters).
    pub fn issue(&self, prefix: &str, lifetime: f64, refreshed: bool) -> (String, String) {
        let access = format!("{prefix}at-{:016x}", rand::random::<u64>());
        let refresh = format!("{prefix}rt-{:016x}", rand::random::<u64>());
        if let (Ok(mut a), Ok(mut r)) = (self.access.lock(), self.refresh.lock()) {
            a.insert(access.clone(), now() + lifetime);
            r.insert(refresh.clone());
        }
        let counter = if refreshed {
            &self.by_refresh
        } else {
            &self.by_credentials
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (access, refresh)
    }

    /// Redeem a refresh token (each works once).
    pub fn redeem(&self, refresh: &str) -> bool {
        self.refresh.lock().is_ok_and(|mut r| r.remove(refresh))
    }

    /// The request carries a live `Authorization: Bearer` token.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        self.access
            .lock()
            .is_ok_and(|a| a.get(bearer).is_some_and(|expires| *expires > now()))
    }

    /// Tokens issued so far: (for credentials, for refresh tokens).
    pub fn grants(&self) -> (u64, u64) {
        (
            self.by_credentials.load(Ordering::Relaxed),
            self.by_refresh.load(Ordering::Relaxed),
        )
    }
}
