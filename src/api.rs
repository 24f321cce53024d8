//! The HTTP status API (SPEC §5) when `http.listen` is set: `/healthz`,
//! `/metrics` (Prometheus text), `/api/jobs` (filter with `?state=`),
//! `/api/jobs/{id}`, `POST /api/jobs/{id}/retry`, `/api/nodes` (a fleet's
//! nodes), and the status page at
//! `/`. With `http.token`, every route but `/healthz` and the page (a shell
//! holding no data) needs `Authorization: Bearer TOKEN`. Answers never
//! carry secrets: job views hold no session, URLs or credentials.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::jobs::JobsHandle;
use crate::jobs::{self, JobView};
use crate::metrics::{self, Measured};
use crate::pause::{PauseError, Scope};
use crate::state::{JobState, JobStore, StoreError};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::NotFound(id) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// Bind and serve until shutdown.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    ctx: JobsHandle,
    listen: &str,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "HTTP status API listening");
    let app = router(ctx);
    Ok(tokio::spawn(async move {
        let stopped = async move { crate::shutdown::stopped(&mut shutdown).await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "HTTP status API stopped");
        }
    }))
}

/// The routes, with bearer auth on all but `/healthz`.
pub fn router(ctx: JobsHandle) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/jobs", get(list))
        .route("/api/nodes", get(nodes))
        .route("/api/jobs/{id}", get(show))
        .route("/api/jobs/{id}/retry", post(retry))
        .route("/api/pauses", get(pauses))
        .route("/api/webhooks", get(webhooks))
        .route("/api/pause", post(pause))
        .route("/api/resume", post(resume))
        .route("/api/reload", post(reload))
        .route("/api/overview", get(overview))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), authorize));
    // The page is a shell with no data: it asks for the token and sends
    // it as a header (a browser cannot add one when it opens a page).
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(protected)
        .with_state(ctx)
}

/// The status page: self-contained (no external assets), it polls `/api/jobs`.
const STATUS_PAGE: &str = include_str!("status_page.html");

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        STATUS_PAGE,
    )
        .into_response()
}

async fn authorize(State(ctx): State<JobsHandle>, request: Request, next: Next) -> Response {
    let config = ctx.config.get();
    let Some(token) = config.http.as_ref().and_then(|h| h.token.as_ref()) else {
        return next.run(request).await;
    };
    let expected = format!("Bearer {}", token.expose());
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        next.run(request).await
    } else {
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        response
    }
}

/// Compare without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct Filter {
    /// Only jobs in this state.
    state: Option<String>,
    /// At most this many (default [`PAGE_DEFAULT`], at most [`PAGE_MAX`]).
    limit: Option<usize>,
    /// Jobs after this id (before it with `newest`): the next page.
    after: Option<u64>,
    /// Newest first (`newest=1`), as the status page shows them.
    newest: Option<u8>,
}

/// Jobs in one `/api/jobs` answer unless `limit` says otherwise.
const PAGE_DEFAULT: usize = 100;
/// The most jobs one answer holds: a page costs the same however long the
/// history is.
const PAGE_MAX: usize = 1000;

async fn list(State(ctx): State<JobsHandle>, Query(filter): Query<Filter>) -> Response {
    let state = match filter.state.as_deref() {
        None => None,
        Some(name) => match JobState::named(name) {
            Some(state) => Some(state),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "no state {name:?}; states are queued, creating, uploading, finalizing, filing, done, failing, failed, superseded"
                    ),
                );
            }
        },
    };
    let page = crate::state::Page {
        after: filter.after,
        limit: filter.limit.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX),
        state,
        newest_first: filter.newest.is_some_and(|n| n != 0),
    };
    match ctx.store.page(&page).await {
        Ok(jobs) => {
            let rows: Vec<JobView> = jobs
                .iter()
                .map(|job| JobView::of(job, ctx.progress.get(job.id)))
                .collect();
            Json(rows).into_response()
        }
        Err(e) => store_error(&e),
    }
}

async fn show(State(ctx): State<JobsHandle>, Path(id): Path<u64>) -> Response {
    match ctx.store.get(id).await {
        Ok(job) => Json(JobView::of(&job, ctx.progress.get(id))).into_response(),
        Err(e) => store_error(&e),
    }
}

async fn retry(State(ctx): State<JobsHandle>, Path(id): Path<u64>) -> Response {
    match jobs::retry(&ctx.store, &ctx.config.get(), &ctx.held, id).await {
        Ok(job) => {
            let view = JobView::of(&job, None);
            ctx.queue(job);
            Json(view).into_response()
        }
        Err(jobs::RetryError::Store(e)) => store_error(&e),
        Err(e @ jobs::RetryError::NotFailed { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

/// Webhook events waiting for their receiver, oldest first (no URL: the
/// webhook's scheme and host only).
async fn webhooks(State(ctx): State<JobsHandle>) -> Response {
    match ctx.store.outbox(1000).await {
        Ok(waiting) => Json(
            waiting
                .iter()
                .map(crate::notify::WaitingView::of)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => store_error(&e),
    }
}

/// `?provider=NAME` or `?watch=NAME` (neither: everything). Anything
/// else is refused: a misspelled `?provder=` must not pause everything.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeQuery {
    provider: Option<String>,
    watch: Option<String>,
}

/// Read the config file again: 200 with what changed, or 422 with why the
/// file was refused (the running config stays).
async fn reload(State(ctx): State<JobsHandle>) -> Response {
    match crate::reload::ask(ctx.reload.as_ref()).await {
        Ok(changes) => Json(changes).into_response(),
        Err(why) => error(StatusCode::UNPROCESSABLE_ENTITY, why),
    }
}

/// One provider on the status page.
#[derive(serde::Serialize)]
struct ProviderOverview {
    name: String,
    /// Its `type:` ("" for one a reload removed that still has jobs, and
    /// for the row named "" of jobs that failed before they were routed).
    kind: &'static str,
    /// Queued and in flight now; done and failed since midnight here.
    #[serde(flatten)]
    counts: crate::state::ProviderCounts,
    /// Its uploads in flight on this node, added up.
    bytes_per_second: f64,
    /// Its own limit in force (`None`: none configured, or off now).
    bandwidth_limit: Option<u64>,
    /// Its configured limit, as written.
    bandwidth: Option<String>,
    paused: bool,
}

/// What the status page shows above the jobs: per provider its jobs
/// (queued, in flight, done and failed since midnight here), its rate, its
/// limit and its pause; the watches and theirs; everything's limit and
/// pause; and the webhook events whose receiver refused or missed a try.
async fn overview(State(ctx): State<JobsHandle>) -> Response {
    let config = ctx.config.get();
    let now = jiff::Zoned::now();
    let midnight = now
        .start_of_day()
        .map_or_else(|_| now.timestamp(), |z| z.timestamp());
    let counts = match ctx.store.provider_counts(midnight).await {
        Ok(counts) => counts,
        Err(e) => return store_error(&e),
    };
    let rates = ctx.progress.rates_by_provider();
    let limits = ctx.bandwidth.limits();
    let limit_of = |scope: &str, name: &str| {
        limits
            .iter()
            .find(|(s, n, _)| *s == scope && n == name)
            .and_then(|(_, _, rate)| *rate)
    };
    let paused = ctx.pauses.current();
    let mut names: Vec<&String> = config.providers.keys().collect();
    // A provider a reload removed that still has jobs, and "" for jobs
    // that failed before they were routed.
    names.extend(counts.keys().filter(|n| !config.providers.contains_key(*n)));
    let providers: Vec<ProviderOverview> = names
        .into_iter()
        .map(|name| {
            let configured = config.providers.get(name);
            ProviderOverview {
                name: name.clone(),
                kind: configured.map_or("", |p| p.kind.type_name()),
                counts: counts.get(name).copied().unwrap_or_default(),
                bytes_per_second: rates.get(name).copied().unwrap_or(0.0),
                bandwidth_limit: limit_of("provider", name),
                bandwidth: configured
                    .and_then(|p| p.bandwidth.as_ref())
                    .map(ToString::to_string),
                paused: paused.contains(&Scope::Provider(name.clone())),
            }
        })
        .collect();
    let watches: Vec<serde_json::Value> = config
        .watches
        .iter()
        .map(
            |w| json!({ "name": w.name, "paused": paused.contains(&Scope::Watch(w.name.clone())) }),
        )
        .collect();
    let failing: Vec<crate::notify::WaitingView> = match ctx.webhook_events_waiting(1000).await {
        Ok(waiting) => waiting
            .iter()
            .filter(|n| n.is_failing())
            .map(crate::notify::WaitingView::of)
            .collect(),
        Err(e) => return store_error(&e),
    };
    Json(json!({
        "since": midnight,
        "paused": paused.contains(&Scope::All),
        "bandwidth_limit": limit_of("all", ""),
        "bandwidth": config.bandwidth.as_ref().map(ToString::to_string),
        "providers": providers,
        "watches": watches,
        "webhooks_failing": failing,
    }))
    .into_response()
}

/// The paused scopes.
async fn pauses(State(ctx): State<JobsHandle>) -> Response {
    Json(ctx.pauses.current()).into_response()
}

async fn pause(State(ctx): State<JobsHandle>, Query(scope): Query<ScopeQuery>) -> Response {
    change_pause(&ctx, scope, true).await
}

async fn resume(State(ctx): State<JobsHandle>, Query(scope): Query<ScopeQuery>) -> Response {
    change_pause(&ctx, scope, false).await
}

/// Pause or resume; answers the paused scopes afterwards.
async fn change_pause(ctx: &JobsHandle, query: ScopeQuery, paused: bool) -> Response {
    let changed = match Scope::named(query.provider, query.watch) {
        Ok(scope) => ctx.change_pause(scope, paused).await,
        Err(e) => Err(e),
    };
    match changed {
        Ok(scopes) => Json(scopes).into_response(),
        Err(PauseError::Store(e)) => store_error(&e),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

/// The nodes of a fleet sharing this store (an empty list on a single box).
async fn nodes(State(ctx): State<JobsHandle>) -> Response {
    match ctx.store.nodes().await {
        Ok(nodes) => Json(nodes).into_response(),
        Err(e) => store_error(&e),
    }
}

async fn metrics(State(ctx): State<JobsHandle>) -> Response {
    let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
    for state in crate::lifecycle::STATES {
        by_state.insert(state.as_str(), 0);
    }
    let mut unfinished = 0;
    for (state, n) in ctx.store.counts().await {
        *by_state.entry(state.as_str()).or_default() += n;
        if !state.is_terminal() {
            unfinished += n;
        }
    }
    let in_flight = ctx.progress.in_flight() as f64;
    let waiting = unfinished as f64 - in_flight;
    let mut measured: Vec<Measured> = by_state
        .into_iter()
        .map(|(state, n)| {
            Measured::new(&metrics::JOBS, vec![("state", state.to_string())], n as f64)
        })
        .collect();
    measured.push(Measured::new(
        &metrics::QUEUE_DEPTH,
        vec![],
        waiting.max(0.0),
    ));
    measured.push(Measured::new(
        &metrics::UPLOADS_IN_FLIGHT,
        vec![],
        in_flight,
    ));
    if matches!(ctx.store, crate::state::Store::Postgres(_)) {
        measured.push(Measured::new(
            &metrics::STORE_UP,
            vec![],
            if ctx.store_health.is_down() { 0.0 } else { 1.0 },
        ));
        measured.push(Measured::count(
            &metrics::STORE_OUTAGES,
            vec![],
            ctx.store_health
                .outages
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
    }
    for scope in ctx.pauses.current() {
        let (kind, name) = match &scope {
            Scope::All => ("all", String::new()),
            Scope::Provider(p) => ("provider", p.clone()),
            Scope::Watch(w) => ("watch", w.clone()),
        };
        measured.push(Measured::new(
            &metrics::PAUSED,
            vec![("scope", kind.to_string()), ("name", name)],
            1.0,
        ));
    }
    if let Some(notifier) = &ctx.notifier
        && !notifier.is_empty()
    {
        use std::sync::atomic::Ordering;
        let waiting = ctx.store.outbox(usize::MAX).await.unwrap_or_default();
        measured.push(Measured::new(
            &metrics::WEBHOOKS_WAITING,
            vec![],
            waiting.len() as f64,
        ));
        measured.push(Measured::new(
            &metrics::WEBHOOKS_FAILING,
            vec![],
            waiting.iter().filter(|n| n.is_failing()).count() as f64,
        ));
        measured.push(Measured::count(
            &metrics::WEBHOOK_DELIVERIES,
            vec![],
            notifier.delivered.load(Ordering::Relaxed),
        ));
        measured.push(Measured::count(
            &metrics::WEBHOOK_FAILED_TRIES,
            vec![],
            notifier.failed_tries.load(Ordering::Relaxed),
        ));
    }
    for (scope, name, rate) in ctx.bandwidth.limits() {
        measured.push(Measured::new(
            &metrics::BANDWIDTH_LIMIT,
            vec![("scope", scope.to_string()), ("name", name)],
            rate.unwrap_or(0) as f64,
        ));
    }
    if let Some((requested, flushed)) = ctx.store.durability_counts() {
        measured.push(Measured::count(
            &metrics::STORE_DURABLE_WRITES,
            vec![],
            requested,
        ));
        measured.push(Measured::count(&metrics::STORE_FLUSHES, vec![], flushed));
    }
    if let Some(written) = ctx.store.records_written() {
        measured.push(Measured::count(
            &metrics::STORE_RECORDS_WRITTEN,
            vec![],
            written,
        ));
    }
    if let Some((in_use, held)) = crate::memory::heap_recent() {
        measured.push(Measured::new(&metrics::HEAP_IN_USE, vec![], in_use as f64));
        measured.push(Measured::new(&metrics::HEAP_HELD, vec![], held as f64));
    }
    let counters = ctx.watch_counters.get();
    let mut watches: Vec<_> = counters.iter().collect();
    watches.sort_by_key(|(name, _)| name.as_str());
    for (watch, counters) in &watches {
        use std::sync::atomic::Ordering;
        let by_watch = || vec![("watch", (*watch).clone())];
        measured.push(Measured::count(
            &metrics::FILES_DETECTED,
            by_watch(),
            counters.detected.load(Ordering::Relaxed),
        ));
        measured.push(Measured::count(
            &metrics::FILES_VANISHED,
            by_watch(),
            counters.vanished.load(Ordering::Relaxed),
        ));
        measured.push(Measured::count(
            &metrics::SCANS,
            by_watch(),
            counters.scans.load(Ordering::Relaxed),
        ));
    }
    for (watch, counters) in &watches {
        for (reason, n) in counters.skipped.snapshot() {
            measured.push(Measured::count(
                &metrics::FILES_SKIPPED,
                vec![("watch", (*watch).clone()), ("reason", reason.to_string())],
                n,
            ));
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.render(&measured),
    )
        .into_response()
}
