//! `hotfolder upload`: the same resumable engine and state database as the
//! daemon, for files named on the command line; no watching, no moving.
//! Running it again after an interruption continues where it stopped.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::daemon::{Context, run_job};
use crate::route::{FileFacts, Router};
use crate::state::{FileSignature, Job, JobState, JobStore, Store};

/// How one file ended.
#[derive(Debug)]
pub struct Outcome {
    /// The file as given.
    pub file: PathBuf,
    /// Its job, if one was made.
    pub job: Option<u64>,
    /// Arrived (or already had).
    pub arrived: bool,
    /// What to tell the user.
    pub message: String,
}

/// Upload `files` to `provider`; answers one outcome per file. Stops early
/// (everything checkpointed) when `shutdown` resolves.
///
/// # Errors
/// The state database cannot be opened.
pub async fn upload(
    config: Config,
    provider: &str,
    files: &[PathBuf],
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Vec<Outcome>> {
    let store = Store::open_configured(&config).await?;
    let router = Router::new(&config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ctx, _jobs) = Context::new(
        config,
        store.clone(),
        stop_rx,
        // Pauses hold the daemon's uploads; an upload asked for by hand is
        // not held (and it has no watches, nor a config to reload).
        crate::daemon::Surroundings::default(),
    );
    let mut outcomes = Vec::new();
    let mut tasks = JoinSet::new();
    let mut running = Vec::new();
    for file in files {
        match prepare(&store, &router, provider, file).await {
            Ok(Prepared::Run(job)) => {
                running.push((file.clone(), job.id, job.signature.size));
                tasks.spawn(run_job(Arc::clone(&ctx), *job));
            }
            Ok(Prepared::AlreadyThere(job)) => outcomes.push(Outcome {
                file: file.clone(),
                job: Some(job),
                arrived: true,
                message: format!("already uploaded (job {job})"),
            }),
            Err(message) => outcomes.push(Outcome {
                file: file.clone(),
                job: None,
                arrived: false,
                message,
            }),
        }
    }
    let display = Display::new(&running);
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(display.period());
    loop {
        tokio::select! {
            () = &mut shutdown => {
                let _ = stop_tx.send(true);
                while tasks.join_next().await.is_some() {}
                break;
            }
            next = tasks.join_next() => if next.is_none() { break },
            _ = tick.tick() => display.update(&ctx, &store).await,
        }
    }
    display.update(&ctx, &store).await;
    store
        .flush()
        .await
        .context("cannot flush the state database")?;
    for (file, id, _) in running {
        let job = store.get(id).await.context("cannot read the job back")?;
        let arrived = job.state == JobState::Done;
        let message = match job.state {
            JobState::Done => match (&job.duplicate_of, &job.delivery) {
                (Some(earlier), _) => {
                    format!("same content already uploaded by job {earlier}; skipped")
                }
                (None, Some(d)) => {
                    format!("uploaded: {}", d.url.as_deref().unwrap_or(&d.remote_id))
                }
                (None, None) => "uploaded".into(),
            },
            JobState::Failed => format!(
                "failed: {}",
                job.last_error
                    .as_ref()
                    .map_or("unknown reason", |e| e.reason.as_str())
            ),
            JobState::Superseded => {
                "the file changed while it was uploading; the upload was abandoned: run the command again once the file is complete".into()
            }
            other => format!(
                "interrupted while {}; run the same command again to continue",
                other.as_str()
            ),
        };
        display.finish(id, arrived, &message);
        outcomes.push(Outcome {
            file,
            job: Some(id),
            arrived,
            message,
        });
    }
    Ok(outcomes)
}

enum Prepared {
    Run(Box<Job>),
    AlreadyThere(u64),
}

/// Find the job this file already has (to resume or report) or record a new one.
async fn prepare(
    store: &Store,
    router: &Router,
    provider: &str,
    file: &Path,
) -> Result<Prepared, String> {
    let path = std::fs::canonicalize(file).map_err(|e| format!("cannot open: {e}"))?;
    let meta = std::fs::metadata(&path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let signature = FileSignature::of(&meta);
    let key = Path::new(&path);
    if let Some(mut job) = store.latest_for("", key).await.map_err(|e| e.to_string())?
        && job.provider == provider
        && job.signature.same_content(&signature)
    {
        match job.state {
            JobState::Done => return Ok(Prepared::AlreadyThere(job.id)),
            JobState::Failed => {
                job.apply(crate::lifecycle::Outcome::Retry);
                job.failures = 0;
                job.last_error = None;
                store.put(&mut job).await.map_err(|e| e.to_string())?;
                return Ok(Prepared::Run(Box::new(job)));
            }
            JobState::Superseded => {}
            _ => return Ok(Prepared::Run(Box::new(job))),
        }
    }
    let id = store.next_id().await.map_err(|e| e.to_string())?;
    let mut job = Job::new(id, "", key, &path, signature, provider);
    let name = PathBuf::from(path.file_name().unwrap_or_default());
    let facts = FileFacts {
        watch: "",
        relpath: &name,
        path: &path,
        size: signature.size,
        mtime: meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH),
        sidecars: None,
    };
    let route = router.for_provider(provider, &facts).map_err(|e| e.0)?;
    job.metadata = route.metadata;
    job.skip_duplicates = route.duplicates == crate::config::Duplicates::Skip;
    store.put(&mut job).await.map_err(|e| e.to_string())?;
    Ok(Prepared::Run(Box::new(job)))
}

/// Progress bars on a terminal, plain lines otherwise.
struct Display {
    bars: Option<(MultiProgress, HashMap<u64, ProgressBar>)>,
    jobs: Vec<(String, u64, u64)>,
}

impl Display {
    fn new(running: &[(PathBuf, u64, u64)]) -> Self {
        let jobs: Vec<(String, u64, u64)> = running
            .iter()
            .map(|(file, id, size)| (file.display().to_string(), *id, *size))
            .collect();
        if !std::io::stderr().is_terminal() {
            return Display { bars: None, jobs };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = jobs
            .iter()
            .map(|(name, id, size)| {
                let bar = multi.add(ProgressBar::new(*size));
                bar.set_style(style.clone());
                bar.set_message(name.clone());
                (*id, bar)
            })
            .collect();
        Display {
            bars: Some((multi, bars)),
            jobs,
        }
    }

    fn period(&self) -> Duration {
        if self.bars.is_some() {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        }
    }

    async fn update(&self, ctx: &Context, store: &Store) {
        for (name, id, size) in &self.jobs {
            let bytes = match ctx.progress.get(*id) {
                Some(progress) => progress.bytes,
                None => store.get(*id).await.ok().map_or(0, |j| {
                    if j.state == JobState::Done {
                        *size
                    } else {
                        j.acked
                    }
                }),
            };
            match &self.bars {
                Some((_, bars)) => {
                    if let Some(bar) = bars.get(id) {
                        bar.set_position(bytes);
                    }
                }
                None => {
                    let live = ctx.progress.get(*id);
                    let percent = if *size == 0 {
                        100.0
                    } else {
                        bytes as f64 * 100.0 / *size as f64
                    };
                    let rate =
                        live.as_ref().map_or(0.0, |p| p.bytes_per_second) / (1024.0 * 1024.0);
                    match live.and_then(|p| p.eta_seconds) {
                        Some(eta) => eprintln!(
                            "{name}: {percent:.0}% of {size} bytes, {rate:.1} MiB/s, ETA {eta:.0}s"
                        ),
                        None => eprintln!("{name}: {percent:.0}% of {size} bytes"),
                    }
                }
            }
        }
    }

    fn finish(&self, id: u64, arrived: bool, message: &str) {
        if let Some((_, bars)) = &self.bars
            && let Some(bar) = bars.get(&id)
        {
            if arrived {
                bar.finish();
            } else {
                bar.abandon_with_message(message.to_string());
            }
        }
    }
}
