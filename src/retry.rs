//! The one backoff policy every provider uses: exponential growth of the
//! ceiling, full jitter below it, a cap, an attempt limit, and the server's
//! `Retry-After` honoured. Whether an answer is worth retrying is each
//! provider's call ([`crate::providers::ErrorKind`]); how long to wait is
//! decided only here.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::RetryConfig;

/// Backoff decisions for one provider.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    config: RetryConfig,
}

impl Backoff {
    /// A policy with these knobs.
    pub fn new(config: RetryConfig) -> Self {
        Backoff { config }
    }

    /// True when `failures` consecutive failed attempts use up the budget.
    pub fn exhausted(&self, failures: u32) -> bool {
        failures >= self.config.max_attempts
    }

    /// The attempt budget.
    pub fn max_attempts(&self) -> u32 {
        self.config.max_attempts
    }

    /// How long to wait after the `failures`-th consecutive failure (1-based):
    /// a uniformly random time below `min(max, initial * 2^(failures-1))`,
    /// but never less than the server's `Retry-After`, itself capped at
    /// `max_backoff` (a server asking for a year is asked again later).
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        let ceiling = self
            .config
            .initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.config.max_backoff);
        let jittered = if ceiling.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..=ceiling)
        };
        match retry_after {
            Some(asked) => jittered.max(asked.min(self.config.max_backoff)),
            None => jittered,
        }
    }
}

/// Parse a `Retry-After` (or `X-RateLimit-Retry-After`) value: delta seconds
/// or an HTTP date. Saturating: an absurd number is a very long wait, never
/// a panic.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_nan() || seconds < 0.0 {
            return None;
        }
        return Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
    }
    let when = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let when = SystemTime::from(when);
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff::new(RetryConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(10),
        })
    }

    #[test]
    fn ceiling_grows_then_caps() {
        let p = policy();
        for _ in 0..200 {
            assert!(p.delay(1, None) <= Duration::from_secs(2));
            assert!(p.delay(2, None) <= Duration::from_secs(4));
            assert!(p.delay(30, None) <= Duration::from_secs(10));
        }
        assert!(!p.exhausted(4));
        assert!(p.exhausted(5));
    }

    #[test]
    fn jitter_spreads() {
        let p = policy();
        let samples: Vec<_> = (0..50).map(|_| p.delay(3, None)).collect();
        assert!(samples.iter().any(|d| *d != samples[0]), "no jitter");
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        for _ in 0..50 {
            assert!(p.delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        }
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn absurd_retry_after_saturates_and_is_capped_at_max_backoff() {
        for absurd in ["1e30", "99999999999999999999999", "inf"] {
            assert_eq!(parse_retry_after(absurd), Some(Duration::MAX), "{absurd}");
        }
        assert_eq!(parse_retry_after("-3"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        let p = policy();
        assert_eq!(p.delay(1, Some(Duration::MAX)), Duration::from_secs(10));
    }
}
