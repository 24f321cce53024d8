//! Operations on jobs shared by the daemon, the control socket and the
//! offline commands: the status view, and `retry` (which moves a failed file
//! back from failed/ and queues its job again).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use serde::Serialize;

use crate::config::Config;
use crate::finish::{self, Carried};
use crate::lifecycle::Outcome;
use crate::metrics::Metrics;
use crate::state::{Job, JobState, JobStore, Store, StoreError};
use crate::upload::progress::{Progress, ProgressBoard};
use crate::watch::{HeldSources, WatchCounters};

/// What the HTTP API and the control socket need of a running daemon: the
/// job store, live progress, counters, the config (for `retry` and the
/// API token) and a way to queue a job. A small handle, so that neither
/// sees (nor depends on) the daemon's whole context.
#[derive(Clone)]
pub struct JobsHandle {
    /// The configuration the daemon runs with (replaced at a reload).
    pub config: crate::reload::Shared<Config>,
    /// The job store.
    pub store: Store,
    /// Live progress of jobs in flight.
    pub progress: ProgressBoard,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Watch counters by watch name (replaced when a reload changes the watches).
    pub watch_counters: crate::reload::Shared<HashMap<String, Arc<WatchCounters>>>,
    /// Sources that jobs hold (the watches leave them alone).
    pub held: Arc<HeldSources>,
    /// Whether the fleet database answers.
    pub store_health: Arc<crate::state::StoreHealth>,
    /// The paused scopes, as the running jobs see them (none until the
    /// daemon gives its own).
    pub pauses: crate::pause::Pauses,
    /// The bandwidth limits in force (none until the daemon gives its own).
    pub bandwidth: Arc<crate::bandwidth::Bandwidth>,
    /// The webhooks' sender (for their counters), once the daemon has one.
    pub notifier: Option<Arc<crate::notify::Notifier>>,
    /// Asks the daemon to read its config again (none outside a daemon).
    pub reload: Option<crate::reload::Asker>,
    queue: mpsc::UnboundedSender<Job>,
    /// Jobs queued here and not yet ended (count per id): in a fleet, the
    /// claims this node renews, wherever the job is on its way to a worker.
    accepted: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
}

impl JobsHandle {
    /// A handle whose queued jobs come out of `queue`'s receiver.
    pub fn new(
        config: &Config,
        store: Store,
        progress: ProgressBoard,
        metrics: Arc<Metrics>,
        watch_counters: crate::reload::Shared<HashMap<String, Arc<WatchCounters>>>,
        held: Arc<HeldSources>,
        queue: mpsc::UnboundedSender<Job>,
    ) -> Self {
        JobsHandle {
            config: crate::reload::Shared::new(config.clone()),
            store,
            progress,
            metrics,
            watch_counters,
            held,
            store_health: Arc::default(),
            pauses: Default::default(),
            bandwidth: Arc::default(),
            notifier: None,
            reload: None,
            queue,
            accepted: Arc::default(),
        }
    }

    /// Pause (`paused`) or resume `scope` for the API and the control
    /// socket: in the store, and for the running jobs at once.
    ///
    /// # Errors
    /// See [`crate::pause::change`].
    pub async fn change_pause(
        &self,
        scope: crate::pause::Scope,
        paused: bool,
    ) -> Result<std::collections::BTreeSet<crate::pause::Scope>, crate::pause::PauseError> {
        crate::pause::change(
            &self.store,
            &self.config.get(),
            Some(&self.pauses),
            scope,
            paused,
        )
        .await
    }

    /// Webhook events waiting for their receiver, at most `limit`; none
    /// (and no read of the outbox) while no webhook is configured.
    ///
    /// # Errors
    /// The store's failure.
    pub async fn webhook_events_waiting(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::notify::Notification>, StoreError> {
        match &self.notifier {
            Some(notifier) if !notifier.is_empty() => self.store.outbox(limit).await,
            _ => Ok(Vec::new()),
        }
    }

    /// Queue a job (already stored) for a worker; it holds its source.
    pub fn queue(&self, job: Job) {
        self.held.hold(&job.source);
        if let Ok(mut accepted) = self.accepted.lock() {
            *accepted.entry(job.id).or_insert(0) += 1;
        }
        let _ = self.queue.send(job);
    }

    /// A queued job's run ended here (finished, handed on, or not run).
    pub fn ended(&self, id: u64) {
        if let Ok(mut accepted) = self.accepted.lock()
            && let Some(n) = accepted.get_mut(&id)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                accepted.remove(&id);
            }
        }
    }

    /// The jobs queued here and not yet ended: in a fleet, the claims this
    /// node renews. A job it holds but runs nothing for is not among them,
    /// so its claim lapses and it is claimed again.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted
            .lock()
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// The command that retries job `id`, as it works when pasted into a shell
/// anywhere: with `-c` and the config's absolute path, quoted when needed.
pub fn retry_command(config: &Config, id: u64) -> String {
    let file = config
        .file
        .canonicalize()
        .unwrap_or_else(|_| config.file.clone());
    let file = file.to_string_lossy();
    let plain = file
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@".contains(c));
    let file = if plain {
        file.into_owned()
    } else {
        format!("'{}'", file.replace('\'', "'\\''"))
    };
    format!("hotfolder retry -c {file} {id}")
}

/// One row of `status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct JobView {
    /// Job id.
    pub id: u64,
    /// Watch name.
    pub watch: String,
    /// Path relative to the watch.
    pub file: String,
    /// Provider name.
    pub provider: String,
    /// State name.
    pub state: String,
    /// Bytes the provider has confirmed: what a resume starts from.
    pub bytes_acknowledged: u64,
    /// File size.
    pub size: u64,
    /// Upload rate while in flight.
    pub bytes_per_second: Option<f64>,
    /// Seconds left while in flight.
    pub eta_seconds: Option<f64>,
    /// Attempts made.
    pub attempts: u32,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Where the file was filed.
    pub filed_to: Option<String>,
    /// Remote id of the delivery.
    pub remote_id: Option<String>,
    /// Earlier job whose delivery this one duplicates.
    pub duplicate_of: Option<u64>,
    /// In a fleet, the node that runs (or ran) the job.
    pub node: Option<String>,
    /// Body bytes sent over all attempts, resends included (at least
    /// `bytes_acknowledged` once delivered; more after cuts and retries).
    pub bytes_sent: u64,
}

impl JobView {
    /// The view of a job, with live progress if it is in flight.
    pub fn of(job: &Job, live: Option<Progress>) -> Self {
        let bytes = if job.state == JobState::Done {
            job.signature.size
        } else {
            job.acked
        };
        JobView {
            id: job.id,
            watch: job.watch.clone(),
            file: job.relpath.to_string_lossy().into_owned(),
            provider: job.provider.clone(),
            state: job.state.as_str().to_string(),
            bytes_acknowledged: live.as_ref().map_or(bytes, |p| p.acknowledged.max(bytes)),
            size: job.signature.size,
            bytes_per_second: live.as_ref().map(|p| p.bytes_per_second),
            eta_seconds: live.as_ref().and_then(|p| p.eta_seconds),
            attempts: job.attempts,
            // A delivered job's last error is history, not its state.
            last_error: (job.state != JobState::Done)
                .then(|| job.last_error.as_ref().map(|e| e.reason.clone()))
                .flatten(),
            filed_to: job
                .filed_to
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            remote_id: job.delivery.as_ref().map(|d| d.remote_id.clone()),
            duplicate_of: job.duplicate_of,
            node: job.node.clone(),
            bytes_sent: job.bytes_sent,
        }
    }
}

/// Every job as a view.
///
/// # Errors
/// Store failures.
pub async fn status(
    store: &Store,
    progress: Option<&ProgressBoard>,
) -> Result<Vec<JobView>, StoreError> {
    Ok(store
        .all()
        .await?
        .iter()
        .map(|job| JobView::of(job, progress.and_then(|p| p.get(job.id))))
        .collect())
}

/// Why a job could not be retried.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not in the failed state.
    #[error("job {id} is {state}, not failed; only failed jobs can be retried")]
    NotFailed {
        /// Job id.
        id: u64,
        /// Its state.
        state: &'static str,
    },
    /// The file cannot be brought back.
    #[error("job {id}: {message}")]
    File {
        /// Job id.
        id: u64,
        /// What went wrong.
        message: String,
    },
}

/// Put a failed job back in the queue: the job is `queued` (and recorded)
/// first, then its file moves back from failed/ into the watch folder (a
/// numbered name if the old one is taken) and its error report is removed.
/// Queued first, so that the watch, seeing the file come back, finds it
/// covered by this job and never makes a second one; a crash before the
/// move is finished by the daemon, which brings the file back before it
/// uploads it.
///
/// # Errors
/// [`RetryError`] naming the job and the cause.
pub async fn retry(
    store: &Store,
    config: &Config,
    held: &HeldSources,
    id: u64,
) -> Result<Job, RetryError> {
    let mut job = store.get(id).await?;
    if job.state != JobState::Failed {
        return Err(RetryError::NotFailed {
            id,
            state: job.state.as_str(),
        });
    }
    // In a fleet, the retrying process holds the job from here on.
    store.claim_for_retry(&mut job).await?;
    if let Some(report) = job.report.take()
        && finish::is_report_of(&report, job.id)
    {
        let _ = std::fs::remove_file(report);
    }
    job.apply(Outcome::Retry);
    job.failures = 0;
    job.last_error = None;
    store.put(&mut job).await?;
    if let Err(e) = bring_back(store, config, held, &mut job).await {
        // Queued but not run here: in a fleet, a running node takes it (and
        // files it as failed again if its file cannot be found).
        let _ = store.release_claim(&job).await;
        return Err(e);
    }
    Ok(job)
}

/// Move a retried job's file back from failed/ into its watch folder,
/// recording the chosen name (and the job's new relative path) before the
/// move. Nothing to do when the file was never moved.
///
/// # Errors
/// [`RetryError`] naming the job and the cause.
pub async fn bring_back(
    store: &Store,
    config: &Config,
    held: &HeldSources,
    job: &mut Job,
) -> Result<(), RetryError> {
    let id = job.id;
    let Some(filed) = job.filed_to.clone() else {
        job.filing = None;
        return Ok(());
    };
    let Some(watch) = config.watches.iter().find(|w| w.name == job.watch) else {
        return Err(RetryError::File {
            id,
            message: format!(
                "watch {:?} is no longer configured; move {} back by hand",
                job.watch,
                filed.display()
            ),
        });
    };
    let file_error = |message: String| RetryError::File { id, message };
    for _ in 0..crate::fsx::MAX_NUMBERED {
        let intent = match job.filing.clone() {
            Some(intent) => intent,
            None => {
                if !filed.exists() {
                    return Err(file_error(format!(
                        "its file is no longer at {}; put it back in the watch folder by hand",
                        filed.display()
                    )));
                }
                let intent = finish::plan(&filed, &watch.path.join(&job.relpath)).map_err(|e| {
                    file_error(format!("cannot move {} back: {e}", filed.display()))
                })?;
                job.relpath = intent
                    .to
                    .strip_prefix(&watch.path)
                    .map_or_else(|_| job.relpath.clone(), PathBuf::from);
                job.source = intent.to.clone();
                job.filing = Some(intent.clone());
                store.put(job).await?;
                intent
            }
        };
        // The job holds the name before the file appears under it, so the
        // watch does not take it as a new file.
        held.hold(&intent.to);
        let signature = job.signature;
        let carried = tokio::task::spawn_blocking(move || finish::carry_out(&intent, &signature))
            .await
            .map_err(|e| file_error(format!("filing thread failed: {e}")))?
            .map_err(|e| file_error(format!("cannot move {} back: {e}", filed.display())))?;
        match carried {
            Carried::NameTaken => job.filing = None,
            Carried::Moved(back) => {
                // Tests pause here (the watch must not take the file meanwhile).
                crate::failpoint::active("retry::after_move");
                if let Some(sidecar) = job.sidecar_filed_to.take()
                    && sidecar.exists()
                {
                    job.sidecar = finish::file_sidecar(&sidecar, &back).ok();
                }
                // Across filesystems the file came back as a copy: a new
                // inode of the same content.
                if let Ok(meta) = std::fs::symlink_metadata(&back) {
                    let now = crate::state::FileSignature::of(&meta);
                    if now.same_content(&job.signature) {
                        job.signature = now;
                    }
                }
                job.source = back;
                job.filed_to = None;
                job.filing = None;
                store.put(job).await?;
                return Ok(());
            }
        }
    }
    Err(file_error(format!(
        "no free name to move {} back to",
        filed.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ErrorInfo, FileSignature};

    #[test]
    fn a_finished_job_shows_no_stale_error() {
        let signature = FileSignature {
            size: 10,
            mtime_ns: 0,
            dev: 0,
            ino: 0,
        };
        let mut job = Job::new(
            1,
            "drop",
            std::path::Path::new("a.mp4"),
            std::path::Path::new("/d/a.mp4"),
            signature,
            "p",
        );
        job.last_error = Some(ErrorInfo {
            reason: "a 503 on the third chunk".into(),
            status: Some(503),
            excerpt: None,
            at: jiff::Timestamp::now(),
        });
        job.state = JobState::Uploading;
        assert!(JobView::of(&job, None).last_error.is_some());
        job.state = JobState::Done;
        assert_eq!(JobView::of(&job, None).last_error, None);
    }
}
