//! The appliance: watches feed ready files in, each becomes a job in the
//! store before any work, workers run jobs within `workers` and each
//! provider's `max_concurrent`, and finished jobs are filed. On shutdown the
//! daemon stops taking work, lets in-flight chunks checkpoint within
//! `shutdown_timeout`, flushes the store and returns.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{AfterSuccess, Config, Duplicates, Unmatched, WatchConfig};
use crate::finish::{self, DuplicateOf, ErrorReport, Receipt};
use crate::providers::{ErrorKind, ProviderError, Uploader};
use crate::route::{FileFacts, Router};
use crate::state::{Job, JobState, Store, StoreError};
use crate::upload::progress::ProgressBoard;
use crate::upload::{AttemptEnd, Engine, ProviderHandle, note_failure};
use crate::watch::{ReadyFile, WatchCommand, WatchCounters};

/// Everything a job task needs, shared.
pub struct Context {
    /// The configuration.
    pub config: Config,
    /// The job store.
    pub store: Store,
    /// The upload engine.
    pub engine: Engine,
    /// Providers by name.
    pub providers: BTreeMap<String, Arc<ProviderHandle>>,
    /// `workers` permits.
    pub workers: Arc<Semaphore>,
    /// Live progress.
    pub progress: ProgressBoard,
    /// Watch counters by watch name.
    pub watch_counters: HashMap<String, Arc<WatchCounters>>,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    watch_commands: HashMap<String, mpsc::UnboundedSender<WatchCommand>>,
    router: Router,
    new_jobs: mpsc::UnboundedSender<Job>,
}

impl Context {
    /// Everything job tasks share, for the daemon and for `hotfolder upload`
    /// (which has no watches). Jobs handed to [`Context::spawn_job`] come out
    /// of the returned receiver, to be run with [`run_job`].
    pub fn new(
        config: Config,
        store: Store,
        shutdown: watch::Receiver<bool>,
        watch_commands: HashMap<String, mpsc::UnboundedSender<WatchCommand>>,
        watch_counters: HashMap<String, Arc<WatchCounters>>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Job>) {
        let progress = ProgressBoard::default();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let engine = Engine {
            store: store.clone(),
            progress: progress.clone(),
            shutdown,
            metrics: Arc::clone(&metrics),
        };
        let providers = config
            .providers
            .iter()
            .map(|(name, p)| (name.clone(), Arc::new(ProviderHandle::new(p))))
            .collect();
        let (job_tx, job_rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(Context {
            router: Router::new(&config),
            workers: Arc::new(Semaphore::new(config.workers)),
            config,
            store,
            engine,
            providers,
            progress,
            metrics,
            watch_counters,
            watch_commands,
            new_jobs: job_tx,
        });
        (ctx, job_rx)
    }

    fn watch(&self, name: &str) -> Option<&WatchConfig> {
        self.config.watches.iter().find(|w| w.name == name)
    }

    /// Queue a job (already stored) for a worker.
    pub fn spawn_job(&self, job: Job) {
        let _ = self.new_jobs.send(job);
    }
}

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP status API could not listen.
    #[error(
        "cannot listen on http.listen {listen}: {source}; choose a free address or remove `http:`"
    )]
    Http {
        /// The configured address.
        listen: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The control socket could not be set up.
    #[error("cannot open the control socket {path}: {source}")]
    Control {
        /// Socket path.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Run the appliance until `shutdown` resolves.
///
/// # Errors
/// [`DaemonError`] when it cannot start; run-time problems are logged and
/// recorded on their jobs instead.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let store = Store::open(&config.state_dir)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<ReadyFile>(1024);
    let skip_roots: Vec<_> = config
        .watches
        .iter()
        .flat_map(|w| [w.done_dir.clone(), w.failed_dir.clone()])
        .collect();
    let mut watch_tasks = JoinSet::new();
    let mut watch_commands = HashMap::new();
    let mut watch_counters = HashMap::new();
    for watch in &config.watches {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(WatchCounters::default());
        watch_commands.insert(watch.name.clone(), cmd_tx);
        watch_counters.insert(watch.name.clone(), Arc::clone(&counters));
        watch_tasks.spawn(crate::watch::run(
            watch.clone(),
            skip_roots.clone(),
            ready_tx.clone(),
            cmd_rx,
            stop_rx.clone(),
            counters,
        ));
    }
    drop(ready_tx);
    let (ctx, mut job_rx) = Context::new(
        config,
        store,
        stop_rx.clone(),
        watch_commands,
        watch_counters,
    );
    let api = match &ctx.config.http {
        Some(http) => Some(
            crate::api::serve(Arc::clone(&ctx), &http.listen, stop_rx.clone())
                .await
                .map_err(|source| DaemonError::Http {
                    listen: http.listen.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let control = crate::control::serve(Arc::clone(&ctx), stop_rx.clone())
        .map_err(|(path, source)| DaemonError::Control { path, source })?;

    // Resume what was in flight.
    let mut resumed = 0;
    for job in ctx.store.all()? {
        if !job.state.is_terminal() {
            resumed += 1;
            ctx.spawn_job(job);
        }
    }
    tracing::info!(
        watches = ctx.config.watches.len(),
        workers = ctx.config.workers,
        resumed,
        "hotfolder running"
    );

    let mut jobs = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(file) = ready_rx.recv() => {
                if let Err(e) = take_file(&ctx, file).await {
                    tracing::error!(error = %e, "cannot record a new job");
                }
            }
            Some(job) = job_rx.recv() => {
                jobs.spawn(run_job(Arc::clone(&ctx), job));
            }
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
        }
    }

    tracing::info!(in_flight = jobs.len(), "shutting down: taking no new work");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::sleep(ctx.config.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => {
                tracing::warn!(left = jobs.len(), "shutdown_timeout reached; stopping remaining jobs at their last checkpoint");
                jobs.abort_all();
                while jobs.join_next().await.is_some() {}
                break;
            }
            next = jobs.join_next() => if next.is_none() { break },
        }
    }
    watch_tasks.abort_all();
    control.abort();
    if let Some(api) = api {
        let _ = api.await;
    }
    ctx.store.flush().await?;
    crate::control::remove_socket(&ctx.config.state_dir);
    tracing::info!("stopped; state flushed");
    Ok(())
}

/// A watch offers a complete file: unless a job already covers this version
/// of it, route it and record a job.
async fn take_file(ctx: &Arc<Context>, file: ReadyFile) -> Result<(), StoreError> {
    if let Some(job) = ctx.store.latest_for(&file.watch, &file.relpath)? {
        // The very file a finished job left in place (after_success: leave, or
        // a failure that could not be filed) is not taken again; a new file
        // under the same name (another inode, or the old one was moved away)
        // is, and the duplicate check decides whether it is uploaded.
        let same_file = job.signature == file.signature;
        let left_in_place = job.filed_to.is_none() && job.source == file.path;
        if !job.state.is_terminal()
            || (same_file && left_in_place && job.state != JobState::Superseded)
        {
            tracing::debug!(job = job.id, state = job.state.as_str(), file = %file.relpath.display(), "already covered by a job; not taken again");
            return Ok(());
        }
    }
    let mut job = Job::new(
        ctx.store.next_id()?,
        &file.watch,
        &file.relpath,
        &file.path,
        file.signature,
        "",
    );
    let failure = match route_job(ctx, &mut job, file.mtime) {
        Ok(true) => None,
        Ok(false) if ctx.router.unmatched() == Unmatched::Leave => {
            tracing::info!(watch = %file.watch, file = %file.relpath.display(), "no rule matches; left in place (unmatched: leave)");
            return Ok(());
        }
        Ok(false) => Some(unmatched_reason(&job)),
        Err(reason) => Some(reason),
    };
    if let Some(reason) = failure {
        note_failure(&mut job, &ProviderError::new(ErrorKind::Permanent, reason));
        job.transition(JobState::Failing)?;
    }
    ctx.store.put(&mut job).await?;
    tracing::info!(job = job.id, watch = %job.watch, file = %job.relpath.display(), provider = %job.provider, "new job");
    ctx.spawn_job(job);
    Ok(())
}

/// Route `job`'s source by the rules as they and its sidecar are now:
/// provider, rule, metadata, sidecar. `Ok(false)` when no rule matches;
/// `Err` with the reason when it cannot be routed (a broken sidecar). The
/// sidecar is recorded either way so that it travels with the file.
fn route_job(ctx: &Context, job: &mut Job, mtime: SystemTime) -> Result<bool, String> {
    let routed = ctx.router.route(&FileFacts {
        watch: &job.watch,
        relpath: &job.relpath,
        path: &job.source,
        size: job.signature.size,
        mtime,
    });
    match routed {
        Ok(Some(route)) => {
            job.provider = route.provider;
            job.rule = Some(route.rule);
            job.metadata = route.metadata;
            job.sidecar = route.sidecar;
            job.skip_duplicates = route.duplicates == Duplicates::Skip;
            Ok(true)
        }
        Ok(None) => {
            job.sidecar = crate::route::find_sidecar(&job.source);
            Ok(false)
        }
        Err(e) => {
            job.sidecar = crate::route::find_sidecar(&job.source);
            Err(e.0)
        }
    }
}

fn unmatched_reason(job: &Job) -> String {
    format!(
        "no rule matches {}; add a rule for it or set `unmatched: leave`",
        job.relpath.display()
    )
}

/// A job that failed before any rule took it (a broken sidecar, no rule
/// matching) has no provider. When it is retried, the operator has fixed the
/// sidecar or the rules, so route it again instead of failing it for lack of
/// a provider.
async fn route_retried(ctx: &Context, job: &mut Job) -> Result<(), StoreError> {
    let mtime = std::fs::metadata(&job.source)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let failure = match route_job(ctx, job, mtime) {
        Ok(true) => None,
        Ok(false) => Some(unmatched_reason(job)),
        Err(reason) => Some(reason),
    };
    if let Some(reason) = failure {
        note_failure(job, &ProviderError::new(ErrorKind::Permanent, reason));
        job.transition(JobState::Failing)?;
    } else {
        tracing::info!(provider = %job.provider, "retried job routed");
    }
    ctx.store.put(job).await
}

/// Never routed: no rule was applied, and it came from a watch (one-shot
/// uploads name their provider and have no watch).
fn unrouted(job: &Job) -> bool {
    job.state == JobState::Queued && job.rule.is_none() && !job.watch.is_empty()
}

/// Drive one job to a terminal state, or until shutdown.
pub async fn run_job(ctx: Arc<Context>, mut job: Job) {
    let span = tracing::info_span!("job", id = job.id, file = %job.relpath.display(), provider = %job.provider);
    let _ = tracing::Instrument::instrument(drive(&ctx, &mut job), span).await;
}

async fn drive(ctx: &Arc<Context>, job: &mut Job) -> Result<(), StoreError> {
    let mut shutdown = ctx.engine.shutdown.clone();
    loop {
        match job.state {
            JobState::Done | JobState::Failed | JobState::Superseded => return Ok(()),
            JobState::Filing => return file_done(ctx, job).await,
            JobState::Failing => return file_failed(ctx, job).await,
            _ => {}
        }
        if unrouted(job) {
            route_retried(ctx, job).await?;
            continue;
        }
        let Some(handle) = ctx.providers.get(&job.provider).cloned() else {
            let reason = format!(
                "provider {:?} is no longer in the config; add it back and `hotfolder retry {}`",
                job.provider, job.id
            );
            note_failure(job, &ProviderError::new(ErrorKind::Permanent, reason));
            job.transition(JobState::Failing)?;
            ctx.store.put(job).await?;
            continue;
        };
        let permits = tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return Ok(()),
            permits = async {
                let provider = Arc::clone(&handle.permits).acquire_owned().await;
                let worker = Arc::clone(&ctx.workers).acquire_owned().await;
                (provider, worker)
            } => permits,
        };
        job.attempts += 1;
        let end = ctx.engine.attempt(job, &handle).await;
        drop(permits);
        match end {
            AttemptEnd::Delivered(delivery) => {
                tracing::info!(remote = %delivery.remote_id, "delivered");
                let seconds = job
                    .started_at
                    .map(|started| (jiff::Timestamp::now() - started).get_seconds() as f64);
                ctx.metrics
                    .upload_finished(&job.provider, "delivered", seconds);
                job.delivery = Some(delivery);
                if let Some(fingerprint) = &job.fingerprint {
                    ctx.store
                        .record_delivery(&job.provider, fingerprint, job.id)?;
                }
                job.transition(JobState::Filing)?;
                ctx.store.put(job).await?;
            }
            AttemptEnd::Duplicate(earlier) => {
                tracing::info!(
                    earlier,
                    "same content already delivered to this provider; skipped"
                );
                ctx.metrics
                    .upload_finished(&job.provider, "duplicate", None);
                job.duplicate_of = Some(earlier);
                job.transition(JobState::Filing)?;
                ctx.store.put(job).await?;
            }
            AttemptEnd::Failed(error) => {
                note_failure(job, &error);
                job.failures += 1;
                let permanent = matches!(error.kind, ErrorKind::Permanent | ErrorKind::Unavailable);
                if permanent || handle.backoff.exhausted(job.failures) {
                    tracing::error!(error = %error, attempts = job.attempts, "job failed");
                    ctx.metrics.upload_finished(&job.provider, "failed", None);
                    job.transition(JobState::Failing)?;
                    ctx.store.put(job).await?;
                    continue;
                }
                let reason = match error.status {
                    Some(status) => format!("http_{status}"),
                    None => format!("{:?}", error.kind).to_ascii_lowercase(),
                };
                ctx.metrics.add(
                    "hotfolder_retries_total",
                    vec![("provider", job.provider.clone()), ("reason", reason)],
                    1,
                );
                let delay = handle.backoff.delay(job.failures, error.retry_after);
                tracing::warn!(error = %error, failures = job.failures, retry_in = ?delay, "attempt failed; will retry");
                ctx.store.put(job).await?;
                if !ctx.engine.pause(delay).await {
                    return Ok(());
                }
            }
            AttemptEnd::SourceChanged(why) => {
                ctx.metrics
                    .upload_finished(&job.provider, "superseded", None);
                tracing::warn!(reason = %why, "source changed; abandoning this upload, the file will be taken again once stable");
                if let Some(session) = &job.session
                    && let Err(e) = handle.provider.abandon(session).await
                {
                    tracing::warn!(error = %e, "could not delete the abandoned upload");
                }
                job.transition(JobState::Superseded)?;
                ctx.store.put(job).await?;
                if let Some(commands) = ctx.watch_commands.get(&job.watch) {
                    let _ = commands.send(WatchCommand::Reoffer(job.source.clone()));
                }
                return Ok(());
            }
            AttemptEnd::Interrupted => {
                ctx.store.put(job).await?;
                return Ok(());
            }
        }
    }
}

/// Retry a filing step with backoff until it works or shutdown comes; the
/// file stays where it is meanwhile (nothing is lost).
async fn until_filed<T>(
    ctx: &Context,
    job: &mut Job,
    mut step: impl FnMut(&Job) -> Result<T, finish::FilingError>,
) -> Result<Option<T>, StoreError> {
    let backoff = crate::retry::Backoff::new(
        ctx.providers
            .get(&job.provider)
            .map_or_else(Default::default, |h| h.config.retry),
    );
    let mut failures = 0;
    loop {
        match step(job) {
            Ok(value) => return Ok(Some(value)),
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, "cannot file the source; will try again (nothing is lost: the file stays where it is)");
                let mut info = job.last_error.clone();
                note_failure(
                    job,
                    &ProviderError::new(ErrorKind::Transient, e.to_string()),
                );
                if let (Some(previous), Some(now)) = (info.take(), job.last_error.as_mut())
                    && job.state == JobState::Failing
                {
                    // Keep the original failure reason for the report.
                    now.reason = previous.reason;
                }
                ctx.store.put(job).await?;
                let delay = backoff
                    .delay(failures.min(20), None)
                    .max(Duration::from_millis(500));
                if !ctx.engine.pause(delay).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Move the source below `root` (retrying until it works; `None` on
/// shutdown), record where it went, then move its sidecar beside it.
async fn file_with_sidecar(
    ctx: &Context,
    job: &mut Job,
    root: &std::path::Path,
) -> Result<Option<std::path::PathBuf>, StoreError> {
    let Some(filed) = until_filed(ctx, job, |job| finish::file_source(job, root)).await? else {
        return Ok(None);
    };
    job.filed_to = Some(filed.clone());
    ctx.store.put(job).await?;
    if let Some(sidecar) = job.sidecar.clone().filter(|s| s.exists()) {
        match finish::file_sidecar(&sidecar, &filed) {
            Ok(moved) => job.sidecar_filed_to = Some(moved),
            Err(e) => tracing::warn!(error = %e, "sidecar left in place"),
        }
    }
    Ok(Some(filed))
}

async fn file_done(ctx: &Arc<Context>, job: &mut Job) -> Result<(), StoreError> {
    let Some(watch) = ctx.watch(&job.watch).cloned() else {
        job.transition(JobState::Done)?;
        return ctx.store.put(job).await;
    };
    let receipt_at = match watch.after_success {
        AfterSuccess::Move => {
            let Some(filed) = file_with_sidecar(ctx, job, &watch.done_dir).await? else {
                return Ok(());
            };
            filed
        }
        AfterSuccess::Delete => {
            for path in [Some(job.source.clone()), job.sidecar.clone()]
                .into_iter()
                .flatten()
            {
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete delivered source");
                }
            }
            watch.done_dir.join(&job.relpath)
        }
        AfterSuccess::Leave => watch.done_dir.join(&job.relpath),
    };
    if watch.receipts {
        let earlier = job.duplicate_of.and_then(|id| ctx.store.get(id).ok());
        let receipt = Receipt {
            job: job.id,
            watch: &job.watch,
            file: &job.relpath,
            provider: &job.provider,
            remote_id: job.delivery.as_ref().map(|d| d.remote_id.as_str()),
            url: job.delivery.as_ref().and_then(|d| d.url.as_deref()),
            links: job.delivery.as_ref().map(|d| &d.links),
            sha256: job.sha256.as_deref(),
            bytes: job.signature.size,
            metadata: &job.metadata,
            started_at: job.started_at,
            finished_at: jiff::Timestamp::now(),
            attempts: job.attempts,
            duplicate_of: earlier.map(|e| DuplicateOf {
                job: e.id,
                remote_id: e.delivery.as_ref().map(|d| d.remote_id.clone()),
                url: e.delivery.as_ref().and_then(|d| d.url.clone()),
                finished_at: e.finished_at,
            }),
            replaced: &job.replaced,
        };
        let path = finish::report_path(&receipt_at, ".receipt.json");
        if let Err(e) = finish::write_report(&path, &receipt) {
            tracing::error!(error = %e, "cannot write the receipt");
        }
    }
    // Done is done: a retried error from earlier on would only mislead status.
    job.last_error = None;
    job.transition(JobState::Done)?;
    ctx.store.put(job).await?;
    tracing::info!(filed_to = %job.filed_to.as_deref().map_or_else(|| "(left in place)".into(), |p| p.display().to_string()), "done");
    Ok(())
}

async fn file_failed(ctx: &Arc<Context>, job: &mut Job) -> Result<(), StoreError> {
    let Some(watch) = ctx.watch(&job.watch).cloned() else {
        job.transition(JobState::Failed)?;
        return ctx.store.put(job).await;
    };
    let report_at = if job.source.exists() || job.filed_to.is_some() {
        let Some(filed) = file_with_sidecar(ctx, job, &watch.failed_dir).await? else {
            return Ok(());
        };
        filed
    } else {
        watch.failed_dir.join(&job.relpath)
    };
    let error = job.last_error.clone();
    let report = ErrorReport {
        job: job.id,
        watch: &job.watch,
        file: &job.relpath,
        provider: &job.provider,
        reason: error.as_ref().map_or("unknown", |e| e.reason.as_str()),
        status: error.as_ref().and_then(|e| e.status),
        excerpt: error.as_ref().and_then(|e| e.excerpt.as_deref()),
        attempts: job.attempts,
        failed_at: jiff::Timestamp::now(),
        retry_with: format!("hotfolder retry {}", job.id),
    };
    let path = finish::report_path(&report_at, ".error.json");
    if let Err(e) = finish::write_report(&path, &report) {
        tracing::error!(error = %e, "cannot write the error report");
    }
    tracing::warn!(reason = report.reason, filed_to = %job.filed_to.as_deref().map_or_else(|| "(not moved)".into(), |p| p.display().to_string()), "failed");
    job.transition(JobState::Failed)?;
    ctx.store.put(job).await?;
    Ok(())
}
