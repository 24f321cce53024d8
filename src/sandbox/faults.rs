//! Fault injection shared by every simulator: a middleware that, per
//! request, may answer 429 (every Nth request), 500 (before the body is
//! read), 502 (after the request was handled), or mark the request for a
//! dropped connection mid-body; and a
//! bandwidth cap that simulators apply while they read bodies.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{ConnectionReset, Sandbox, SandboxOptions};

/// A request marked to lose its connection after this many body bytes.
#[derive(Debug, Clone, Copy)]
pub struct ResetAfter(pub u64);

/// The dice and the counters.
pub struct Faults {
    rng: Mutex<StdRng>,
    fail_rate: f64,
    reset_rate: f64,
    rate_limit_every: u64,
    retry_after: HeaderValue,
    gateway_rate: f64,
    throttle: Option<f64>,
    next_free: tokio::sync::Mutex<tokio::time::Instant>,
    /// Requests seen (sandbox endpoints excluded).
    pub requests: AtomicU64,
    /// 500s injected.
    pub failures: AtomicU64,
    /// Connections dropped.
    pub resets: AtomicU64,
    /// 429s injected.
    pub rate_limited: AtomicU64,
    /// 502s sent after the request was handled.
    pub gateway_errors: AtomicU64,
    /// Request bodies being received right now.
    pub bodies_in_flight: AtomicU64,
    /// The most request bodies received at once since start: shows that a
    /// client sent parts of a file side by side.
    pub bodies_in_flight_peak: AtomicU64,
}

impl Faults {
    /// Dice from the options.
    pub fn new(options: &SandboxOptions) -> Self {
        Faults {
            rng: Mutex::new(StdRng::seed_from_u64(options.seed)),
            fail_rate: options.fail_rate.clamp(0.0, 1.0),
            reset_rate: options.reset_rate.clamp(0.0, 1.0),
            rate_limit_every: options.rate_limit_every,
            retry_after: HeaderValue::from_str(&options.retry_after)
                .unwrap_or_else(|_| HeaderValue::from_static("1")),
            gateway_rate: options.gateway_rate.clamp(0.0, 1.0),
            throttle: options.throttle.map(|b| b.0 as f64).filter(|b| *b > 0.0),
            next_free: tokio::sync::Mutex::new(tokio::time::Instant::now()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            gateway_errors: AtomicU64::new(0),
            bodies_in_flight: AtomicU64::new(0),
            bodies_in_flight_peak: AtomicU64::new(0),
        }
    }

    fn roll(&self) -> f64 {
        self.rng
            .lock()
            .map(|mut r| r.random::<f64>())
            .unwrap_or(1.0)
    }

    /// Wait so that body bytes never flow faster than `--throttle` across
    /// all requests together.
    pub async fn pace(&self, bytes: usize) {
        let Some(rate) = self.throttle else { return };
        let cost = Duration::from_secs_f64(bytes as f64 / rate);
        let until = {
            let mut next_free = self.next_free.lock().await;
            let start = (*next_free).max(tokio::time::Instant::now());
            *next_free = start + cost;
            *next_free
        };
        tokio::time::sleep_until(until).await;
    }
}

/// The middleware: decide this request's fate before the handler runs.
pub async fn inject(
    State(sandbox): State<Arc<Sandbox>>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.uri().path().starts_with("/_sandbox") {
        return next.run(request).await;
    }
    let faults = &sandbox.faults;
    let n = faults.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if faults.rate_limit_every > 0 && n % faults.rate_limit_every == 0 {
        faults.rate_limited.fetch_add(1, Ordering::Relaxed);
        let mut response =
            (StatusCode::TOO_MANY_REQUESTS, "rate limited by the sandbox").into_response();
        response
            .headers_mut()
            .insert("retry-after", faults.retry_after.clone());
        response
            .headers_mut()
            .insert("x-ratelimit-retry-after", faults.retry_after.clone());
        return response;
    }
    if faults.roll() < faults.fail_rate {
        faults.failures.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response();
    }
    if faults.roll() < faults.reset_rate {
        let length: u64 = request
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        faults.resets.fetch_add(1, Ordering::Relaxed);
        if length == 0
            && let Some(reset) = request.extensions().get::<ConnectionReset>().cloned()
        {
            return reset.drop_connection().await;
        }
        let after = (faults.roll() * length as f64) as u64;
        request.extensions_mut().insert(ResetAfter(after));
    }
    let response = next.run(request).await;
    if faults.gateway_rate > 0.0 && faults.roll() < faults.gateway_rate {
        faults.gateway_errors.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::BAD_GATEWAY,
            "injected: the answer was lost behind a gateway",
        )
            .into_response();
    }
    response
}

/// `GET /_sandbox/stats`: request and fault counters.
pub async fn stats(State(sandbox): State<Arc<Sandbox>>) -> axum::Json<serde_json::Value> {
    let f = &sandbox.faults;
    axum::Json(json!({
        "requests": f.requests.load(Ordering::Relaxed),
        "failures": f.failures.load(Ordering::Relaxed),
        "resets": f.resets.load(Ordering::Relaxed),
        "rate_limited": f.rate_limited.load(Ordering::Relaxed),
        "gateway_errors": f.gateway_errors.load(Ordering::Relaxed),
        "bodies_in_flight_peak": f.bodies_in_flight_peak.load(Ordering::Relaxed),
    }))
}
