//! The appliance: watches feed ready files in, each becomes a job in the
//! store before any work, workers run jobs within `workers` and each
//! provider's `max_concurrent`, and finished jobs are filed. On shutdown the
//! daemon stops taking work, lets in-flight chunks checkpoint within
//! `shutdown_timeout`, flushes the store and returns.

mod batch;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{AfterSuccess, Config, Duplicates, NotifyEvent, Unmatched, WatchConfig};
use crate::finish::{self, Carried, DuplicateOf, ErrorReport, Receipt};
use crate::jobs::JobsHandle;
use crate::lifecycle::Outcome;
use crate::pause::Pauses;
use crate::providers::{ErrorKind, ProviderError, Uploader};
use crate::route::{FileFacts, FolderSidecars, Router};
use crate::state::{Job, JobState, JobStore, Store, StoreError};
use crate::upload::progress::ProgressBoard;
use crate::upload::{AttemptEnd, Engine, ProviderHandle, note_failure};
use crate::watch::{HeldSources, ReadyFile, WatchCommand, WatchCounters};

/// Everything a job task needs, shared.
pub struct Context {
    /// The configuration (the same one the API sees, until a reload).
    pub config: Arc<Config>,
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
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What the HTTP API and the control socket are given.
    pub jobs: JobsHandle,
    /// Set when the store failed to write (a full or failing `state_dir`):
    /// the daemon stops at once, since nothing it does could be recorded.
    store_failed: Arc<watch::Sender<Option<String>>>,
    /// Whether the fleet database answers (always, for sled).
    pub store_health: Arc<crate::state::StoreHealth>,
    /// Each watch's command channel, by name (replaced when a reload
    /// starts watches again; shared with the contexts jobs still run on).
    watch_commands: crate::reload::Shared<WatchCommands>,
    router: Router,
    /// Webhooks: events go to its outbox with the job step that raises them.
    pub notifier: Arc<crate::notify::Notifier>,
}

/// Each watch's command channel, by watch name.
pub type WatchCommands = HashMap<String, mpsc::UnboundedSender<WatchCommand>>;

/// What a daemon connects its job context to; all empty for `hotfolder
/// upload`, which has no watches, no pauses and no reload.
#[derive(Default)]
pub struct Surroundings {
    /// Each watch's command channel, by name.
    pub watch_commands: crate::reload::Shared<WatchCommands>,
    /// Each watch's counters, by name.
    pub watch_counters: crate::reload::Shared<HashMap<String, Arc<WatchCounters>>>,
    /// Sources that jobs hold.
    pub held: Arc<HeldSources>,
    /// The paused scopes.
    pub pauses: Pauses,
    /// How the API and the control socket ask for a reload.
    pub reload: Option<crate::reload::Asker>,
}

impl Context {
    /// Everything job tasks share, for the daemon and for `hotfolder upload`
    /// (which has no watches). Jobs handed to [`Context::spawn_job`] come out
    /// of the returned receiver, to be run with [`run_job`].
    pub fn new(
        config: Config,
        store: Store,
        shutdown: watch::Receiver<bool>,
        surroundings: Surroundings,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Job>) {
        let Surroundings {
            watch_commands,
            watch_counters,
            held,
            pauses,
            reload,
        } = surroundings;
        let progress = ProgressBoard::default();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let engine = Engine {
            store: store.clone(),
            progress: progress.clone(),
            shutdown,
            metrics: Arc::clone(&metrics),
            content_claims: Arc::default(),
            pauses: pauses.clone(),
            bandwidth: Arc::new(crate::bandwidth::Bandwidth::new(
                &config,
                crate::bandwidth::Clock::from_env(),
            )),
        };
        tokio::spawn(crate::bandwidth::follow_timetables(
            Arc::clone(&engine.bandwidth),
            engine.shutdown.clone(),
        ));
        let providers = provider_handles(&config, &BTreeMap::new());
        let (job_tx, job_rx) = mpsc::unbounded_channel();
        let mut jobs = JobsHandle::new(
            &config,
            store.clone(),
            progress.clone(),
            Arc::clone(&metrics),
            watch_counters,
            held,
            job_tx,
        );
        jobs.pauses = pauses;
        jobs.reload = reload;
        jobs.bandwidth = Arc::clone(&engine.bandwidth);
        let notifier = Arc::new(crate::notify::Notifier::new(&config, store.clone()));
        tokio::spawn(Arc::clone(&notifier).run(engine.shutdown.clone()));
        jobs.notifier = Some(Arc::clone(&notifier));
        let ctx = Arc::new(Context {
            router: Router::new(&config),
            workers: Arc::new(Semaphore::new(config.workers)),
            config: jobs.config.get(),
            store,
            engine,
            providers,
            progress,
            metrics,
            store_health: Arc::clone(&jobs.store_health),
            jobs,
            watch_commands,
            store_failed: Arc::new(watch::channel(None).0),
            notifier,
        });
        (ctx, job_rx)
    }

    /// The context of a reloaded `config`: jobs started from now on get
    /// it, while jobs under way keep the one they started with (their
    /// provider settings and rule). Worker and provider slots stay shared,
    /// resized to the new limits, so old and new jobs together keep to
    /// them. The bandwidth limits and webhooks, shared by all jobs, change
    /// for everyone.
    pub fn reloaded(&self, config: Config) -> Context {
        let providers = provider_handles(&config, &self.providers);
        resize(&self.workers, self.config.workers, config.workers);
        self.engine.bandwidth.reconfigure(&config);
        self.notifier.reconfigure(&config);
        let config = Arc::new(config);
        self.jobs.config.set(Arc::clone(&config));
        Context {
            router: Router::new(&config),
            workers: Arc::clone(&self.workers),
            config,
            store: self.store.clone(),
            engine: self.engine.clone(),
            providers,
            progress: self.progress.clone(),
            metrics: Arc::clone(&self.metrics),
            jobs: self.jobs.clone(),
            store_failed: Arc::clone(&self.store_failed),
            store_health: Arc::clone(&self.store_health),
            watch_commands: self.watch_commands.clone(),
            notifier: Arc::clone(&self.notifier),
        }
    }

    /// A reload came after this context was made: a job that has not
    /// started on it should start on the new one.
    fn superseded(&self) -> bool {
        !Arc::ptr_eq(&self.config, &self.jobs.config.get())
    }

    fn watch(&self, name: &str) -> Option<&WatchConfig> {
        self.config.watches.iter().find(|w| w.name == name)
    }

    /// The store failed to write: stop the daemon (see [`DaemonError::StoreFailed`]).
    fn store_failed(&self, error: &StoreError) {
        let _ = self.store_failed.send(Some(error.to_string()));
    }

    /// Queue a job (already stored) for a worker.
    pub fn spawn_job(&self, job: Job) {
        self.jobs.queue(job);
    }
}

/// Handles for `config`'s providers. A provider whose settings are those
/// of its handle in `before` (its `bandwidth` aside: the shared limiters
/// carry that) keeps the handle, with its tokens and pacing. One whose
/// settings changed gets a new handle that shares the old one's slots,
/// resized to its `max_concurrent`, so that uploads under way on the old
/// settings and new ones together keep to the limit.
fn provider_handles(
    config: &Config,
    before: &BTreeMap<String, Arc<ProviderHandle>>,
) -> BTreeMap<String, Arc<ProviderHandle>> {
    let without_limit = |p: &crate::config::ProviderConfig| crate::config::ProviderConfig {
        bandwidth: None,
        ..p.clone()
    };
    config
        .providers
        .iter()
        .map(|(name, p)| {
            let handle = match before.get(name) {
                Some(old) if without_limit(&old.config) == without_limit(p) => Arc::clone(old),
                Some(old) => {
                    resize(&old.permits, old.config.max_concurrent, p.max_concurrent);
                    Arc::new(ProviderHandle {
                        permits: Arc::clone(&old.permits),
                        ..ProviderHandle::new(p)
                    })
                }
                None => Arc::new(ProviderHandle::new(p)),
            };
            (name.clone(), handle)
        })
        .collect()
}

/// Make `slots` hold `to` permits instead of `from`. Fewer: the free ones
/// go at once, the rest as the uploads holding them end.
fn resize(slots: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        slots.add_permits(to - from);
    } else if from > to {
        let excess = from - to;
        let gone = slots.forget_permits(excess);
        if gone < excess {
            let slots = Arc::clone(slots);
            tokio::spawn(async move {
                if let Ok(taken) = slots.acquire_many_owned((excess - gone) as u32).await {
                    taken.forget();
                }
            });
        }
    }
}

/// Errors that stop the daemon from starting, or stop it while it runs.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store failed to write while running (a full disk under
    /// `state_dir`, a failing disk): sled takes no more writes after that,
    /// so the daemon stops rather than act on what it cannot record. A
    /// restart recovers from what was durably written; nothing is lost.
    #[error(
        "the state database in {state_dir} failed to write ({error}); stopped without taking more work: free space or fix the disk under {state_dir}, then start hotfolder again (it resumes from what was recorded)"
    )]
    StoreFailed {
        /// The state folder.
        state_dir: std::path::PathBuf,
        /// The store's error.
        error: String,
    },
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP status API could not listen.
    #[error(
        "cannot listen on http.listen {listen}: {error}; choose a free address or remove `http:`"
    )]
    Http {
        /// The configured address.
        listen: String,
        /// The I/O error (said once: not also a source).
        error: std::io::Error,
    },
    /// SIGHUP (reload) could not be listened for.
    #[error("cannot listen for SIGHUP (config reload): {error}")]
    Signal {
        /// The I/O error.
        error: std::io::Error,
    },
    /// The control socket could not be set up.
    #[error("cannot open the control socket {path}: {error}")]
    Control {
        /// Socket path.
        path: std::path::PathBuf,
        /// The I/O error (said once: not also a source).
        error: std::io::Error,
    },
}

/// Run the appliance until `shutdown` resolves.
///
/// # Errors
/// [`DaemonError`] when it cannot start; run-time problems are logged and
/// recorded on their jobs instead.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    // First: until it is listened for, SIGHUP would end the process (a
    // `systemctl reload` just after the start).
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|error| DaemonError::Signal { error })?;
    let store = Store::open_configured(&config).await?;
    // Jobs that resume hold their sources before any watch looks, so that
    // a scan neither takes them as new nor calls them vanished when filed.
    // In a fleet, this node's name is its own while it lives; it resumes
    // the jobs it ran (taking over a dead node's jobs comes with leases).
    let member = match (&store, &config.store) {
        (Store::Postgres(pg), crate::config::StoreConfig::Postgres { node, lease, .. }) => {
            Some((pg.join(node, *lease).await?, *lease))
        }
        _ => None,
    };
    let mut unfinished: Vec<Job> = match &store {
        Store::Postgres(pg) => pg.claim_own().await?,
        Store::Sled(_) => store
            .all()
            .await?
            .into_iter()
            .filter(|job| !job.state.is_terminal())
            .collect(),
    };
    if let Store::Sled(sled) = &store {
        send_cut_short_batches_alone(&store, sled, &mut unfinished).await?;
    }
    let pauses = Pauses::new(crate::pause::load(&store).await?);
    for scope in pauses.current() {
        tracing::warn!(scope = %scope, "uploads are paused (kept from before the restart); `hotfolder resume` lets them go on");
    }
    let held = Arc::new(HeldSources::default());
    for job in &unfinished {
        held.hold(&job.source);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // In messages of up to `READY_AT_ONCE` files: about 1,000 files queued.
    let (ready_tx, mut ready_rx) = mpsc::channel::<Vec<ReadyFile>>(4);
    let mut watches = Watches {
        running: HashMap::new(),
        commands: Default::default(),
        counters: Default::default(),
        skip_roots: Default::default(),
        ready: ready_tx,
        stop: stop_rx.clone(),
        held: Arc::clone(&held),
    };
    watches.apply(&[], &config.watches);
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel();
    let (mut ctx, mut job_rx) = Context::new(
        config,
        store,
        stop_rx.clone(),
        Surroundings {
            watch_commands: watches.commands.clone(),
            watch_counters: watches.counters.clone(),
            held,
            pauses,
            reload: Some(reload_tx),
        },
    );
    let api = match &ctx.config.http {
        Some(http) => Some(
            crate::api::serve(ctx.jobs.clone(), &http.listen, stop_rx.clone())
                .await
                .map_err(|error| DaemonError::Http {
                    listen: http.listen.clone(),
                    error,
                })?,
        ),
        None => None,
    };
    let control = crate::control::serve(ctx.jobs.clone(), stop_rx.clone())
        .map_err(|(path, error)| DaemonError::Control { path, error })?;

    tokio::spawn(offer_parked_jobs_again(Arc::clone(&ctx)));

    // Resume what was in flight.
    let resumed = unfinished.len();
    for job in unfinished {
        ctx.spawn_job(job);
    }
    tracing::info!(
        watches = ctx.config.watches.len(),
        workers = ctx.config.workers,
        resumed,
        "hotfolder running"
    );

    let mut jobs = JoinSet::new();
    let mut dispatch = Dispatch::default();
    // Free heap pages go back to the system now and then: after a burst the
    // process does not keep its high-water mark for months.
    let heartbeat_every = member
        .as_ref()
        .map_or(Duration::from_secs(3600), |(_, lease)| *lease / 3);
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut give_back = tokio::time::interval(GIVE_BACK_MEMORY_EVERY);
    give_back.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store_failed = ctx.store_failed.subscribe();
    let mut failure = None;
    let mut sidecar_listings = SidecarListings::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Ok(()) = store_failed.changed() => {
                failure = store_failed.borrow().clone();
                if let Some(error) = &failure {
                    tracing::error!(state_dir = %ctx.config.state_dir.display(), error = %error, "the state database failed to write; stopping now");
                    break;
                }
            }
            Some(ready) = ready_rx.recv() => {
                // The files a watch found ready together are taken
                // together, so that their jobs can share a batch.
                sidecar_listings.list_for(&ready).await;
                for file in ready {
                    let (watch, path, look) = (file.watch.clone(), file.path.clone(), file.look);
                    let sidecars = sidecar_listings.of(&watch, look, &path);
                    match take_file(&ctx, file, sidecars).await {
                        Ok(()) => ctx.store_health.answered(),
                        Err(e @ StoreError::Database(_)) => {
                            // Offered again once stable: nothing is lost.
                            ctx.store_health.failed(&e);
                            if let Some(commands) = ctx.watch_commands.get().get(&watch) {
                                let _ = commands.send(WatchCommand::Reoffer(path));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot record a new job");
                            if matches!(e, StoreError::Db(_)) {
                                ctx.store_failed(&e);
                            }
                        }
                    }
                }
            }
            Some(job) = job_rx.recv() => {
                dispatch.offer(&ctx, &mut jobs, job);
                for _ in 1..batch::MOST_JOBS {
                    let Ok(job) = job_rx.try_recv() else { break };
                    dispatch.offer(&ctx, &mut jobs, job);
                }
                dispatch.start_batchers(&ctx, &mut jobs);
            }
            Some(answer) = reload_rx.recv() => {
                tracing::info!("reload asked (POST /api/reload or `hotfolder reload`): reading the config again");
                let outcome = reload(&mut ctx, &mut watches).await;
                let _ = answer.send(outcome);
            }
            Some(()) = hangup.recv() => {
                tracing::info!("SIGHUP received: reading the config again");
                let _ = reload(&mut ctx, &mut watches).await;
            }
            _ = heartbeat.tick(), if member.is_some() => {
                if let Some((member, _)) = &member {
                    match member.heartbeat().await {
                        Ok(true) => ctx.store_health.answered(),
                        Ok(false) => {
                            tracing::error!("another node has taken this node's name (this one was presumed dead); stopping");
                            break;
                        }
                        Err(e) => ctx.store_health.failed(&e),
                    }
                }
                if let Store::Postgres(pg) = &ctx.store
                    && !ctx.store_health.is_down()
                {
                    if let Err(e) = pg.renew_claims(&ctx.jobs.accepted()).await {
                        ctx.store_health.failed(&e);
                    }
                    // Another node (or `hotfolder pause` beside the fleet)
                    // may have paused or resumed something.
                    match crate::pause::load(&ctx.store).await {
                        Ok(scopes) => ctx.jobs.pauses.replace(scopes),
                        Err(e) => ctx.store_health.failed(&e),
                    }
                    match pg.claim_expired(16).await {
                        Ok(taken) => {
                            for job in taken {
                                tracing::info!(job = job.id, file = %job.relpath.display(), state = job.state.as_str(), "taking over a job whose node stopped renewing its claim");
                                ctx.spawn_job(job);
                            }
                        }
                        Err(e) => ctx.store_health.failed(&e),
                    }
                }
            }
            _ = give_back.tick() => {
                tokio::task::spawn_blocking(crate::memory::give_back_free_memory);
            }
            Some(ended) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                let id = match ended {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                dispatch.ended(&ctx, &mut jobs, id).await;
            }
        }
    }

    // A reload asked for now is answered "the daemon is stopping".
    drop(reload_rx);
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
    watches.stop();
    control.abort();
    if let Some(api) = api {
        let _ = api.await;
    }
    if let Some(error) = failure {
        return Err(DaemonError::StoreFailed {
            state_dir: ctx.config.state_dir.clone(),
            error,
        });
    }
    ctx.store.flush().await?;
    if let Some((member, _)) = &member {
        member.leave().await;
    }
    crate::control::remove_socket(&ctx.config.state_dir);
    tracing::info!("stopped; state flushed");
    Ok(())
}

/// The watch tasks; a reload starts again only those it changes.
struct Watches {
    /// Each running watch's task, by name.
    running: HashMap<String, tokio::task::AbortHandle>,
    commands: crate::reload::Shared<WatchCommands>,
    /// By watch name; a watch that stays keeps its counters.
    counters: crate::reload::Shared<HashMap<String, Arc<WatchCounters>>>,
    /// Every watch's done and failed folders, which no watch enters.
    skip_roots: crate::watch::SkipRoots,
    ready: mpsc::Sender<Vec<ReadyFile>>,
    stop: watch::Receiver<bool>,
    held: Arc<HeldSources>,
}

impl Watches {
    /// Go from the watches `before` to `after`: a removed watch's task
    /// stops, an added or changed one starts (it looks at its folder
    /// afresh: a file under observation is observed again, a file a job
    /// holds is not offered again), an unchanged one runs on (it learns of
    /// the done and failed folders of the others at once).
    fn apply(&mut self, before: &[WatchConfig], after: &[WatchConfig]) {
        self.skip_roots.set(Arc::new(
            after
                .iter()
                .flat_map(|w| [w.done_dir.clone(), w.failed_dir.clone()])
                .collect(),
        ));
        let old_commands = self.commands.get();
        let old_counters = self.counters.get();
        let mut commands = WatchCommands::new();
        let mut counters = HashMap::new();
        for watch in after {
            if before.contains(watch)
                && let Some(command) = old_commands.get(&watch.name)
                && let Some(counter) = old_counters.get(&watch.name)
            {
                commands.insert(watch.name.clone(), command.clone());
                counters.insert(watch.name.clone(), Arc::clone(counter));
                continue;
            }
            if let Some(task) = self.running.remove(&watch.name) {
                task.abort();
            }
            let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
            let mine = old_counters.get(&watch.name).cloned().unwrap_or_default();
            commands.insert(watch.name.clone(), cmd_tx);
            counters.insert(watch.name.clone(), Arc::clone(&mine));
            let task = tokio::spawn(crate::watch::run(
                watch.clone(),
                self.skip_roots.clone(),
                self.ready.clone(),
                cmd_rx,
                self.stop.clone(),
                Arc::clone(&self.held),
                mine,
            ));
            self.running.insert(watch.name.clone(), task.abort_handle());
        }
        self.running.retain(|name, task| {
            let kept = after.iter().any(|w| &w.name == name);
            if !kept {
                task.abort();
            }
            kept
        });
        self.commands.set(Arc::new(commands));
        self.counters.set(Arc::new(counters));
    }

    /// Stop every watch task (the daemon is stopping).
    fn stop(&mut self) {
        for (_, task) in self.running.drain() {
            task.abort();
        }
    }
}

/// Read the config file again and, if it loads, run on it: see
/// [`crate::reload`]. Refused, the running config stays and the error
/// (with its file:line:column) is logged and answered.
async fn reload(ctx: &mut Arc<Context>, watches: &mut Watches) -> crate::reload::Outcome {
    let file = ctx.config.file.clone();
    // The checks of a start: the file loads, and it names a watch.
    let loaded = tokio::task::spawn_blocking(move || {
        crate::config::load(&file).and_then(|config| config.require_watches().map(|()| config))
    })
    .await
    .map_err(|e| format!("the config could not be read: {e}"))
    .and_then(|loaded| loaded.map_err(|e| e.to_string()));
    let mut config = match loaded {
        Ok(config) => config,
        Err(why) => {
            tracing::error!(error = %why, "config not reloaded: running on with the config it has; fix the file and reload again");
            return Err(why);
        }
    };
    let mut changes = crate::reload::compare(&ctx.config, &mut config);
    watches.apply(&ctx.config.watches, &config.watches);
    *ctx = Arc::new(ctx.reloaded(config));
    // A paused provider or watch the reload removed: its jobs would wait
    // for a `resume` that can no longer name it.
    match crate::pause::forget_unknown(&ctx.store, &ctx.config, Some(&ctx.engine.pauses)).await {
        Ok(forgotten) => changes.applied.extend(
            forgotten
                .iter()
                .map(|scope| format!("{scope} was paused and is gone: resumed")),
        ),
        Err(e) => tracing::warn!(error = %e, "cannot resume the pauses of what the reload removed"),
    }
    tracing::info!(file = %ctx.config.file.display(), changes = %changes, "config reloaded");
    Ok(changes)
}

/// Each time the paused scopes change, offer the jobs a pause set aside
/// again (those still paused are set aside again at once).
async fn offer_parked_jobs_again(ctx: Arc<Context>) {
    let mut changes = ctx.engine.pauses.changes();
    let mut shutdown = ctx.engine.shutdown.clone();
    loop {
        tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        for id in ctx.engine.pauses.take_parked() {
            // Through a claim: in a fleet another node may hold it by now.
            match ctx.store.get_for_work(id).await {
                Ok(Some(job)) if !job.state.is_terminal() => ctx.spawn_job(job),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(job = id, error = %e, "cannot offer a paused job again; it is taken at the next start")
                }
            }
        }
    }
}

/// How often free heap pages are given back to the system.
const GIVE_BACK_MEMORY_EVERY: Duration = Duration::from_secs(30);

/// Job tasks live only while they can make progress: per provider, at most
/// twice as many as may upload at once (a task waiting for a permit, or in
/// backoff, is alive too). The other jobs wait as ids, read back from the
/// store when their turn comes, so a drop of 100,000 files holds 100,000
/// numbers, not 100,000 tasks and records.
///
/// New small files for a `folder` provider go to its batch queue instead
/// ([`batch`]), taken up to 1,024 at a time (within 8 MiB) by up to four
/// batchers.
#[derive(Default)]
struct Dispatch {
    /// Waiting job ids by provider name (empty: not routed yet).
    waiting: HashMap<String, std::collections::VecDeque<u64>>,
    /// Live tasks by provider name.
    live: HashMap<String, usize>,
    /// Which provider each live task counts against, and its job (none:
    /// a batcher, which counts against nothing here).
    tasks: HashMap<tokio::task::Id, (String, Option<u64>)>,
    /// Each provider's queue of jobs waiting for a batch.
    batches: HashMap<String, batch::SharedQueue>,
}

impl Dispatch {
    fn limit(ctx: &Context, provider: &str) -> usize {
        let concurrent = ctx.providers.get(provider).map_or(ctx.config.workers, |h| {
            h.config.max_concurrent.min(ctx.config.workers)
        });
        concurrent.max(1) * 2
    }

    /// A job to run: queued for a batch if it fits one (see
    /// [`Dispatch::start_batchers`]); else now if its provider has room,
    /// else when it has.
    fn offer(&mut self, ctx: &Arc<Context>, tasks: &mut JoinSet<()>, job: Job) {
        let key = job.provider.clone();
        let queue = self.batches.entry(key.clone()).or_default();
        if batch::enqueue(queue, &job, batch::fits(ctx, &job)) {
            return;
        }
        if self.live.get(&key).copied().unwrap_or(0) < Self::limit(ctx, &key) {
            self.spawn(ctx, tasks, key, job);
        } else {
            self.waiting.entry(key).or_default().push_back(job.id);
        }
    }

    /// Start batchers where jobs wait for a batch: called after each burst
    /// of offers, so that a burst goes in one batch, not the first of it
    /// alone.
    fn start_batchers(&mut self, ctx: &Arc<Context>, tasks: &mut JoinSet<()>) {
        for (provider, queue) in &self.batches {
            while batch::wants_batcher(queue) {
                let handle = tasks.spawn(batch::batcher(
                    Arc::clone(ctx),
                    provider.clone(),
                    Arc::clone(queue),
                ));
                self.tasks.insert(handle.id(), (provider.clone(), None));
                ctx.metrics.job_tasks.inc();
            }
        }
    }

    fn spawn(&mut self, ctx: &Arc<Context>, tasks: &mut JoinSet<()>, key: String, job: Job) {
        let id = job.id;
        let handle = tasks.spawn(run_job(Arc::clone(ctx), job));
        *self.live.entry(key.clone()).or_insert(0) += 1;
        self.tasks.insert(handle.id(), (key, Some(id)));
        ctx.metrics.job_tasks.inc();
    }

    /// A task ended: start the next waiting jobs of its provider.
    async fn ended(&mut self, ctx: &Arc<Context>, tasks: &mut JoinSet<()>, id: tokio::task::Id) {
        let Some((key, job)) = self.tasks.remove(&id) else {
            return;
        };
        ctx.metrics.job_tasks.dec();
        let Some(job) = job else {
            return;
        };
        ctx.jobs.ended(job);
        if let Some(n) = self.live.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        while self.live.get(&key).copied().unwrap_or(0) < Self::limit(ctx, &key) {
            let Some(next) = self.waiting.get_mut(&key).and_then(|q| q.pop_front()) else {
                break;
            };
            match ctx.store.get(next).await {
                Ok(job) if !job.state.is_terminal() => self.spawn(ctx, tasks, key.clone(), job),
                Ok(_) => ctx.jobs.ended(next),
                Err(e) => {
                    ctx.jobs.ended(next);
                    tracing::error!(job = next, error = %e, "cannot read a queued job; it resumes at the next start")
                }
            }
        }
    }
}

/// The jobs of a batch of small files that a crash, a kill or a power cut
/// stopped (or a shutdown that did not wait for it) go on one at a time: each still queued counts the batch as its
/// attempt (one job alone records its attempt before it writes anything),
/// which keeps it out of batches from now on. A file that takes the
/// process down then stops only its own job at each start, not a batch of
/// a thousand.
async fn send_cut_short_batches_alone(
    store: &Store,
    sled: &crate::state::SledStore,
    unfinished: &mut [Job],
) -> Result<(), StoreError> {
    let cut_short: std::collections::HashSet<u64> = sled.batches_cut_short()?.into_iter().collect();
    if cut_short.is_empty() {
        return Ok(());
    }
    let (mut members, mut queued) = (0, 0);
    for job in unfinished
        .iter_mut()
        .filter(|job| cut_short.contains(&job.id))
    {
        members += 1;
        if job.attempts == 0 {
            job.attempts = 1;
            store.put_buffered(job).await?;
            queued += 1;
        }
    }
    store.flush().await?;
    // (A batch that ended just before a crash may still be noted: its jobs
    // are all finished, and there is nothing to say.)
    sled.forget_batches_cut_short()?;
    if members > 0 {
        tracing::warn!(
            jobs = members,
            queued,
            "a batch of small files was cut short (a crash, a kill, a power cut, or a shutdown that outlasted shutdown_timeout); its unfinished jobs go on one at a time"
        );
    }
    Ok(())
}

/// The folders listed for sidecars (see [`FolderSidecars`]) for the latest
/// look at the candidates. A look's ready files come in messages of at most
/// [`crate::watch::READY_AT_ONCE`]; a folder is listed at the first message
/// that has enough of its files, and that listing serves the rest of the
/// look (a drop of 10,000 files into one folder was 40 listings of 10,000
/// entries). A sidecar is looked for as of the look that found its file
/// ready, whichever message carries that file. Only one look's listings
/// are kept: a message of another look (or watch) replaces them, so no
/// listing outlives the look it was made for.
#[derive(Default)]
struct SidecarListings {
    /// The watch and the look listed for.
    look: Option<(String, u64)>,
    folders: HashMap<PathBuf, Arc<FolderSidecars>>,
}

impl SidecarListings {
    /// List the folders that many of `ready` share, unless listed already
    /// for its look.
    async fn list_for(&mut self, ready: &[ReadyFile]) {
        let Some(first) = ready.first() else {
            return;
        };
        if self
            .look
            .as_ref()
            .is_none_or(|(watch, look)| *watch != first.watch || *look != first.look)
        {
            // Another look: what changed in the folders since counts.
            self.look = Some((first.watch.clone(), first.look));
            self.folders.clear();
        }
        let mut files_in: HashMap<&Path, usize> = HashMap::new();
        for file in ready {
            if let Some(folder) = file.path.parent() {
                *files_in.entry(folder).or_default() += 1;
            }
        }
        let worth: Vec<(PathBuf, usize)> = files_in
            .into_iter()
            .filter(|(folder, files)| {
                *files >= FolderSidecars::WORTH_FROM && !self.folders.contains_key(*folder)
            })
            .map(|(folder, files)| (folder.to_path_buf(), files))
            .collect();
        if worth.is_empty() {
            return;
        }
        let listed = tokio::task::spawn_blocking(move || {
            worth
                .into_iter()
                .filter_map(|(folder, files)| {
                    // Too big for these files (a later message with more
                    // of them may find it worth it), or unreadable: each
                    // looks its own up.
                    let listed =
                        FolderSidecars::list(&folder, files * FolderSidecars::ENTRIES_PER_FILE)?;
                    tracing::debug!(folder = %folder.display(), files, "folder listed for sidecars");
                    Some((folder, Arc::new(listed)))
                })
                .collect::<Vec<_>>()
        })
        .await
        // Lost with its thread: each file looks its own up.
        .unwrap_or_default();
        self.folders.extend(listed);
    }

    /// The listing of the folder of `path`, found ready by look `look` of
    /// watch `watch`, if that look listed it.
    fn of(&self, watch: &str, look: u64, path: &Path) -> Option<&FolderSidecars> {
        let (listed_watch, listed_look) = self.look.as_ref()?;
        if listed_watch != watch || *listed_look != look {
            return None;
        }
        self.folders.get(path.parent()?).map(AsRef::as_ref)
    }
}

/// A watch offers a complete file: unless a job already covers this version
/// of it, route it and record a job.
async fn take_file(
    ctx: &Arc<Context>,
    file: ReadyFile,
    sidecars: Option<&FolderSidecars>,
) -> Result<(), StoreError> {
    if let Some(job) = ctx.store.latest_for(&file.watch, &file.relpath).await? {
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
        ctx.store.next_id().await?,
        &file.watch,
        &file.relpath,
        &file.path,
        file.signature,
        "",
    );
    let failure = match route_job(ctx, &mut job, file.mtime, sidecars) {
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
        job.apply(Outcome::Permanent);
    }
    job.node = ctx.config.store.node().map(str::to_string);
    if !ctx.store.create(&mut job).await? {
        tracing::debug!(watch = %file.watch, file = %file.relpath.display(), "another node of the fleet took this file at the same moment");
        return Ok(());
    }
    tracing::info!(job = job.id, watch = %job.watch, file = %job.relpath.display(), provider = %job.provider, "new job");
    ctx.spawn_job(job);
    Ok(())
}

/// Route `job`'s source by the rules as they and its sidecar are now:
/// provider, rule, metadata, sidecar. `Ok(false)` when no rule matches;
/// `Err` with the reason when it cannot be routed (a broken sidecar). The
/// sidecar is recorded either way so that it travels with the file.
fn route_job(
    ctx: &Context,
    job: &mut Job,
    mtime: SystemTime,
    sidecars: Option<&FolderSidecars>,
) -> Result<bool, String> {
    let routed = ctx.router.route(&FileFacts {
        watch: &job.watch,
        relpath: &job.relpath,
        path: &job.source,
        size: job.signature.size,
        mtime,
        sidecars,
    });
    match routed {
        Ok(Some(route)) => {
            job.provider = route.provider;
            job.rule = Some(route.rule);
            job.rule_fingerprint = Some(route.fingerprint);
            job.metadata = route.metadata;
            job.sidecar = route.sidecar;
            job.skip_duplicates = route.duplicates == Duplicates::Skip;
            Ok(true)
        }
        Ok(None) => {
            job.sidecar = crate::route::find_sidecar(&job.source, sidecars);
            Ok(false)
        }
        Err(e) => {
            job.sidecar = crate::route::find_sidecar(&job.source, sidecars);
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
    let failure = match route_job(ctx, job, mtime, None) {
        Ok(true) => None,
        Ok(false) => Some(unmatched_reason(job)),
        Err(reason) => Some(reason),
    };
    if let Some(reason) = failure {
        note_failure(job, &ProviderError::new(ErrorKind::Permanent, reason));
        job.apply(Outcome::Permanent);
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

/// Drive one job to a terminal state, or until shutdown. The job runs in a
/// task of its own so that an error or a panic inside it is caught here:
/// logged with the job id, counted, recorded on the job (so `status` shows
/// it), and the job is tried again after a backoff, or failed with a
/// report once its retry budget is spent. A job is never left silently
/// unfinished.
pub async fn run_job(ctx: Arc<Context>, job: Job) {
    let id = job.id;
    let span = tracing::info_span!("job", id = job.id, file = %job.relpath.display(), provider = %job.provider);
    let mut job = Some(job);
    let mut task_failures = 0u32;
    loop {
        let owned = ctx.clone();
        let start = job.take();
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut job = match start {
                    Some(job) => job,
                    None => match owned.store.get_for_work(id).await? {
                        Some(job) => job,
                        // Another node of the fleet holds it now.
                        None => return Ok(()),
                    },
                };
                let driven = drive(&owned, &mut job).await;
                if job.state.is_terminal() || matches!(driven, Err(StoreError::Fenced(_))) {
                    owned.jobs.held.release(&job.source);
                }
                driven
            },
            span.clone(),
        ));
        let why = match task.await {
            Ok(Ok(())) => return,
            Ok(Err(e @ StoreError::Database(_))) => {
                // The fleet database is away: not a failure of the job. Wait
                // until it answers, then carry on from what it recorded.
                ctx.store_health.failed(&e);
                if !wait_for_the_store(&ctx).await {
                    return;
                }
                continue;
            }
            Ok(Err(StoreError::Fenced(_))) => {
                // Another node holds the job now: stop at once, touch nothing.
                tracing::warn!(
                    job = id,
                    "another node took this job over; this node stops working on it"
                );
                return;
            }
            Ok(Err(e @ StoreError::Db(_))) => {
                // The store cannot write: nothing more can be recorded, so
                // nothing more is done (the daemon stops).
                ctx.store_failed(&e);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(_) => return, // cancelled: the daemon is stopping
        };
        task_failures += 1;
        ctx.metrics.job_task_failures.inc();
        tracing::error!(job = id, error = %why, "job task failed (a bug or a store failure); recorded on the job");
        match record_task_failure(&ctx, id, &why, task_failures).await {
            Some(delay) => {
                if !ctx.engine.pause(delay).await {
                    return;
                }
            }
            None => return,
        }
    }
}

/// Poll the store with a growing pause (1 s up to 30 s) until it answers;
/// `false` when the daemon stops first.
async fn wait_for_the_store(ctx: &Context) -> bool {
    let mut pause = Duration::from_secs(1);
    loop {
        if !ctx.engine.pause(pause).await {
            return false;
        }
        if ctx.store.ping().await.is_ok() {
            ctx.store_health.answered();
            return true;
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Note a failed job task on its record. Answers how long to wait before
/// running it again, or `None` when it should not run again now: it is
/// finished, or the store cannot be read, or it is stuck in filing (then
/// it shows in `status` with the reason and is tried at the next start).
async fn record_task_failure(ctx: &Context, id: u64, why: &str, failures: u32) -> Option<Duration> {
    let mut job = match ctx.store.get(id).await {
        Ok(job) => job,
        Err(e @ StoreError::Database(_)) => {
            ctx.store_health.failed(&e);
            return Some(Duration::from_secs(5));
        }
        Err(e) => {
            tracing::error!(job = id, error = %e, "cannot read the job after its task failed; it resumes at the next start");
            return None;
        }
    };
    if job.state.is_terminal() {
        return None;
    }
    let backoff = ctx.providers.get(&job.provider).map_or_else(
        || crate::retry::Backoff::new(Default::default()),
        |h| h.backoff,
    );
    let reason = format!("internal error in job {id}: {why}");
    note_failure(&mut job, &ProviderError::new(ErrorKind::Transient, reason));
    let exhausted = backoff.exhausted(failures);
    if exhausted && job.state.is_uploading() {
        job.apply(Outcome::Permanent);
    } else if exhausted {
        let _ = ctx.store.put(&mut job).await;
        return None;
    }
    match ctx.store.put(&mut job).await {
        Ok(()) => {}
        Err(e @ StoreError::Database(_)) => {
            ctx.store_health.failed(&e);
            return Some(backoff.delay(failures, None));
        }
        Err(e) => {
            ctx.store_failed(&e);
            return None;
        }
    }
    Some(if exhausted {
        Duration::ZERO
    } else {
        backoff.delay(failures, None)
    })
}

async fn drive(ctx: &Arc<Context>, job: &mut Job) -> Result<(), StoreError> {
    let mut shutdown = ctx.engine.shutdown.clone();
    let mut attempted = false;
    loop {
        match job.state {
            JobState::Done | JobState::Failed | JobState::Superseded => return Ok(()),
            JobState::Filing => return file_done(ctx, job).await,
            JobState::Failing => return file_failed(ctx, job).await,
            _ => {}
        }
        if job.filing.is_some() || job.filed_to.is_some() {
            // A retried job whose file is not back in the watch folder yet.
            if !bring_back(ctx, job).await? {
                return Ok(());
            }
            continue;
        }
        if unrouted(job) {
            route_retried(ctx, job).await?;
            continue;
        }
        let Some(handle) = ctx.providers.get(&job.provider).cloned() else {
            let reason = format!(
                "provider {:?} is no longer in the config; add it back and `{}`",
                job.provider,
                crate::jobs::retry_command(&ctx.config, job.id)
            );
            note_failure(job, &ProviderError::new(ErrorKind::Permanent, reason));
            job.apply(Outcome::Permanent);
            ctx.store.put(job).await?;
            continue;
        };
        if let Some(scope) = ctx.engine.pauses.holding(&job.watch, &job.provider) {
            tracing::info!(scope = %scope, "paused; waiting to be resumed");
            ctx.engine.pauses.park(job.id);
            return Ok(());
        }
        let permits = tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return Ok(()),
            permits = async {
                let provider = Arc::clone(&handle.permits).acquire_owned().await;
                let worker = Arc::clone(&ctx.workers).acquire_owned().await;
                (provider, worker)
            } => permits,
        };
        // Paused while it waited for a slot: no new upload starts.
        if ctx
            .engine
            .pauses
            .holding(&job.watch, &job.provider)
            .is_some()
        {
            drop(permits);
            continue;
        }
        // The config was reloaded while it waited and it has not started
        // here: it starts on the new settings (its provider may be gone).
        if !attempted && ctx.superseded() {
            drop(permits);
            ctx.spawn_job(job.clone());
            return Ok(());
        }
        attempted = true;
        job.attempts += 1;
        // Tests make an attempt panic or pause here (failpoint actions).
        crate::failpoint::active("job::attempt");
        let end = ctx.engine.attempt(job, &handle).await;
        drop(permits);
        match end {
            AttemptEnd::Delivered(delivery) => {
                tracing::info!(remote = %delivery.remote_id, "delivered");
                let seconds = job
                    .started_at
                    .map(|started| jiff::Timestamp::now().duration_since(started).as_secs_f64());
                ctx.metrics
                    .upload_finished(&job.provider, "delivered", seconds);
                job.delivery = Some(delivery);
                if let Some(fingerprint) = &job.fingerprint {
                    ctx.store
                        .record_content(&job.provider, fingerprint, job.id)
                        .await?;
                }
                crate::failpoint::crash("finalize::after");
                job.apply(Outcome::Delivered);
                // Durable with filing's first step, before anything is
                // moved or the provider's own record of it is released.
                ctx.store.put_buffered(job).await?;
            }
            AttemptEnd::Duplicate(earlier) => {
                tracing::info!(
                    earlier,
                    "same content already delivered to this provider; skipped"
                );
                ctx.metrics
                    .upload_finished(&job.provider, "duplicate", None);
                job.duplicate_of = Some(earlier);
                job.apply(Outcome::Duplicate);
                ctx.store.put(job).await?;
            }
            AttemptEnd::Failed(error) => {
                note_failure(job, &error);
                job.failures += 1;
                let permanent = matches!(error.kind, ErrorKind::Permanent | ErrorKind::Unavailable);
                if permanent || handle.backoff.exhausted(job.failures) {
                    tracing::error!(error = %error, attempts = job.attempts, "job failed");
                    ctx.metrics.upload_finished(&job.provider, "failed", None);
                    job.apply(Outcome::Permanent);
                    ctx.store.put(job).await?;
                    continue;
                }
                let reason = match error.status {
                    Some(status) => format!("http_{status}"),
                    None => format!("{:?}", error.kind).to_ascii_lowercase(),
                };
                ctx.metrics.retried(&job.provider, reason);
                let delay = handle.backoff.delay(job.failures, error.retry_after);
                tracing::warn!(error = %error, failures = job.failures, retry_in = ?delay, "attempt failed; will retry");
                job.apply(Outcome::Transient);
                ctx.notifier
                    .raise(&ctx.config, job, NotifyEvent::Retried)
                    .await?;
                ctx.store.put(job).await?;
                if !ctx.engine.pause(delay).await {
                    return Ok(());
                }
            }
            AttemptEnd::SourceChanged(why) => {
                ctx.metrics
                    .upload_finished(&job.provider, "superseded", None);
                tracing::warn!(reason = %why, "source changed; abandoning this upload, the file will be taken again once stable");
                abandon_session(&ctx.store, job, &handle).await?;
                job.apply(Outcome::SourceChanged);
                ctx.store.put(job).await?;
                reoffer(ctx, job);
                return Ok(());
            }
            AttemptEnd::Interrupted => {
                ctx.store.put(job).await?;
                return Ok(());
            }
            AttemptEnd::Paused(scope) => {
                // Stopped at a chunk boundary, not a failure: not an attempt.
                job.attempts = job.attempts.saturating_sub(1);
                ctx.store.put(job).await?;
                tracing::info!(scope = %scope, acked = job.acked, "paused after the chunk in flight");
            }
            AttemptEnd::SameContentInFlight(earlier) => {
                // Waiting is not an attempt, and holds no upload slot.
                job.attempts = job.attempts.saturating_sub(1);
                ctx.store.put(job).await?;
                tracing::info!(
                    earlier,
                    "job {earlier} is uploading the same content to this provider; waiting for it"
                );
                if !wait_until_finished(ctx, earlier).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Wait until job `id` is in a terminal state (polled: it may be run by
/// another task, or after a restart). `false` when the daemon stops first.
async fn wait_until_finished(ctx: &Context, id: u64) -> Result<bool, StoreError> {
    loop {
        match ctx.store.get(id).await {
            Ok(other) if !other.state.is_terminal() => {}
            Ok(_) | Err(StoreError::NotFound(_)) => return Ok(true),
            Err(e) => return Err(e),
        }
        if !ctx.engine.pause(Duration::from_millis(250)).await {
            return Ok(false);
        }
    }
}

/// Give up the job's remote upload (deleted where the protocol allows); one
/// that cannot be deleted is named in the job's `replaced` list, so the
/// receipt or report tells someone to remove it. The caller records the job
/// afterwards.
///
/// The job is recorded without its session before the delete, and that
/// write is fenced: a fleet node that lost the job (frozen past its lease)
/// stops there and deletes nothing, and a node that takes the job over
/// never resumes a session that is being deleted.
async fn abandon_session(
    store: &Store,
    job: &mut Job,
    handle: &ProviderHandle,
) -> Result<(), StoreError> {
    // A test holds the process here (as a freeze would) to show what a
    // node that wakes after losing the job does next.
    crate::failpoint::active("abandon::before");
    let Some(session) = job.session.take() else {
        return Ok(());
    };
    let name = session.remote_id.clone().or(session.upload_url.clone());
    if let Some(name) = &name {
        // Named until the delete is known to have happened (a crash in
        // between leaves it named, as an orphan to remove).
        job.replaced.push(format!("{name} (given up; deleting it)"));
    }
    store.put(job).await?;
    let outcome = handle.provider.abandon(&session).await;
    if name.is_some() {
        job.replaced.pop();
    }
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "could not delete the abandoned upload");
        if let Some(name) = name {
            job.replaced.push(format!("{name} (not deleted: {e})"));
        }
    }
    Ok(())
}

/// Ask the job's watch to look at its source again (it changed).
fn reoffer(ctx: &Context, job: &Job) {
    ctx.jobs.held.release(&job.source);
    if let Some(commands) = ctx.watch_commands.get().get(&job.watch) {
        let _ = commands.send(WatchCommand::Reoffer(job.source.clone()));
    }
}

/// How a filing step ended.
enum Filed {
    /// The file is here now.
    At(PathBuf),
    /// It cannot be moved (gone, or no free name): the job ends with the
    /// file where it is; the reason is on the job.
    LeftInPlace,
    /// Shutdown came while waiting to try again.
    Stopped,
}

/// Move the job's source below `root` keeping its relative path, through a
/// recorded intent (SPEC §3.6): the free name is chosen and persisted
/// first, then the move is made, then its result recorded. A crash at any
/// point is finished from the intent by the next start, never repeated.
/// Transient failures (a full disk, a mount gone) are retried with backoff;
/// the file stays where it is meanwhile. The name of the report that will
/// sit beside the file (`report`: its suffix) is chosen and recorded with
/// the intent, in the same durable write.
async fn file_below(
    ctx: &Context,
    job: &mut Job,
    root: &Path,
    report: Option<&'static str>,
) -> Result<Filed, StoreError> {
    if let Some(filed) = &job.filed_to {
        return Ok(Filed::At(filed.clone()));
    }
    let backoff = crate::retry::Backoff::new(
        ctx.providers
            .get(&job.provider)
            .map_or_else(Default::default, |h| h.config.retry),
    );
    let target = root.join(&job.relpath);
    let mut failures = 0;
    loop {
        // Either choose the name and record the intent, or act on the
        // recorded intent: the move is never made before it is recorded.
        let step = match job.filing.clone() {
            None => {
                let (from, to) = (job.source.clone(), target.clone());
                blocking(move || {
                    let intent = crate::finish::plan(&from, &to)?;
                    // No free report name yet is no reason not to file:
                    // the report then chooses its name when it is written.
                    let report = report.and_then(|suffix| {
                        crate::fsx::free_name(&finish::report_path(&intent.to, suffix)).ok()
                    });
                    Ok(FilingStep::Planned(intent, report))
                })
                .await
            }
            Some(intent) => {
                let signature = job.signature;
                blocking(move || crate::finish::carry_out(&intent, &signature))
                    .await
                    .map(FilingStep::Carried)
            }
        };
        match step {
            Ok(FilingStep::Planned(intent, report)) => {
                job.filing = Some(intent);
                if let Some(report) = report {
                    job.report_temporary = Some(crate::fsx::temporary_beside(&report));
                    job.report = Some(report);
                }
                ctx.store.put(job).await?;
                // The delivery is durable with the intent: the provider's
                // own record of it can go, whatever filing meets next.
                release_session(ctx, job).await;
            }
            Ok(FilingStep::Carried(Carried::Moved(to))) => {
                crate::failpoint::crash("filing::after_move");
                job.filed_to = Some(to.clone());
                job.filing = None;
                // Lost in a crash, this is learnt again from the intent
                // (the move is found made); the job's end makes it durable.
                ctx.store.put_buffered(job).await?;
                return Ok(Filed::At(to));
            }
            Ok(FilingStep::Carried(Carried::NameTaken)) => {
                job.filing = None;
            }
            Err(e) if e.permanent => {
                tracing::error!(error = %e, "cannot file the source; it stays where it is");
                note_filing_failure(job, &e);
                job.filing = None;
                ctx.store.put(job).await?;
                return Ok(Filed::LeftInPlace);
            }
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, "cannot file the source; will try again (nothing is lost: the file stays where it is)");
                note_filing_failure(job, &e);
                ctx.store.put(job).await?;
                release_session(ctx, job).await;
                let delay = backoff
                    .delay(failures.min(20), None)
                    .max(Duration::from_millis(500));
                if !ctx.engine.pause(delay).await {
                    return Ok(Filed::Stopped);
                }
            }
        }
    }
}

/// One step of filing: a name chosen (to record, with its report's name),
/// or a recorded move made.
enum FilingStep {
    Planned(crate::state::FilingIntent, Option<PathBuf>),
    Carried(Carried),
}

/// Record a filing failure, keeping the reason a failing job failed for.
fn note_filing_failure(job: &mut Job, error: &crate::finish::FilingError) {
    let original = job.last_error.clone();
    note_failure(
        job,
        &ProviderError::new(ErrorKind::Transient, error.to_string()),
    );
    if let (Some(previous), Some(now)) = (original, job.last_error.as_mut())
        && job.state == JobState::Failing
    {
        now.reason = format!("{} (and then: {})", previous.reason, now.reason);
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::finish::FilingError> + Send + 'static,
) -> Result<T, crate::finish::FilingError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(crate::finish::FilingError {
            path: PathBuf::new(),
            message: format!("filing thread failed: {e}"),
            permanent: false,
        })
    })
}

/// File the source below `root`, then its sidecar beside it; `report` as
/// for [`file_below`].
async fn file_with_sidecar(
    ctx: &Context,
    job: &mut Job,
    root: &Path,
    report: Option<&'static str>,
) -> Result<Filed, StoreError> {
    let filed = file_below(ctx, job, root, report).await?;
    if let Filed::At(filed) = &filed
        && let Some(sidecar) = job.sidecar.clone().filter(|s| s.exists())
    {
        let video = filed.clone();
        match blocking(move || crate::finish::file_sidecar(&sidecar, &video)).await {
            Ok(moved) => job.sidecar_filed_to = Some(moved),
            Err(e) => tracing::warn!(error = %e, "sidecar left in place"),
        }
    }
    if matches!(filed, Filed::At(_)) {
        tidy_watch_folder(ctx, job).await;
    }
    Ok(filed)
}

/// Remove the subfolders of the watch folder that the job's file (and
/// sidecar) left empty; never the watch folder itself.
async fn tidy_watch_folder(ctx: &Context, job: &Job) {
    let Some(watch) = ctx.watch(&job.watch) else {
        return;
    };
    let root = watch
        .path
        .canonicalize()
        .unwrap_or_else(|_| watch.path.clone());
    let source = job.source.clone();
    let _ =
        tokio::task::spawn_blocking(move || crate::fsx::remove_empty_parents(&source, &root)).await;
}

/// Write the job's receipt or error report as `<at><suffix>`, once: the
/// name is chosen (never one that is taken) and recorded first, so a
/// restart finds the report it wrote before a crash instead of writing a
/// second one.
async fn write_report_once(
    ctx: &Context,
    job: &mut Job,
    at: &Path,
    suffix: &str,
    report: serde_json::Value,
) -> Result<(), StoreError> {
    let stale = job.report_temporary.take();
    if let Some(stale) = &stale {
        // Written through before a crash, or never created: either way not
        // something to leave in the user's folder.
        let _ = std::fs::remove_file(stale);
    }
    if let Some(written) = &job.report
        && crate::finish::is_report_of(written, job.id)
    {
        return if stale.is_some() {
            ctx.store.put(job).await
        } else {
            Ok(())
        };
    }
    let wanted = finish::report_path(at, suffix);
    // The name chosen and recorded with the filing: written there, unless
    // someone took that name meanwhile.
    if let (Some(planned), Some(temporary)) = (job.report.clone(), stale)
        && (0..crate::fsx::MAX_NUMBERED).any(|n| crate::fsx::numbered(&wanted, n) == planned)
    {
        job.report_temporary = Some(temporary.clone());
        match write_report_at(&planned, &temporary, &report).await {
            Ok(true) => {
                job.report_temporary = None;
                return Ok(());
            }
            Ok(false) => {}
            Err(()) => return Ok(()),
        }
    }
    for _ in 0..crate::fsx::MAX_NUMBERED {
        let path = match crate::fsx::free_name(&wanted) {
            Ok(path) => path,
            Err(e) => {
                tracing::error!(path = %wanted.display(), error = %e, "cannot write the report");
                return Ok(());
            }
        };
        let temporary = crate::fsx::temporary_beside(&path);
        job.report = Some(path.clone());
        job.report_temporary = Some(temporary.clone());
        ctx.store.put(job).await?;
        match write_report_at(&path, &temporary, &report).await {
            Ok(true) => {
                job.report_temporary = None;
                return Ok(());
            }
            Ok(false) => continue,
            Err(()) => return Ok(()),
        }
    }
    Ok(())
}

/// Write a report at `path` through `temporary` (recorded before): `true`
/// once written, `false` when the name is taken, `Err` (logged) when it
/// cannot be written at all.
async fn write_report_at(
    path: &Path,
    temporary: &Path,
    report: &serde_json::Value,
) -> Result<bool, ()> {
    let (at, through, body) = (path.to_path_buf(), temporary.to_path_buf(), report.clone());
    // Written and fsynced on the blocking pool, not a runtime thread.
    let written = tokio::task::spawn_blocking(move || finish::write_report(&at, &through, &body))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match written {
        Ok(()) => {
            crate::failpoint::crash("report::after_write");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot write the report");
            Err(())
        }
    }
}

/// The delivery is on disk: the provider's own bookkeeping for an
/// idempotent finalisation (the folder provider's marker) can go.
async fn release_session(ctx: &Context, job: &Job) {
    if let Some(handle) = ctx.providers.get(&job.provider)
        && let Some(session) = &job.session
    {
        handle.provider.release(session).await;
    }
}

/// The suffix of a delivered file's receipt.
const RECEIPT: &str = ".receipt.json";
/// The suffix of a failed file's error report.
const ERROR_REPORT: &str = ".error.json";

async fn file_done(ctx: &Arc<Context>, job: &mut Job) -> Result<(), StoreError> {
    let Some(watch) = ctx.watch(&job.watch).cloned() else {
        job.apply(Outcome::Filed);
        ctx.notifier
            .raise(&ctx.config, job, NotifyEvent::Done)
            .await?;
        ctx.store.put(job).await?;
        release_session(ctx, job).await;
        return Ok(());
    };
    if job.filed_to.is_none() && job.filing.is_none() && source_changed(job) {
        // Overwritten after the upload finished: the remote video holds the
        // earlier version; the new one is taken as a new file.
        let earlier = job
            .delivery
            .as_ref()
            .map_or_else(|| "(duplicate)".into(), |d| d.remote_id.clone());
        tracing::warn!(remote = %earlier, "source changed after delivery; the new version will be uploaded as a new file");
        job.replaced.push(format!(
            "{earlier} (holds the version before the source changed)"
        ));
        job.apply(Outcome::SourceChanged);
        ctx.store.put(job).await?;
        release_session(ctx, job).await;
        reoffer(ctx, job);
        return Ok(());
    }
    let receipt = watch.receipts.then_some(RECEIPT);
    if watch.after_success != AfterSuccess::Move {
        // Moving makes the delivery durable with its intent; otherwise
        // that happens here, before the source is deleted.
        ctx.store.flush().await?;
        release_session(ctx, job).await;
    }
    let receipt_at = match watch.after_success {
        AfterSuccess::Move => {
            let filed = file_with_sidecar(ctx, job, &watch.done_dir, receipt).await?;
            release_session(ctx, job).await;
            match filed {
                Filed::At(filed) => filed,
                Filed::LeftInPlace => watch.done_dir.join(&job.relpath),
                Filed::Stopped => return Ok(()),
            }
        }
        AfterSuccess::Delete => {
            // In a fleet, only the job's holder deletes; and only the
            // version it delivered (checked just before the delete: a new
            // file may have been dropped under the same name).
            ctx.store.confirm_hold(job).await?;
            let ours = if source_changed(job) {
                tracing::warn!(path = %job.source.display(), "not deleted: another file is there now");
                Vec::new()
            } else {
                vec![Some(job.source.clone()), job.sidecar.clone()]
            };
            for path in ours.into_iter().flatten() {
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete delivered source");
                }
            }
            tidy_watch_folder(ctx, job).await;
            watch.done_dir.join(&job.relpath)
        }
        AfterSuccess::Leave => watch.done_dir.join(&job.relpath),
    };
    if receipt.is_some() {
        let earlier = match job.duplicate_of {
            Some(id) => ctx.store.get(id).await.ok(),
            None => None,
        };
        let receipt = receipt_of(job, earlier);
        write_report_once(ctx, job, &receipt_at, RECEIPT, receipt).await?;
    }
    // Done is done: a retried error from earlier on would only mislead status.
    job.last_error = None;
    job.apply(Outcome::Filed);
    ctx.notifier
        .raise(&ctx.config, job, NotifyEvent::Done)
        .await?;
    ctx.store.put(job).await?;
    tracing::info!(filed_to = %job.filed_to.as_deref().map_or_else(|| "(left in place)".into(), |p| p.display().to_string()), "done");
    Ok(())
}

/// The receipt of a delivered (or duplicate-skipped) `job`, naming the
/// `earlier` job whose delivery it stands for.
fn receipt_of(job: &Job, earlier: Option<Job>) -> serde_json::Value {
    let receipt = Receipt {
        job: job.id,
        watch: &job.watch,
        file: job.relpath.to_string_lossy(),
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
    serde_json::to_value(&receipt).unwrap_or_default()
}

/// The source is there but is not the version this job delivered.
fn source_changed(job: &Job) -> bool {
    std::fs::metadata(&job.source)
        .is_ok_and(|meta| !crate::state::FileSignature::of(&meta).same_content(&job.signature))
}

async fn file_failed(ctx: &Arc<Context>, job: &mut Job) -> Result<(), StoreError> {
    // A failed upload is given up, not left half-filled on the server (or
    // as a partial file in a folder destination).
    if job.session.is_some()
        && job.delivery.is_none()
        && let Some(handle) = ctx.providers.get(&job.provider).cloned()
    {
        abandon_session(&ctx.store, job, &handle).await?;
        ctx.store.put(job).await?;
    }
    let Some(watch) = ctx.watch(&job.watch).cloned() else {
        job.apply(Outcome::Filed);
        ctx.notifier
            .raise(&ctx.config, job, NotifyEvent::Failed)
            .await?;
        return ctx.store.put(job).await;
    };
    let present = job.source.exists() || job.filed_to.is_some() || job.filing.is_some();
    let report_at = if present {
        match file_with_sidecar(ctx, job, &watch.failed_dir, Some(ERROR_REPORT)).await? {
            Filed::At(filed) => filed,
            Filed::LeftInPlace => watch.failed_dir.join(&job.relpath),
            Filed::Stopped => return Ok(()),
        }
    } else {
        watch.failed_dir.join(&job.relpath)
    };
    tell_paths_as_they_are_now(job);
    let error = job.last_error.clone();
    let report = ErrorReport {
        job: job.id,
        watch: &job.watch,
        file: job.relpath.to_string_lossy(),
        provider: &job.provider,
        reason: error.as_ref().map_or("unknown", |e| e.reason.as_str()),
        status: error.as_ref().and_then(|e| e.status),
        excerpt: error.as_ref().and_then(|e| e.excerpt.as_deref()),
        attempts: job.attempts,
        failed_at: jiff::Timestamp::now(),
        retry_with: crate::jobs::retry_command(&ctx.config, job.id),
        replaced: &job.replaced,
    };
    let report = serde_json::to_value(&report).unwrap_or_default();
    write_report_once(ctx, job, &report_at, ERROR_REPORT, report).await?;
    tracing::warn!(reason = %error.as_ref().map_or("unknown", |e| e.reason.as_str()), filed_to = %job.filed_to.as_deref().map_or_else(|| "(not moved)".into(), |p| p.display().to_string()), "failed");
    job.apply(Outcome::Filed);
    ctx.notifier
        .raise(&ctx.config, job, NotifyEvent::Failed)
        .await?;
    ctx.store.put(job).await?;
    Ok(())
}

/// A failed job's reason named its file and sidecar where they were; once
/// both are filed into failed/, it names them where they are now (that is
/// where someone fixes them).
fn tell_paths_as_they_are_now(job: &mut Job) {
    let moves = [
        (job.sidecar.clone(), job.sidecar_filed_to.clone()),
        (Some(job.source.clone()), job.filed_to.clone()),
    ];
    let Some(error) = job.last_error.as_mut() else {
        return;
    };
    for (was, now) in moves {
        if let (Some(was), Some(now)) = (was, now)
            && was != now
        {
            error.reason = error
                .reason
                .replace(&*was.to_string_lossy(), &now.to_string_lossy());
        }
    }
}

/// Finish a `retry`: move the file back from failed/ into the watch
/// folder through a recorded intent (the job is queued before the file
/// moves, so the watch never takes it as a new file). Answers false on
/// shutdown.
async fn bring_back(ctx: &Context, job: &mut Job) -> Result<bool, StoreError> {
    match crate::jobs::bring_back(&ctx.store, &ctx.config, &ctx.jobs.held, job).await {
        Ok(()) => Ok(true),
        Err(crate::jobs::RetryError::Store(e)) => Err(e),
        Err(e) => {
            tracing::error!(error = %e, "cannot bring the retried file back");
            note_failure(
                job,
                &ProviderError::new(ErrorKind::Permanent, e.to_string()),
            );
            job.filing = None;
            job.apply(Outcome::Permanent);
            ctx.store.put(job).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files `clip-N.mp4` in `folder` for N in `numbers`, as look `look`
    /// of watch `watch` found them ready.
    fn ready_files(
        folder: &Path,
        watch: &str,
        look: u64,
        numbers: std::ops::Range<usize>,
    ) -> Vec<ReadyFile> {
        numbers
            .map(|i| {
                let relpath = PathBuf::from(format!("clip-{i}.mp4"));
                ReadyFile {
                    watch: watch.into(),
                    path: folder.join(&relpath),
                    relpath,
                    signature: crate::state::FileSignature {
                        size: 1,
                        mtime_ns: 0,
                        dev: 0,
                        ino: i as u64,
                    },
                    mtime: SystemTime::UNIX_EPOCH,
                    look,
                }
            })
            .collect()
    }

    /// A look's ready files come in messages of at most READY_AT_ONCE:
    /// their folder is listed for sidecars at the look's first message and
    /// that listing serves the rest of the look (a drop of 10,000 files in
    /// one folder was listed 40 times); the next look lists it again.
    #[tokio::test]
    async fn a_folder_is_listed_for_sidecars_once_per_look() {
        let dir = tempfile::tempdir().unwrap();
        let ready = |look: u64, from: usize| {
            ready_files(
                dir.path(),
                "w",
                look,
                from..from + FolderSidecars::WORTH_FROM,
            )
        };
        let sidecar_of = |listings: &SidecarListings, file: &ReadyFile| {
            crate::route::find_sidecar(&file.path, listings.of(&file.watch, file.look, &file.path))
        };
        let mut listings = SidecarListings::default();
        let first = ready(1, 0);
        listings.list_for(&first).await;
        assert!(
            listings.of("w", 1, &first[0].path).is_some(),
            "listed at the look's first message"
        );
        // A sidecar that came after the look was listed.
        std::fs::write(dir.path().join("clip-40.json"), "{}").unwrap();
        let second = ready(1, 32);
        listings.list_for(&second).await;
        assert_eq!(
            sidecar_of(&listings, &second[8]),
            None,
            "the rest of the look is answered from its first listing"
        );
        let next_look = ready(2, 32);
        listings.list_for(&next_look).await;
        assert_eq!(
            sidecar_of(&listings, &next_look[8]),
            Some(dir.path().join("clip-40.json")),
            "the next look lists the folder again"
        );
    }

    /// A folder too big for one message's files to be worth listing is
    /// listed for a later message of the look that has more of them; and
    /// only the latest look's listings are kept (a watch that a reload
    /// removed, or that goes quiet, holds none).
    #[tokio::test]
    async fn a_folder_too_big_for_one_message_is_listed_for_a_bigger_one_and_one_look_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let few = FolderSidecars::WORTH_FROM;
        // More entries than the first message's files are worth listing.
        for i in 0..few * FolderSidecars::ENTRIES_PER_FILE + 10 {
            std::fs::write(dir.path().join(format!("other-{i}.mp4")), b"").unwrap();
        }
        let ready =
            |watch: &str, look: u64, files: usize| ready_files(dir.path(), watch, look, 0..files);
        let mut listings = SidecarListings::default();
        let first = ready("w", 1, few);
        listings.list_for(&first).await;
        assert!(
            listings.of("w", 1, &first[0].path).is_none(),
            "too big to list for {few} files"
        );
        let bigger = ready("w", 1, 2 * few);
        listings.list_for(&bigger).await;
        assert!(
            listings.of("w", 1, &bigger[0].path).is_some(),
            "listed for a message of the same look with twice as many files"
        );
        listings.list_for(&ready("v", 7, 2 * few)).await;
        assert!(
            listings.of("w", 1, &bigger[0].path).is_none(),
            "another look's message: the earlier look's listings are gone"
        );
    }

    #[tokio::test]
    async fn slots_resized_down_are_taken_back_as_they_free_up() {
        let slots = Arc::new(Semaphore::new(4));
        let held = Arc::clone(&slots)
            .acquire_many_owned(3)
            .await
            .expect("3 held");
        // 4 → 2 with 3 in use: the free one goes now, one more when freed.
        resize(&slots, 4, 2);
        assert_eq!(slots.available_permits(), 0);
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), async {
            while slots.available_permits() != 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("2 slots once the uploads ended");
        resize(&slots, 2, 5);
        assert_eq!(slots.available_permits(), 5);
    }
}
