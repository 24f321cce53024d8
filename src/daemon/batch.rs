//! Small files to a `folder` destination, many at a time.
//!
//! One job at a time, a small file pays every durable point alone: about
//! five database flushes, nine fsyncs and eighty thread hand-offs, so a
//! drop of thousands of 4 KiB files moved at a tenth of `rclone move`'s
//! pace (docs/BENCHMARKS.md). A batch takes up to [`MOST_JOBS`] of them
//! through the same states in the same order as one job alone, each step
//! once for all: one blocking call, one `syncfs` of each file system it
//! wrote, one database flush.
//!
//! A job the batch cannot take through a step (its source changed, a name
//! was taken, any error) leaves the batch as the store holds it and goes on
//! alone, through the per-job code that resumes any state; so does every
//! job after a crash between steps. Only the happy path is batched; every
//! other path is the one each job already had.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::{AfterSuccess, NotifyEvent};
use crate::finish::{self, Carried};
use crate::fsx::{self, Durability};
use crate::lifecycle::Outcome;
use crate::providers::{FolderProvider, Provider};
use crate::state::{Job, JobState, JobStore, Store, StoreError};
use crate::upload::ProviderHandle;

use super::{Context, RECEIPT, receipt_of, source_changed};

/// At most this many jobs in one batch: a thousand share each durable
/// point (each `syncfs` of a folder that thousands of renames changed
/// costs milliseconds), and a batch's files are all read before any is
/// placed. A batch takes what waits, so a trickle still goes at once.
pub(super) const MOST_JOBS: usize = 1024;

/// At most this many bytes of sources in one batch: a batch reads each
/// small file once, whole, and keeps it until its partial file is written
/// (so memory stays within this per batch), and a batch of bigger files
/// gains little from sharing a flush.
const MOST_BYTES: u64 = 8 << 20;

/// Batches of one provider under way at once (each also holds a worker):
/// while some wait for the disk or the database, others read, hash and
/// encode. Measured on 10,000 files of 4 KiB, 2 cores: 4 moved 4,088 to
/// 4,492 files/s from the first job, 2 moved 3,051 to 3,716.
const MOST_BATCHERS: usize = 4;

/// The largest file a batch takes: it is read whole into memory, and a
/// bigger one gains nothing from sharing a flush with others.
const SMALL_FILE: u64 = 1 << 20;

/// A provider's jobs waiting for a batch, shared by the dispatcher (which
/// queues them) and the provider's batchers (which take them).
#[derive(Default)]
pub(super) struct Queue {
    /// Waiting job ids with their sizes, oldest first.
    ids: VecDeque<(u64, u64)>,
    /// Batchers running for the provider.
    batchers: usize,
    /// Jobs that left a batch: offered again, they run alone.
    alone: HashSet<u64>,
}

/// A provider's [`Queue`].
pub(super) type SharedQueue = Arc<Mutex<Queue>>;

/// What `mutex` holds, even if a thread panicked holding it (lists of ids,
/// whole at every step).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Queue job `id` for a batch if it `fits` one, unless it left one (it then
/// runs alone from now on): `true` when queued.
pub(super) fn enqueue(queue: &SharedQueue, job: &Job, fits: bool) -> bool {
    let mut queue = lock(queue);
    if queue.alone.remove(&job.id) || !fits {
        return false;
    }
    queue.ids.push_back((job.id, job.signature.size));
    true
}

/// How many of the waiting jobs the next batch takes: at least one, at
/// most [`MOST_JOBS`] and, past the first, [`MOST_BYTES`] of sources.
fn batch_len(waiting: &VecDeque<(u64, u64)>) -> usize {
    let mut bytes = 0u64;
    let mut len = 0;
    for &(_, size) in waiting.iter().take(MOST_JOBS) {
        bytes = bytes.saturating_add(size);
        if len > 0 && bytes > MOST_BYTES {
            break;
        }
        len += 1;
    }
    len
}

/// Whether another batcher should start: jobs wait and fewer than
/// [`MOST_BATCHERS`] run. Counted as started when it answers `true`.
pub(super) fn wants_batcher(queue: &SharedQueue) -> bool {
    let mut queue = lock(queue);
    let wanted = !queue.ids.is_empty() && queue.batchers < MOST_BATCHERS;
    if wanted {
        queue.batchers += 1;
    }
    wanted
}

/// Whether `job` can go in a batch: a new small file for a `folder`
/// provider on the single box, filed by moving, with nothing that needs a
/// job of its own (a sidecar, a bandwidth limit, a pause, an earlier
/// attempt).
pub(super) fn fits(ctx: &Context, job: &Job) -> bool {
    let Store::Sled(_) = &ctx.store else {
        return false;
    };
    let (Some(handle), Some(watch)) = (ctx.providers.get(&job.provider), ctx.watch(&job.watch))
    else {
        return false;
    };
    matches!(handle.provider, Provider::Folder(_))
        && job.state == JobState::Queued
        && job.attempts == 0
        && job.session.is_none()
        && job.delivery.is_none()
        && job.filing.is_none()
        && job.filed_to.is_none()
        && job.rule.is_some()
        && job.sidecar.is_none()
        && job.signature.size <= SMALL_FILE.min(handle.config.chunk_size)
        && watch.after_success == AfterSuccess::Move
        && ctx.engine.bandwidth.throttle_for(&job.provider).is_empty()
        && ctx
            .engine
            .pauses
            .holding(&job.watch, &job.provider)
            .is_none()
}

/// Run batches of `provider`'s queued jobs until none wait. Started by the
/// dispatcher when [`wants_batcher`] says so.
pub(super) async fn batcher(ctx: Arc<Context>, provider: String, queue: SharedQueue) {
    loop {
        let (ids, superseded) = {
            let mut queue = lock(&queue);
            let superseded = ctx.superseded();
            let take = if superseded {
                queue.ids.len()
            } else {
                batch_len(&queue.ids)
            };
            let ids: Vec<u64> = queue.ids.drain(..take).map(|(id, _)| id).collect();
            if ids.is_empty() || superseded {
                queue.batchers -= 1;
            }
            (ids, superseded)
        };
        if ids.is_empty() {
            return;
        }
        if superseded {
            // A reload came: they start again on its settings, through the
            // dispatcher (which queues them for a batcher of the new ones).
            hand_on(&ctx, &ids).await;
            end(&ctx, &ids);
            return;
        }
        let remaining = Arc::new(Mutex::new(ids.iter().copied().collect::<BTreeSet<u64>>()));
        let run = tokio::spawn(run(
            Arc::clone(&ctx),
            provider.clone(),
            ids.clone(),
            Arc::clone(&queue),
            Arc::clone(&remaining),
        ));
        let failed = match run.await {
            Ok(Ok(())) => None,
            Ok(Err(e @ StoreError::Db(_))) => {
                ctx.store_failed(&e);
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) if e.is_panic() => Some(format!(
                "panicked: {}",
                super::panic_message(e.into_panic())
            )),
            Err(_) => None,
        };
        if let Some(why) = failed {
            // Not pinned on any one job (a batch's failure is no job's):
            // each job still in it goes on alone, where a failure of its
            // own is recorded on it.
            let left: Vec<u64> = lock(&remaining).iter().copied().collect();
            ctx.metrics.job_task_failures.inc();
            for &id in &left {
                tracing::error!(job = id, error = %why, "job task failed (a bug or a store failure) in a batch of small files; the job goes on alone");
            }
            hand_on_alone(&ctx, &queue, &left).await;
        }
        end(&ctx, &ids);
    }
}

fn set_alone(queue: &SharedQueue, ids: &[u64]) {
    lock(queue).alone.extend(ids.iter().copied());
}

/// Jobs `ids` leave batching for good: each goes on alone (see [`hand_on`]).
async fn hand_on_alone(ctx: &Context, queue: &SharedQueue, ids: &[u64]) {
    set_alone(queue, ids);
    hand_on(ctx, ids).await;
}

/// The batch's run of these jobs has ended (they were queued once each).
fn end(ctx: &Context, ids: &[u64]) {
    for &id in ids {
        ctx.jobs.ended(id);
    }
}

/// Queue jobs `ids` again as the store holds them, unless finished: for a
/// task of their own, or (not yet started, after a reload) a new batch.
async fn hand_on(ctx: &Context, ids: &[u64]) {
    for &id in ids {
        match ctx.store.get(id).await {
            Ok(job) if !job.state.is_terminal() => ctx.spawn_job(job),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(job = id, error = %e, "cannot read a job that left its batch; it resumes at the next start")
            }
        }
    }
}

/// One batch: read the jobs, wait for a worker, then the steps.
async fn run(
    ctx: Arc<Context>,
    provider: String,
    ids: Vec<u64>,
    queue: SharedQueue,
    remaining: Arc<Mutex<BTreeSet<u64>>>,
) -> Result<(), StoreError> {
    let taken = std::time::Instant::now();
    let handle = match ctx.providers.get(&provider) {
        Some(handle) if matches!(handle.provider, Provider::Folder(_)) => Arc::clone(handle),
        _ => {
            lock(&remaining).clear();
            hand_on_alone(&ctx, &queue, &ids).await;
            return Ok(());
        }
    };
    let mut members = Vec::with_capacity(ids.len());
    // Each watch's folder resolved once, not once per file (a `readlink`
    // per component of its path).
    let mut roots: HashMap<String, PathBuf> = HashMap::new();
    for id in ids {
        let job = ctx.store.get(id).await?;
        match ctx.watch(&job.watch) {
            Some(watch) if fits(&ctx, &job) => members.push(Member {
                watch_root: roots
                    .entry(job.watch.clone())
                    .or_insert_with(|| {
                        watch
                            .path
                            .canonicalize()
                            .unwrap_or_else(|_| watch.path.clone())
                    })
                    .clone(),
                done_dir: watch.done_dir.clone(),
                receipts: watch.receipts,
                out: None,
                bytes: Vec::new(),
                job,
            }),
            _ => members.push(Member::leaving(job, "no longer fits a batch")),
        }
    }
    let mut batch = Batch {
        ctx,
        handle,
        members,
        queue,
        remaining,
        started: taken,
        note: None,
        partials_unrecorded: false,
    };
    batch.leave().await;
    batch.partials_unrecorded = true;
    if batch.members.is_empty() {
        return Ok(());
    }
    let mut shutdown = batch.ctx.engine.shutdown.clone();
    let _permits = tokio::select! {
        () = crate::shutdown::stopped(&mut shutdown) => return Ok(()),
        permits = async {
            let provider = Arc::clone(&batch.handle.permits).acquire_owned().await;
            let worker = Arc::clone(&batch.ctx.workers).acquire_owned().await;
            (provider, worker)
        } => permits,
    };
    // A reload came while it waited: its jobs start again on the new
    // settings (as a job that has not started yet does).
    if batch.ctx.superseded() {
        let ids: Vec<u64> = batch.members.iter().map(|m| m.job.id).collect();
        lock(&batch.remaining).clear();
        hand_on(&batch.ctx, &ids).await;
        return Ok(());
    }
    tracing::debug!(
        jobs = batch.members.len(),
        provider = %provider,
        ms = taken.elapsed().as_millis(),
        "batch of small files"
    );
    // Each job's attempt starts here (tests pause or panic it).
    crate::failpoint::active("job::attempt");
    let result = batch.steps().await;
    batch.end_note();
    result
}

/// A job in a batch, with what the batch learns about it.
struct Member {
    job: Job,
    /// Why it leaves the batch (it goes on alone from what the store holds).
    out: Option<String>,
    /// Its watch folder, whose subfolders it empties are removed.
    watch_root: PathBuf,
    /// Where its source is filed.
    done_dir: PathBuf,
    /// Whether a receipt goes beside it.
    receipts: bool,
    /// Its source, read whole in the first step for its fingerprint and
    /// kept until its partial file is written (a source byte is read once).
    bytes: Vec<u8>,
}

impl Member {
    fn leaving(job: Job, why: &str) -> Self {
        Member {
            job,
            out: Some(why.into()),
            watch_root: PathBuf::new(),
            done_dir: PathBuf::new(),
            receipts: false,
            bytes: Vec::new(),
        }
    }

    fn fail(&mut self, why: impl Into<String>) {
        self.out.get_or_insert_with(|| why.into());
    }

    fn staying(&self) -> bool {
        self.out.is_none()
    }
}

/// A batch under way.
struct Batch {
    ctx: Arc<Context>,
    handle: Arc<ProviderHandle>,
    members: Vec<Member>,
    /// The provider's queue, where jobs that leave are marked to run alone.
    queue: SharedQueue,
    /// The jobs still in the batch, shared with its batcher (which hands
    /// them on if the batch fails).
    remaining: Arc<Mutex<BTreeSet<u64>>>,
    /// When its batcher took its jobs: each step logs its time from there
    /// (at debug level), which is how a slow step is found.
    started: std::time::Instant,
    /// Its note in the store while it is under way (see
    /// `SledStore::note_batch`), from its first step until it ends.
    note: Option<u64>,
    /// From the moment every member is known to fit (none has a session
    /// recorded) until their checkpoint: a member that leaves meanwhile
    /// takes no partial file with it (see [`Batch::leave`]).
    partials_unrecorded: bool,
}

/// The step a blocking call made for the whole batch.
type Step = Box<dyn FnOnce(&mut [Member], &FolderProvider) + Send>;

impl Batch {
    /// Log that `step` is done, and when.
    fn lap(&self, step: &str) {
        tracing::debug!(
            step,
            jobs = self.members.len(),
            ms = self.started.elapsed().as_millis(),
            "batch step done"
        );
    }

    /// The life of a small file, for all members at once. Each `record`
    /// writes the same state one job alone would have written there.
    async fn steps(&mut self) -> Result<(), StoreError> {
        // Noted before any file is read: a start that finds the note sends
        // the jobs on alone (a file that takes the process down, or hangs
        // it until a watchdog does, stops only its own job from then on).
        if let Store::Sled(sled) = &self.ctx.store {
            let ids: Vec<u64> = self.members.iter().map(|m| m.job.id).collect();
            self.note = Some(sled.note_batch(&ids).await?);
        }
        // 1. The sources opened as an attempt opens them, read whole (they
        // are small), fingerprinted.
        self.blocking(Box::new(|members, _| {
            for m in members.iter_mut() {
                match crate::upload::read_for_batch(&m.job) {
                    Ok(bytes) => {
                        m.job.fingerprint = Some(crate::hashing::fingerprint_of_bytes(&bytes));
                        m.bytes = bytes;
                    }
                    Err(why) => m.fail(why),
                }
            }
        }))
        .await?;
        self.lap("opened");
        self.claim_content().await?;
        self.lap("claimed");
        if !self.go_on().await {
            return Ok(());
        }
        let chunk_size = self.handle.config.chunk_size;
        for m in &mut self.members {
            let job = &mut m.job;
            if job.chunk_size == 0 {
                job.chunk_size = chunk_size;
            }
            job.attempts += 1;
            job.apply(Outcome::CreateStarted);
            job.acked = 0;
            job.hash = None;
            job.started_at.get_or_insert_with(jiff::Timestamp::now);
        }
        // Not recorded: a crash before the checkpoint leaves each job
        // queued, and its partial file (named after the job) is written
        // again from the start, alone. But each job must be on disk before
        // its partial file is (a new job was only written, not waited
        // for): else after a crash the file is taken as new, under another
        // name, and that partial file is left behind.
        self.ctx.store.flush().await?;
        self.lap("jobs flushed");

        // 2. Each partial file created and written, its name in the
        // destination chosen; one sync.
        let installation = self.ctx.store.installation().to_string();
        self.blocking(Box::new(move |members, folder| {
            let dest = folder.dest();
            if let Err(e) = std::fs::create_dir_all(dest) {
                leave_all(members, &format!("cannot create {}: {e}", dest.display()));
            }
            let syncs = open_syncs(members, [dest]);
            // Names chosen in this batch count as taken: none is placed yet.
            let mut chosen: HashSet<PathBuf> = HashSet::new();
            for m in members.iter_mut().filter(|m| m.staying()) {
                let tag = crate::upload::upload_tag(&installation, m.job.id);
                let bytes = std::mem::take(&mut m.bytes);
                let written = folder
                    .write_whole(&tag, &bytes)
                    .map_err(|e| e.message)
                    .and_then(|(mut session, hash)| {
                        let name = folder
                            .choose_place(&mut session, &m.job.relpath, &chosen)
                            .map_err(|e| e.message)?;
                        chosen.insert(name);
                        Ok((session, hash))
                    });
                match written {
                    Ok((session, hash)) => {
                        m.job.session = Some(session);
                        m.job.hash = Some(hash);
                    }
                    Err(why) => m.fail(why),
                }
            }
            sync_or_leave(members, &syncs);
            crate::failpoint::crash("batch::written");
        }))
        .await?;
        self.lap("written");
        if !self.go_on().await {
            return Ok(());
        }
        for m in &mut self.members {
            let job = &mut m.job;
            let size = job.signature.size;
            job.apply(Outcome::Created);
            job.acked = size;
            job.apply(Outcome::Acknowledged);
            job.failures = 0;
            job.bytes_sent += size;
            job.source_bytes_read += size;
            self.ctx.metrics.bytes_uploaded(&job.provider, size);
            self.ctx.metrics.source_bytes_read.inc_by(size);
            job.sha256 = job.hash.as_ref().map(|h| h.finish_hex());
            job.apply(Outcome::Uploaded);
        }
        self.record(true).await?;
        self.partials_unrecorded = false;
        self.lap("checkpointed");
        crate::failpoint::crash("batch::checkpointed");

        // 3. Each partial moved to its chosen name, one sync; then where
        // each source goes in done/, and its receipt's name.
        self.blocking(Box::new(|members, folder| {
            let syncs = open_syncs(members, [folder.dest()]);
            for m in members.iter_mut().filter(|m| m.staying()) {
                let job = &mut m.job;
                let placed = crate::upload::unchanged_for_batch(job).and_then(|()| {
                    let session = job.session.as_mut().ok_or("no session")?;
                    folder
                        .place_chosen(session)
                        .map_err(|e| format!("cannot place the file: {e}"))
                });
                match placed {
                    Ok(delivery) => job.delivery = Some(delivery),
                    Err(why) => m.fail(why),
                }
            }
            sync_or_leave(members, &syncs);
            crate::failpoint::crash("batch::placed");
            plan_filing(members);
        }))
        .await?;
        self.lap("placed");
        let provider = self.handle.config.name.clone();
        for m in &mut self.members {
            let job = &mut m.job;
            // Recorded already when its content was claimed.
            if !job.skip_duplicates
                && let Some(fingerprint) = &job.fingerprint
            {
                self.ctx
                    .store
                    .record_content(&provider, fingerprint, job.id)
                    .await?;
            }
            let seconds = job
                .started_at
                .map(|started| jiff::Timestamp::now().duration_since(started).as_secs_f64());
            self.ctx
                .metrics
                .upload_finished(&job.provider, "delivered", seconds);
            tracing::info!(job = job.id, file = %job.relpath.display(), provider = %job.provider, remote = %job.delivery.as_ref().map_or("", |d| d.remote_id.as_str()), "delivered");
            job.apply(Outcome::Delivered);
        }
        // Durable with the filing intents, as one job's delivery is.
        self.record(true).await?;
        self.lap("delivered");
        crate::failpoint::crash("batch::delivered");
        if !self.go_on().await {
            return Ok(());
        }

        // 5. Each source moved into done/ and its receipt written, one sync
        // of each file system; each receipt placed, one sync.
        self.blocking(Box::new(|members, folder| {
            // The destination too: its partial folder goes now, if empty.
            let folders: BTreeSet<PathBuf> = members
                .iter()
                .flat_map(|m| [m.done_dir.clone(), m.watch_root.clone()])
                .chain([folder.dest().to_path_buf()])
                .collect();
            let syncs = open_syncs(members, folders.iter().map(PathBuf::as_path));
            folder.tidy_partials();
            for m in members.iter_mut().filter(|m| m.staying()) {
                let Some(intent) = m.job.filing.clone() else {
                    m.fail("no filing intent");
                    continue;
                };
                match finish::carry_out_planned_now(&intent) {
                    Ok(Carried::Moved(to)) => {
                        m.job.filed_to = Some(to);
                        m.job.filing = None;
                    }
                    Ok(Carried::NameTaken) => {
                        m.fail("the name chosen in done/ was taken");
                        continue;
                    }
                    Err(e) => {
                        m.fail(e.to_string());
                        continue;
                    }
                }
                if let (Some(report), Some(temporary)) = (&m.job.report, &m.job.report_temporary) {
                    let receipt = receipt_of(&m.job, None);
                    if let Err(e) =
                        finish::stage_report(report, temporary, &receipt, Durability::Batch)
                    {
                        m.fail(format!("cannot write {}: {e}", report.display()));
                    }
                }
            }
            // The subfolders the moves emptied, each tried once: trying
            // after every file would read a big folder again each time.
            let mut emptied: BTreeMap<(&Path, &Path), &Path> = BTreeMap::new();
            for m in members.iter().filter(|m| m.staying()) {
                if let Some(parent) = m.job.source.parent() {
                    emptied.insert((parent, &m.watch_root), &m.job.source);
                }
            }
            for ((_, root), source) in emptied {
                fsx::remove_empty_parents(source, root);
            }
            sync_or_leave(members, &syncs);
            crate::failpoint::crash("batch::moved");
            for m in members.iter_mut().filter(|m| m.staying()) {
                if let (Some(report), Some(temporary)) = (&m.job.report, &m.job.report_temporary)
                    && let Err(e) = fsx::place_temporary(temporary, report, Durability::Batch)
                {
                    m.fail(format!("cannot place {}: {e}", report.display()));
                }
            }
            sync_or_leave(members, &syncs);
            crate::failpoint::crash("batch::filed");
        }))
        .await?;
        self.lap("moved and filed");
        for m in &mut self.members {
            let job = &mut m.job;
            job.report_temporary = None;
            job.last_error = None;
            job.apply(Outcome::Filed);
            self.ctx
                .notifier
                .raise(&self.ctx.config, job, NotifyEvent::Done)
                .await?;
        }
        self.record(true).await?;
        self.lap("done");
        for m in std::mem::take(&mut self.members) {
            let job = m.job;
            self.ctx.jobs.held.release(&job.source);
            lock(&self.remaining).remove(&job.id);
            tracing::info!(job = job.id, file = %job.relpath.display(), provider = %job.provider, filed_to = %job.filed_to.as_deref().unwrap_or(Path::new("")).display(), "done");
        }
        Ok(())
    }

    /// The batch ended without a crash, whichever way (its jobs done,
    /// handed on alone, or left between steps by a shutdown): its jobs need
    /// not go on alone at the next start for its sake.
    fn end_note(&mut self) {
        if let (Store::Sled(sled), Some(number)) = (&self.ctx.store, self.note.take())
            && let Err(e) = sled.batch_ended(number)
        {
            tracing::warn!(error = %e, "cannot note that a batch of small files ended; its unfinished jobs go on alone at the next start");
        }
    }

    /// `duplicates: skip`, as one job checks it, under the same lock: a
    /// member whose content this provider has, or is receiving, leaves (to
    /// be skipped, or to wait, alone); the others claim their content
    /// before their upload starts (durable with its first step).
    async fn claim_content(&mut self) -> Result<(), StoreError> {
        let provider = self.handle.config.name.clone();
        let claiming = self.ctx.engine.content_claims.lock().await;
        for m in self.members.iter_mut().filter(|m| m.job.skip_duplicates) {
            let Some(fingerprint) = m.job.fingerprint.clone() else {
                continue;
            };
            for id in self
                .ctx
                .store
                .jobs_with_content(&provider, &fingerprint)
                .await?
            {
                if id == m.job.id {
                    continue;
                }
                if let Ok(other) = self.ctx.store.get(id).await
                    && (other.state == JobState::Done || !other.state.is_terminal())
                {
                    m.fail(format!("job {id} has the same content"));
                    break;
                }
            }
            if m.staying() {
                self.ctx
                    .store
                    .record_content(&provider, &fingerprint, m.job.id)
                    .await?;
            }
        }
        drop(claiming);
        self.leave().await;
        Ok(())
    }

    /// Run `step` for the members off the runtime (it waits for the file
    /// system), then let those it could not take leave.
    async fn blocking(&mut self, step: Step) -> Result<(), StoreError> {
        let members = std::mem::take(&mut self.members);
        let handle = Arc::clone(&self.handle);
        let ran = tokio::task::spawn_blocking(move || {
            let mut members = members;
            if let Provider::Folder(folder) = &handle.provider {
                step(&mut members, folder);
            }
            members
        })
        .await;
        match ran {
            Ok(members) => self.members = members,
            // The members went with the thread: the batcher, which sees the
            // panic, hands on what `remaining` still names.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Ok(()),
        }
        self.leave().await;
        Ok(())
    }

    /// Write every member's record; flushed (one wait for the disk for
    /// all) when `durable`.
    async fn record(&mut self, durable: bool) -> Result<(), StoreError> {
        for m in &mut self.members {
            self.ctx.store.put_buffered(&mut m.job).await?;
        }
        if durable {
            self.ctx.store.flush().await?;
        }
        Ok(())
    }

    /// The members that could not be taken through the last step go on
    /// alone, as the store holds them.
    async fn leave(&mut self) {
        if self.members.iter().all(Member::staying) {
            return;
        }
        let (leaving, staying): (Vec<Member>, Vec<Member>) = std::mem::take(&mut self.members)
            .into_iter()
            .partition(|m| m.out.is_some());
        self.members = staying;
        if leaving.is_empty() {
            return;
        }
        let ids: Vec<u64> = leaving.iter().map(|m| m.job.id).collect();
        if self.partials_unrecorded
            && let Provider::Folder(folder) = &self.handle.provider
        {
            // Its job is queued with no session: a partial file named
            // after it (this batch's, or one a crash left before the
            // checkpoint) is no one's. Alone, the job writes it again if it
            // goes on; if it fails or is skipped, nothing is left behind.
            let folder = folder.clone();
            let installation = self.ctx.store.installation().to_string();
            let tags: Vec<String> = ids
                .iter()
                .map(|&id| crate::upload::upload_tag(&installation, id))
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                for tag in &tags {
                    folder.discard_partial(tag);
                }
            })
            .await;
        }
        for m in &leaving {
            tracing::info!(job = m.job.id, file = %m.job.relpath.display(), reason = m.out.as_deref().unwrap_or(""), "leaves its batch of small files; goes on alone");
        }
        {
            let mut remaining = lock(&self.remaining);
            for id in &ids {
                remaining.remove(id);
            }
        }
        hand_on_alone(&self.ctx, &self.queue, &ids).await;
    }

    /// Between steps: a shutdown ends the batch (each job resumes at the
    /// next start from what is recorded); a pause takes the jobs it covers
    /// out, to wait alone as a paused job does. `false` when none are left.
    async fn go_on(&mut self) -> bool {
        if *self.ctx.engine.shutdown.borrow() {
            return false;
        }
        for m in &mut self.members {
            if let Some(scope) = self
                .ctx
                .engine
                .pauses
                .holding(&m.job.watch, &m.job.provider)
            {
                m.fail(format!("paused ({scope})"));
            }
        }
        self.leave().await;
        !self.members.is_empty()
    }
}

/// Where each member's source goes in done/, and its receipt's name, as
/// one job's delivery plans them.
fn plan_filing(members: &mut [Member]) {
    // Names chosen in this batch count as taken: none is made yet.
    let mut chosen: HashSet<PathBuf> = HashSet::new();
    // The folders in done/ made (or found) for this batch, each once.
    let mut folders: HashSet<PathBuf> = HashSet::new();
    for m in members.iter_mut().filter(|m| m.staying()) {
        if source_changed(&m.job) {
            m.fail("the source changed after delivery");
            continue;
        }
        let target = m.done_dir.join(&m.job.relpath);
        let folder = target.parent().map(Path::to_path_buf).unwrap_or_default();
        if !folders.contains(&folder) {
            if let Err(e) = finish::make_folder_of(&target) {
                m.fail(e.to_string());
                continue;
            }
            folders.insert(folder);
        }
        match finish::plan_in_folder(&m.job.source, &target) {
            Ok(mut intent) => {
                if chosen.contains(&intent.to) {
                    let Some(to) = fsx::free_name_besides(&target, &chosen).ok() else {
                        m.fail(fsx::no_free_name(&target).to_string());
                        continue;
                    };
                    intent.temporary = Some(fsx::temporary_beside(&to));
                    intent.to = to;
                }
                let report = m
                    .receipts
                    .then(|| {
                        fsx::free_name_besides(&finish::report_path(&intent.to, RECEIPT), &chosen)
                            .ok()
                    })
                    .flatten();
                if m.receipts && report.is_none() {
                    // Alone, the receipt chooses its name when written.
                    m.fail("no free name for its receipt yet");
                    continue;
                }
                chosen.insert(intent.to.clone());
                if let Some(report) = report {
                    chosen.insert(report.clone());
                    m.job.report_temporary = Some(fsx::temporary_beside(&report));
                    m.job.report = Some(report);
                }
                m.job.filing = Some(intent);
            }
            Err(e) => m.fail(e.to_string()),
        }
    }
}

/// Open the file systems of `folders` for a step's syncs, once each, before the step
/// writes (see [`fsx::FileSystemSync`]); if one cannot be opened, every
/// member leaves.
fn open_syncs<'a>(
    members: &mut [Member],
    folders: impl IntoIterator<Item = &'a Path>,
) -> Vec<fsx::FileSystemSync> {
    let mut syncs: Vec<fsx::FileSystemSync> = Vec::new();
    for folder in folders {
        match fsx::FileSystemSync::open(folder) {
            // One sync per file system (done/ and the watch folder are
            // often on one).
            Ok(sync) if syncs.iter().any(|s| s.device() == sync.device()) => {}
            Ok(sync) => syncs.push(sync),
            Err(e) => {
                leave_all(members, &format!("cannot open {}: {e}", folder.display()));
                return Vec::new();
            }
        }
    }
    syncs
}

/// Every member leaves, for `why` (its job does the step again alone, with
/// an fsync per file).
fn leave_all(members: &mut [Member], why: &str) {
    tracing::warn!(error = %why, "a batch of small files goes on one by one");
    for m in members.iter_mut() {
        m.fail(why);
    }
}

/// Make what the staying members wrote durable, one `syncfs` per file
/// system in `syncs`; if one cannot, every member leaves.
fn sync_or_leave(members: &mut [Member], syncs: &[fsx::FileSystemSync]) {
    if !members.iter().any(Member::staying) {
        return;
    }
    for sync in syncs {
        if let Err(e) = sync.sync() {
            let why = format!(
                "cannot sync the file system of {}: {e}",
                sync.path().display()
            );
            leave_all(members, &why);
            return;
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_left_a_batch_runs_alone_and_batchers_stay_few() {
        let queue = SharedQueue::default();
        assert!(!wants_batcher(&queue), "no batcher for an empty queue");
        let job = |id: u64| {
            let signature = crate::source::FileSignature {
                size: 0,
                mtime_ns: 0,
                dev: 0,
                ino: id,
            };
            Job::new(id, "w", Path::new("f"), Path::new("/w/f"), signature, "p")
        };
        assert!(enqueue(&queue, &job(1), true));
        assert!(
            !enqueue(&queue, &job(2), false),
            "one that does not fit runs alone"
        );
        set_alone(&queue, &[3]);
        assert!(
            !enqueue(&queue, &job(3), true),
            "one that left a batch runs alone"
        );
        assert!(enqueue(&queue, &job(4), true));
        for _ in 0..MOST_BATCHERS {
            assert!(wants_batcher(&queue));
        }
        assert!(!wants_batcher(&queue), "at most {MOST_BATCHERS} batchers");
        assert_eq!(lock(&queue).ids, [(1, 0), (4, 0)]);
    }

    #[test]
    fn a_batch_takes_what_waits_within_its_count_and_its_bytes() {
        let waiting = |sizes: &[u64]| -> VecDeque<(u64, u64)> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| (i as u64, s))
                .collect()
        };
        assert_eq!(batch_len(&waiting(&[])), 0);
        assert_eq!(
            batch_len(&waiting(&[4096; 10])),
            10,
            "a trickle goes at once"
        );
        assert_eq!(batch_len(&waiting(&[4096; 5000])), MOST_JOBS);
        let mib = 1 << 20;
        assert_eq!(
            batch_len(&waiting(&[mib; 100])),
            (MOST_BYTES / mib) as usize,
            "at most MOST_BYTES of sources"
        );
        assert_eq!(
            batch_len(&waiting(&[MOST_BYTES + 1, 1])),
            1,
            "the first is taken whatever its size"
        );
    }
}
