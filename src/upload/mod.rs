//! The resumable upload engine, shared by every provider: create the remote
//! object (persisted before the first byte), learn the server's offset after
//! any failure, send chunk after chunk (persisting each acknowledgement and
//! the hash state with it), finalise, and decide after each failure whether
//! to retry (the shared [`Backoff`]) or fail.

pub mod progress;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use crate::config::ProviderConfig;
use crate::hashing::{self, ResumableSha256};
use crate::lifecycle::Outcome;
use crate::providers::{
    Delivery, ErrorKind, Lookup, Provider, ProviderError, RemoteOffset, UploadRequest, Uploader,
};
use crate::retry::Backoff;
use crate::source::{self, Chunk, Counters, ReadAhead};
use crate::state::{ErrorInfo, FileSignature, Job, JobState, JobStore, Store, StoreError};
use progress::ProgressBoard;

/// In-attempt recoveries (offset re-query, URL renewal, re-authentication)
/// before the failure goes to the backoff policy instead.
const MAX_RECOVERIES_PER_ATTEMPT: u32 = 5;

/// New remote objects one attempt may start because the provider reported
/// the current one gone, before the attempt fails instead: a provider that
/// refuses every new object at once (a wrong delegated token answering 404,
/// a URL lifetime shorter than one request) must not loop without end.
const MAX_REPLACEMENTS_PER_ATTEMPT: u32 = 3;

/// Remote objects one job may abandon over its whole life (across attempts
/// and restarts) before it fails for good: chunk progress resets the retry
/// budget, so a provider whose upload URLs always expire before an upload
/// can finish (OK.ru replaces the video each time) would otherwise loop,
/// leaving a trail of half-filled videos.
const MAX_REPLACEMENTS_PER_JOB: usize = 10;

/// How often the source is looked at while a provider finalises.
const SOURCE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A provider with its settings, backoff and concurrency limit.
pub struct ProviderHandle {
    /// The backend.
    pub provider: Provider,
    /// Its config.
    pub config: ProviderConfig,
    /// Its retry policy.
    pub backoff: Backoff,
    /// `max_concurrent` permits.
    pub permits: Arc<Semaphore>,
}

impl ProviderHandle {
    /// Build from config.
    pub fn new(config: &ProviderConfig) -> Self {
        ProviderHandle {
            provider: Provider::from_config(config),
            backoff: Backoff::new(config.retry),
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            config: config.clone(),
        }
    }
}

/// How one attempt ended.
#[derive(Debug)]
pub enum AttemptEnd {
    /// Every byte acknowledged and finalised.
    Delivered(Delivery),
    /// The same content was already delivered by this earlier job.
    Duplicate(u64),
    /// A failure; `kind` says whether retrying can help.
    Failed(ProviderError),
    /// The source changed (or vanished) during the attempt.
    SourceChanged(String),
    /// Shutdown asked us to stop; everything acknowledged is persisted.
    Interrupted,
    /// A pause of this scope stopped the upload at a chunk boundary;
    /// everything acknowledged is persisted.
    Paused(crate::pause::Scope),
    /// This earlier job is uploading the same content to the same provider
    /// now: wait for it to end, then attempt again (a duplicate of it, or
    /// the upload itself if it failed).
    SameContentInFlight(u64),
}

/// What the duplicate check found.
enum SameContent {
    /// Nothing: this job uploads the content (and has claimed it).
    None,
    /// This job delivered the same bytes.
    Delivered(u64),
    /// This job is delivering content with the same fingerprint right now.
    InFlight(u64),
}

/// Errors that end an attempt early inside the engine.
enum Stop {
    Provider(ProviderError),
    SourceChanged(String),
    Interrupted,
    Paused(crate::pause::Scope),
    Store(StoreError),
}

impl From<ProviderError> for Stop {
    fn from(e: ProviderError) -> Self {
        Stop::Provider(e)
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

/// The engine: store, progress and the shutdown signal.
#[derive(Clone)]
pub struct Engine {
    /// The job store.
    pub store: Store,
    /// Live progress for status.
    pub progress: ProgressBoard,
    /// Becomes `true` when the daemon stops taking work.
    pub shutdown: watch::Receiver<bool>,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Held while a job checks for and claims its content (duplicates).
    pub content_claims: Arc<tokio::sync::Mutex<()>>,
    /// The paused scopes: an upload they cover stops at its next chunk.
    pub pauses: crate::pause::Pauses,
    /// The bandwidth limits uploads pass through.
    pub bandwidth: Arc<crate::bandwidth::Bandwidth>,
}

impl Engine {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Whether `job` stops before its next chunk: shutdown, or a pause
    /// that covers it.
    fn halt(&self, job_watch: &str, provider: &str) -> Result<(), Stop> {
        if self.stopping() {
            return Err(Stop::Interrupted);
        }
        match self.pauses.holding(job_watch, provider) {
            Some(scope) => Err(Stop::Paused(scope)),
            None => Ok(()),
        }
    }

    /// Run one attempt of `job` with `handle`, persisting every step.
    /// Cancel-safe at the chunk level: the store always holds a resumable state.
    pub async fn attempt(&self, job: &mut Job, handle: &ProviderHandle) -> AttemptEnd {
        let counters = self.progress.start(job, &self.metrics.source_bytes_read);
        let result = self.attempt_inner(job, handle, &counters).await;
        job.source_bytes_read += counters.read.load(std::sync::atomic::Ordering::Relaxed);
        self.progress.finish(job.id);
        match result {
            Ok(end) => end,
            Err(Stop::Provider(e)) => AttemptEnd::Failed(e),
            Err(Stop::SourceChanged(why)) => AttemptEnd::SourceChanged(why),
            Err(Stop::Interrupted) => AttemptEnd::Interrupted,
            Err(Stop::Paused(scope)) => AttemptEnd::Paused(scope),
            Err(Stop::Store(e)) => AttemptEnd::Failed(ProviderError::new(
                ErrorKind::Transient,
                format!("cannot record progress: {e}"),
            )),
        }
    }

    async fn attempt_inner(
        &self,
        job: &mut Job,
        handle: &ProviderHandle,
        counters: &Arc<Counters>,
    ) -> Result<AttemptEnd, Stop> {
        // A batch that a crash stopped before its checkpoint may have left
        // a partial file named after this job, which no record names (one
        // job alone records its create before it writes one, so a queued
        // job without a session has none of its own). It goes now,
        // whatever this attempt meets: a source gone or changed, the same
        // content delivered already, or an upload that writes it anew.
        if job.state == JobState::Queued
            && job.session.is_none()
            && let Provider::Folder(folder) = &handle.provider
        {
            folder.discard_partial(&upload_tag(self.store.installation(), job.id));
        }
        let (file, signature) = open_source(job)?;
        let file = Arc::new(file);
        if job.chunk_size == 0 {
            job.chunk_size = handle.config.chunk_size;
        }
        if job.state == JobState::Queued && job.session.is_none() {
            match self.find_duplicate(job, handle, &file).await? {
                SameContent::Delivered(earlier) => return Ok(AttemptEnd::Duplicate(earlier)),
                SameContent::InFlight(earlier) => {
                    return Ok(AttemptEnd::SameContentInFlight(earlier));
                }
                SameContent::None => {}
            }
        }
        let file_name = job.file_name();
        let tag = upload_tag(self.store.installation(), job.id);
        // A one-shot upload's record keys on the absolute path; the
        // provider is given the file's name (a folder destination would
        // otherwise join the absolute path and write beside the source).
        let relpath = if job.watch.is_empty() {
            std::path::PathBuf::from(job.relpath.file_name().unwrap_or_default())
        } else {
            job.relpath.clone()
        };
        let metadata = job.metadata.clone();
        let request = UploadRequest {
            tag: &tag,
            file_name: &file_name,
            relpath: &relpath,
            size: signature.size,
            metadata: &metadata,
            chunk_size: job.chunk_size,
        };
        let provider = &handle.provider;

        if job.state == JobState::Finalizing {
            return self.finalize(job, provider, &request).await;
        }
        let mut recoveries = 0;
        let mut replacements = 0;
        // A job found in `creating` without a session crashed inside create.
        let mut interrupted_create = job.state == JobState::Creating && job.session.is_none();
        loop {
            if self.stopping() {
                return Err(Stop::Interrupted);
            }
            // Create the remote object unless a session exists.
            let mut session = match job.session.take() {
                Some(session) => session,
                None => {
                    if std::mem::take(&mut interrupted_create) {
                        match provider.find_created(&request).await? {
                            Lookup::Found(session) => {
                                tracing::info!(job = job.id, remote = ?session.remote_id, "found the object an interrupted create made; resuming it");
                                job.session = Some(session);
                                job.apply(Outcome::Created);
                                self.store.put(job).await?;
                                continue;
                            }
                            Lookup::NotFound => {}
                            Lookup::Unsupported if matches!(provider, Provider::Folder(_)) => {}
                            Lookup::Unsupported => {
                                // No lookup exists for this provider: name the possible orphan.
                                note_possible_orphan(job, &provider.describe_created(&request));
                            }
                        }
                    }
                    job.apply(Outcome::CreateStarted);
                    self.store.put(job).await?;
                    crate::failpoint::crash("create::before");
                    job.acked = 0;
                    job.hash = None;
                    job.started_at.get_or_insert_with(jiff::Timestamp::now);
                    let created = provider
                        .create(&request)
                        .await
                        .map_err(Stop::Provider)
                        .inspect(|session| {
                            crate::failpoint::crash("create::after");
                            job.session = Some(session.clone());
                            job.apply(Outcome::Created);
                        });
                    match created {
                        Ok(session) => {
                            self.store.put(job).await?;
                            session
                        }
                        // A gateway's error can come after the service behind
                        // it acted: as with a lost answer, the job stays
                        // `creating`, so the next attempt looks for the object
                        // (or names the possible orphan) before creating.
                        Err(Stop::Provider(e)) if e.status.is_some_and(is_gateway_error) => {
                            tracing::warn!(
                                job = job.id,
                                status = e.status,
                                "the create call answered with a gateway error; the service may have created the object, so the next attempt looks for it first"
                            );
                            return Err(Stop::Provider(e));
                        }
                        // The service itself answered, or no connection was
                        // made: nothing was created.
                        Err(Stop::Provider(e)) if e.status.is_some() || e.unsent => {
                            job.apply(Outcome::CreateRefused);
                            self.store.put(job).await?;
                            return Err(Stop::Provider(e));
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let sent = if session.lanes.is_empty() {
                // Learn where the server stands. Where asking creates a second
                // leg of the remote object (Gcore's tus upload), that intent is
                // recorded first, as for `create`.
                if provider.creates_on_offset(&session) {
                    if session.extra.remove(LEG_INTENT).is_some() {
                        note_possible_orphan(
                            job,
                            &format!(
                                "an upload session tagged hotfolder_job={tag} for {}",
                                session.remote_id.as_deref().unwrap_or("the remote video")
                            ),
                        );
                    }
                    session.extra.insert(LEG_INTENT.into(), true.into());
                    job.session = Some(session.clone());
                    self.store.put(job).await?;
                }
                let before = session.clone();
                let asked = provider.offset(&mut session, &request, job.acked).await;
                let leg_answered = match &asked {
                    Ok(_) => true,
                    Err(e) => e.status.is_some_and(|s| !is_gateway_error(s)),
                };
                if leg_answered {
                    session.extra.remove(LEG_INTENT);
                }
                let offset = match asked {
                    Ok(RemoteOffset::At(offset)) if offset <= signature.size => offset,
                    Ok(RemoteOffset::Unknown) => job.acked,
                    Ok(RemoteOffset::At(_) | RemoteOffset::Gone) => {
                        let why = "the remote upload was gone";
                        check_replacements(
                            &mut replacements,
                            ProviderError::new(ErrorKind::Gone, why),
                        )?;
                        self.replace_session(job, provider, &session, why).await?;
                        continue;
                    }
                    Err(e) => {
                        job.session = Some(session);
                        return Err(e.into());
                    }
                };
                if offset != job.acked || job.attempts > 1 {
                    tracing::info!(job = job.id, file = %job.relpath.display(), offset, size = signature.size, "resuming");
                }
                let hasher = catch_up(job.hash.take(), &file, offset, counters).await?;
                job.apply(Outcome::Created);
                job.acked = offset;
                job.hash = Some(hasher);
                let session_changed = session != before;
                job.session = Some(session);
                if session_changed {
                    // e.g. an upload URL obtained while asking: persist it before any byte.
                    self.store.put(job).await?;
                }
                self.send_chunks(job, provider, &request, &file, signature, counters)
                    .await
            } else {
                job.session = Some(session);
                self.send_lanes(job, provider, &request, &file, signature, counters)
                    .await
            };
            match sent {
                Ok(()) => return self.finalize(job, provider, &request).await,
                // A part of a parallel upload gone (expired before the
                // join, deleted): each part's server is asked again, and
                // only the gone part is sent again.
                Err(Stop::Provider(e))
                    if e.kind == ErrorKind::Gone
                        && recoveries < MAX_RECOVERIES_PER_ATTEMPT
                        && provider.reopens_lanes()
                        && job.session.as_ref().is_some_and(|s| !s.lanes.is_empty()) =>
                {
                    recoveries += 1;
                    tracing::info!(job = job.id, error = %e, "a part of the parallel upload was refused as gone; asking each part's server");
                }
                Err(Stop::Provider(e)) if e.kind == ErrorKind::Gone => {
                    check_replacements(&mut replacements, e.clone())?;
                    let session = job.session.take().unwrap_or_default();
                    self.replace_session(job, provider, &session, &e.message)
                        .await?;
                }
                // Answers the protocol resolves at once: ask the offset again,
                // renew the URL, or authenticate again; a few per attempt.
                Err(Stop::Provider(e))
                    if recoveries < MAX_RECOVERIES_PER_ATTEMPT
                        && matches!(
                            e.kind,
                            ErrorKind::OffsetMismatch
                                | ErrorKind::RenewUpload
                                | ErrorKind::Reauthenticate
                        ) =>
                {
                    recoveries += 1;
                    tracing::info!(job = job.id, error = %e, "recovering within the attempt");
                    if e.kind == ErrorKind::RenewUpload {
                        let mut session = job.session.take().unwrap_or_default();
                        let renewed = provider.renew(&mut session, &request).await;
                        job.session = Some(session);
                        renewed?;
                        self.store.put(job).await?;
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn send_chunks(
        &self,
        job: &mut Job,
        provider: &Provider,
        request: &UploadRequest<'_>,
        file: &Arc<File>,
        signature: FileSignature,
        counters: &Arc<Counters>,
    ) -> Result<(), Stop> {
        // Reads and hashes run on across chunk boundaries; it starts again
        // (from the acknowledged offset) only after a partial acknowledgement.
        let mut ahead: Option<ReadAhead> = None;
        while job.acked < signature.size {
            self.halt(&job.watch, &job.provider)?;
            check_unchanged(job)?;
            let start = job.acked;
            let len = job.chunk_size.min(signature.size - start);
            counters
                .in_flight
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let continued = ahead
                .as_ref()
                .and_then(|ahead| ahead.chunk(start, len, job.chunk_size));
            let chunk = match continued {
                Some(chunk) => chunk,
                None => {
                    let (started, chunk) = ReadAhead::start(
                        Arc::clone(file),
                        start,
                        len,
                        signature.size,
                        job.chunk_size,
                        job.hash.clone().unwrap_or_default(),
                        Arc::clone(counters),
                    );
                    ahead = Some(started);
                    chunk
                }
            };
            let chunk = chunk.throttled(self.bandwidth.throttle_for(&job.provider));
            let session = job.session.as_mut().ok_or_else(|| {
                ProviderError::new(ErrorKind::Gone, "the job has no upload session")
            })?;
            let acked = match provider.send(session, request, chunk).await {
                Ok(acked) => acked,
                Err(e) => {
                    if let Stop::SourceChanged(why) = source_error_of(job, &e) {
                        return Err(Stop::SourceChanged(why));
                    }
                    job.bytes_sent += counters
                        .in_flight
                        .load(std::sync::atomic::Ordering::Relaxed);
                    return Err(e.into());
                }
            };
            crate::failpoint::crash("chunk::acknowledged");
            self.count_sent(job, len);
            // The hash at the acknowledged end, if the chunk was read to it
            // (a provider may acknowledge a chunk it did not read).
            let hashed = match (acked == start + len, ahead.as_mut()) {
                (true, Some(ahead)) => ahead.hash_at(acked).await,
                _ => None,
            };
            if let Some(hash) = hashed {
                job.hash = Some(hash);
            } else if acked > start && acked <= start + len {
                // Partial acknowledgement: re-derive the hash at the acked
                // offset, and read on from there.
                ahead = None;
                job.hash = Some(catch_up(job.hash.take(), file, acked, counters).await?);
            } else {
                return Err(acked_outside(acked, start, len).into());
            }
            job.acked = acked;
            job.apply(Outcome::Acknowledged);
            job.failures = 0;
            if acked < signature.size {
                self.store.put(job).await?;
            }
            // The last chunk's acknowledgement is made durable by the end
            // of the upload (`finalize`), before any further request.
            self.progress.acked(job.id, acked);
            tracing::debug!(job = job.id, offset = acked, "chunk acknowledged");
        }
        Ok(())
    }

    /// `parallel: N`: send the session's lanes side by side, each chunk by
    /// chunk, persisting each lane's acknowledgement as it comes, while a
    /// pass of its own hashes the file in order (lanes send out of order);
    /// then join the lanes and send what follows them (api.video's last
    /// part, which may only come after the others) as a sequential upload
    /// would. Every lane's persisted offset stays at or below what its
    /// server acknowledged.
    async fn send_lanes(
        &self,
        job: &mut Job,
        provider: &Provider,
        request: &UploadRequest<'_>,
        file: &Arc<File>,
        signature: FileSignature,
        counters: &Arc<Counters>,
    ) -> Result<(), Stop> {
        let mut session = job.session.take().unwrap_or_default();
        // Where the server stands on each lane.
        for i in 0..session.lanes.len() {
            let lane = &session.lanes[i];
            match provider.lane_offset(&session, lane).await {
                Ok(RemoteOffset::At(at)) if (lane.start..=lane.end).contains(&at) => {
                    session.lanes[i].acked = at;
                }
                Ok(RemoteOffset::Unknown) => {}
                Ok(RemoteOffset::At(_) | RemoteOffset::Gone) => {
                    // That part alone is sent again, on a new upload of its
                    // own where the protocol has one (PROTOCOLS §5: "resend
                    // that part"), persisted before any byte of it.
                    let mut lane = session.lanes[i].clone();
                    if let Err(e) = provider.reopen_lane(request, &mut lane).await {
                        job.session = Some(session);
                        return Err(e.into());
                    }
                    tracing::warn!(
                        job = job.id,
                        start = lane.start,
                        end = lane.end,
                        "a parallel part was gone on the server; sending that part again"
                    );
                    if let Some(id) = session.lanes[i]
                        .upload_url
                        .as_deref()
                        .and_then(last_segment)
                    {
                        job.replaced.push(format!("parallel part {id}"));
                    }
                    session.lanes[i] = lane;
                    job.session = Some(session.clone());
                    self.store.put(job).await?;
                }
                Err(e) => {
                    job.session = Some(session);
                    return Err(e.into());
                }
            }
        }
        let lanes_end = session.lanes.last().map_or(0, |lane| lane.end);
        job.apply(Outcome::Created);
        job.acked = lanes_acked(&session.lanes);
        job.session = Some(session.clone());
        self.store.put(job).await?;
        if job.acked > 0 || job.attempts > 1 {
            tracing::info!(job = job.id, file = %job.relpath.display(), acked = job.acked, lanes = session.lanes.len(), "resuming the parallel parts");
        }
        let source = (job.source.clone(), job.signature);
        let (job_watch, job_provider) = (job.watch.clone(), job.provider.clone());
        let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
        // Set by the first lane that fails: the others end at their next
        // chunk boundary, so no acknowledged chunk in flight is thrown away.
        let give_up = std::sync::atomic::AtomicBool::new(false);
        let workers = futures_util::future::join_all(
            session
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, lane)| !lane.done())
                .map(|(i, lane)| {
                    let acks = acks_tx.clone();
                    let (session, source, give_up) = (&session, &source, &give_up);
                    let (job_watch, job_provider) = (&job_watch, &job_provider);
                    let lane_run = async move {
                        let mut at = lane.acked;
                        while at < lane.end {
                            self.halt(job_watch, job_provider)?;
                            if give_up.load(std::sync::atomic::Ordering::Relaxed) {
                                return Ok(());
                            }
                            check_source(&source.0, &source.1)?;
                            let len = request.chunk_size.min(lane.end - at);
                            let chunk = Chunk::unhashed(
                                Arc::clone(file),
                                at,
                                len,
                                signature.size,
                                request.chunk_size,
                                Arc::clone(counters),
                            )
                            .throttled(self.bandwidth.throttle_for(job_provider));
                            let acked = provider
                                .send_lane(session, request, lane, chunk)
                                .await
                                .map_err(|e| source_verdict(&source.0, &source.1, &e))?;
                            if acked <= at || acked > at + len {
                                return Err(acked_outside(acked, at, len).into());
                            }
                            crate::failpoint::crash("lane::acknowledged");
                            at = acked;
                            // The coordinator outlives every worker.
                            let _ = acks.send((i, acked));
                        }
                        Ok(())
                    };
                    async move {
                        let ended = lane_run.await;
                        if ended.is_err() {
                            give_up.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        ended
                    }
                }),
        );
        drop(acks_tx);
        tokio::pin!(workers);
        let (hash_pass, _stop_hashing) =
            catch_up_stoppable(job.hash.take(), file, lanes_end, counters);
        tokio::pin!(hash_pass);
        let mut hashed = None;
        let mut workers_ended = false;
        loop {
            tokio::select! {
                ack = acks.recv() => match ack {
                    Some((lane, acked)) => self.lane_acknowledged(job, lane, acked).await?,
                    None => break,
                },
                ended = &mut workers, if !workers_ended => {
                    workers_ended = true;
                    if let Some(stop) = ended.into_iter().find_map(Result::err) {
                        // Persist what was acknowledged before the failure.
                        while let Ok((lane, acked)) = acks.try_recv() {
                            self.lane_acknowledged(job, lane, acked).await?;
                        }
                        return Err(stop);
                    }
                },
                hash = &mut hash_pass, if hashed.is_none() => {
                    // Kept with the next acknowledgement: a crash after it
                    // needs no second pass.
                    let hash = hash?;
                    job.hash = Some(hash.clone());
                    hashed = Some(hash);
                },
            }
        }
        if !workers_ended && let Some(stop) = (&mut workers).await.into_iter().find_map(Result::err)
        {
            return Err(stop);
        }
        if job
            .session
            .as_ref()
            .is_some_and(|s| s.lanes.iter().any(|lane| !lane.done()))
        {
            return Err(ProviderError::new(
                ErrorKind::OffsetMismatch,
                "a parallel part stopped before its end",
            )
            .into());
        }
        let hash = match hashed {
            Some(hash) => hash,
            None => hash_pass.await?,
        };
        job.hash = Some(hash);
        job.acked = lanes_end;
        self.join_lanes(job, provider, request).await?;
        self.send_chunks(job, provider, request, file, signature, counters)
            .await
    }

    /// `bytes` more were acknowledged: the job's count and `/metrics`.
    fn count_sent(&self, job: &mut Job, bytes: u64) {
        job.bytes_sent += bytes;
        self.metrics.bytes_uploaded(&job.provider, bytes);
    }

    /// Record one lane's acknowledgement (and the bytes it moved).
    async fn lane_acknowledged(&self, job: &mut Job, lane: usize, acked: u64) -> Result<(), Stop> {
        let Some(lane) = job
            .session
            .as_mut()
            .and_then(|session| session.lanes.get_mut(lane))
        else {
            return Ok(());
        };
        let moved = acked.saturating_sub(lane.acked);
        lane.acked = acked;
        self.count_sent(job, moved);
        job.acked = job.session.as_ref().map_or(0, |s| lanes_acked(&s.lanes));
        job.apply(Outcome::Acknowledged);
        job.failures = 0;
        self.store.put(job).await?;
        self.progress.acked(job.id, job.acked);
        Ok(())
    }

    /// Every lane is acknowledged: join them into one remote object. Where
    /// lanes are uploads of their own (tus partials), the join makes a new
    /// object, so its intent is recorded first, as for `create`; after it
    /// the session reads as a sequential upload.
    async fn join_lanes(
        &self,
        job: &mut Job,
        provider: &Provider,
        request: &UploadRequest<'_>,
    ) -> Result<(), Stop> {
        let mut session = job.session.take().unwrap_or_default();
        let makes_object = session.lanes.iter().any(|l| l.upload_url.is_some());
        if makes_object {
            if session.extra.remove(JOIN_INTENT).is_some() {
                note_possible_orphan(
                    job,
                    &format!(
                        "a joined upload of the parallel parts, tagged hotfolder_job={}",
                        request.tag
                    ),
                );
            }
            session.extra.insert(JOIN_INTENT.into(), true.into());
            job.session = Some(session.clone());
            self.store.put(job).await?;
        }
        crate::failpoint::crash("lanes::before_join");
        let joined = provider.join_lanes(&mut session, request).await;
        let answered = match &joined {
            Ok(()) => true,
            Err(e) => e.unsent || e.status.is_some_and(|s| !is_gateway_error(s)),
        };
        if answered {
            session.extra.remove(JOIN_INTENT);
        }
        if joined.is_ok() {
            session.lanes.clear();
        }
        job.session = Some(session);
        self.store.put(job).await?;
        joined.map_err(Stop::Provider)
    }

    async fn finalize(
        &self,
        job: &mut Job,
        provider: &Provider,
        request: &UploadRequest<'_>,
    ) -> Result<AttemptEnd, Stop> {
        check_unchanged(job)?;
        let sha256 = match (&job.hash, &job.sha256) {
            (_, Some(done)) if job.state == JobState::Finalizing => done.clone(),
            (Some(hash), known) if hash.length() == request.size => {
                let sha = hash.finish_hex();
                if known.as_ref().is_some_and(|k| *k != sha) {
                    return Err(Stop::SourceChanged(
                        "the content changed between the duplicate check and the upload".into(),
                    ));
                }
                sha
            }
            _ => {
                return Err(ProviderError::new(
                    ErrorKind::OffsetMismatch,
                    "hash state does not cover the whole file; resuming",
                )
                .into());
            }
        };
        job.sha256 = Some(sha256.clone());
        if job.state != JobState::Finalizing {
            job.apply(Outcome::Uploaded);
            self.store.put(job).await?;
        }
        let mut session = job.session.clone().unwrap_or_default();
        let delivery = {
            // Finalising can take long (Gcore waits for `ready`): the source
            // is watched meanwhile, and a change stops it (SPEC §3.5).
            let finalizing = provider.finalize(&mut session, request, &sha256);
            tokio::pin!(finalizing);
            loop {
                tokio::select! {
                    result = &mut finalizing => break result?,
                    () = tokio::time::sleep(SOURCE_CHECK_EVERY) => check_unchanged(job)?,
                }
            }
        };
        job.session = Some(session);
        Ok(AttemptEnd::Delivered(delivery))
    }

    /// Abandon the current remote object and start a new one, naming the old
    /// one in the receipt.
    async fn replace_session(
        &self,
        job: &mut Job,
        provider: &Provider,
        session: &crate::providers::Session,
        why: &str,
    ) -> Result<(), Stop> {
        if job.replaced.len() >= MAX_REPLACEMENTS_PER_JOB {
            return Err(Stop::Provider(ProviderError::new(
                ErrorKind::Permanent,
                format!(
                    "the provider invalidated {} remote uploads of this file (last: {why}); uploads do not finish within the provider's limits (e.g. upload URL lifetime): check the link speed, chunk_size and the provider account",
                    job.replaced.len()
                ),
            )));
        }
        tracing::warn!(job = job.id, reason = why, "starting a new remote upload");
        if session.extra.contains_key(JOIN_INTENT) {
            note_possible_orphan(
                job,
                &format!(
                    "a joined upload of the parallel parts, tagged hotfolder_job={}-{}",
                    self.store.installation(),
                    job.id
                ),
            );
        }
        if let Some(old) = session
            .remote_id
            .clone()
            .or_else(|| session.upload_url.clone())
        {
            job.replaced.push(old);
        } else if !session.lanes.is_empty() {
            // A part's URL may work as a credential: name the parts by
            // their last path segment only.
            let ids: Vec<&str> = session
                .lanes
                .iter()
                .filter_map(|l| l.upload_url.as_deref())
                .filter_map(last_segment)
                .collect();
            job.replaced
                .push(format!("{} parallel parts ({})", ids.len(), ids.join(", ")));
        }
        job.session = None;
        job.acked = 0;
        job.hash = None;
        job.apply(Outcome::CreateStarted);
        // Recorded (fenced) before the delete: a node that lost the job
        // stops here, and one that takes it over never resumes this session.
        self.store.put(job).await?;
        if let Err(e) = provider.abandon(session).await {
            tracing::warn!(job = job.id, error = %e, "could not delete the abandoned upload");
        }
        Ok(())
    }

    /// Same content already delivered to the same provider? Only candidates
    /// with the same fingerprint are hashed in full.
    /// With `duplicates: skip`: has this provider the content already
    /// (a job delivered it: skip), or is a job delivering it right now
    /// (wait for it)? Otherwise this job claims the content before its
    /// upload starts. Checked and claimed under one lock, so that two jobs
    /// with the same content that start together cannot both upload it.
    async fn find_duplicate(
        &self,
        job: &mut Job,
        handle: &ProviderHandle,
        file: &Arc<File>,
    ) -> Result<SameContent, Stop> {
        // Through the descriptor the upload reads: never a second open by
        // path, which could meet another file (or a link) by now.
        let source = Arc::clone(file);
        let fingerprint = blocking_io(move || hashing::fingerprint_of(&source))
            .await
            .map_err(|e| source_error(job, &e))?;
        job.fingerprint = Some(fingerprint.clone());
        if !job.skip_duplicates {
            return Ok(SameContent::None);
        }
        let provider = &handle.config.name;
        let _claiming = self.content_claims.lock().await;
        let mut in_flight = None;
        for id in self.store.jobs_with_content(provider, &fingerprint).await? {
            if id == job.id {
                continue;
            }
            let Ok(earlier) = self.store.get(id).await else {
                continue;
            };
            if earlier.state == JobState::Done {
                if job.sha256.is_none() {
                    let source = Arc::clone(file);
                    let sha = blocking_io(move || hashing::sha256_of(&source))
                        .await
                        .map_err(|e| source_error(job, &e))?;
                    job.sha256 = Some(sha);
                }
                if earlier.sha256.is_some() && earlier.sha256 == job.sha256 {
                    return Ok(SameContent::Delivered(id));
                }
            } else if !earlier.state.is_terminal() {
                in_flight = Some(id);
            }
        }
        if let Some(id) = in_flight {
            return Ok(SameContent::InFlight(id));
        }
        self.store
            .record_content(provider, &fingerprint, job.id)
            .await?;
        Ok(SameContent::None)
    }

    /// Wait out a backoff, waking early on shutdown. Answers false on shutdown.
    pub async fn pause(&self, delay: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            () = crate::shutdown::stopped(&mut shutdown) => false,
        }
    }
}

async fn blocking_io<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

/// Count one more forced replacement in this attempt; past the limit the
/// attempt fails (transient: the backoff policy and `max_attempts` decide
/// what follows) with the provider's last word.
fn check_replacements(replacements: &mut u32, mut last: ProviderError) -> Result<(), Stop> {
    *replacements += 1;
    if *replacements > MAX_REPLACEMENTS_PER_ATTEMPT {
        last.kind = ErrorKind::Transient;
        last.message = format!(
            "{MAX_REPLACEMENTS_PER_ATTEMPT} new remote uploads in one attempt were all reported gone; last: {}",
            last.message
        );
        return Err(Stop::Provider(last));
    }
    Ok(())
}

/// Open the source once, never through a symbolic link (one swapped in
/// after the watch saw a regular file is refused), and confirm from the
/// open descriptor that it is a regular file and still the version the job
/// was made for. Everything the attempt reads (upload, hash, fingerprint)
/// goes through this descriptor.
fn open_source(job: &Job) -> Result<(File, FileSignature), Stop> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&job.source)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Stop::Provider(ProviderError::new(
                    ErrorKind::Permanent,
                    format!(
                        "{} is now a symbolic link; sources are never read through a link",
                        job.source.display()
                    ),
                ))
            } else {
                source_error(job, &e)
            }
        })?;
    let meta = file.metadata().map_err(|e| source_error(job, &e))?;
    if !meta.is_file() {
        return Err(Stop::Provider(ProviderError::new(
            ErrorKind::Permanent,
            format!("{} is no longer a regular file", job.source.display()),
        )));
    }
    let signature = FileSignature::of(&meta);
    if !signature.same_content(&job.signature) {
        return Err(Stop::SourceChanged(format!(
            "{} changed (size or modification time) since it was taken",
            job.source.display()
        )));
    }
    // Another file put in its place (same size and time, but another inode
    // on the same device). Device numbers of network mounts can change
    // across a remount; there the inode proves nothing, and size and time
    // decide alone.
    if signature.dev == job.signature.dev && signature.ino != job.signature.ino {
        return Err(Stop::SourceChanged(format!(
            "{} was replaced by another file since it was taken",
            job.source.display()
        )));
    }
    Ok((file, signature))
}

/// The name a job's upload goes by with its provider (a `folder`
/// provider's partial file is named after it): the installation and the
/// job, so a crash inside `create` finds it again.
pub fn upload_tag(installation: &str, job: u64) -> String {
    format!("{installation}-{job}")
}

/// For a batch of small files (`daemon::batch`), which leaves every job it
/// cannot take through a step as it stands: the source read whole through
/// a descriptor opened as an attempt opens it ([`open_source`]), or why not.
pub(crate) fn read_for_batch(job: &Job) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let (file, signature) = open_source(job).map_err(why)?;
    // The size the open descriptor confirmed; a file that grows meanwhile
    // is seen changed before its copy is placed.
    let mut bytes = vec![0u8; usize::try_from(signature.size).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| format!("cannot read the source {}: {e}", job.source.display()))?;
    Ok(bytes)
}

/// For a batch, as [`read_for_batch`]: the source unchanged, or why not.
pub(crate) fn unchanged_for_batch(job: &Job) -> Result<(), String> {
    check_unchanged(job).map_err(why)
}

/// What stopped a step, in words (a batch logs it and hands the job on).
fn why(stop: Stop) -> String {
    match stop {
        Stop::Provider(e) => e.message,
        Stop::SourceChanged(why) => why,
        Stop::Store(e) => e.to_string(),
        Stop::Interrupted | Stop::Paused(_) => "stopped".into(),
    }
}

fn check_unchanged(job: &Job) -> Result<(), Stop> {
    check_source(&job.source, &job.signature)
}

/// The source at `path` still has the content `signature` describes.
fn check_source(path: &Path, signature: &FileSignature) -> Result<(), Stop> {
    if crate::failpoint::active("upload::source_changed") {
        return Err(Stop::SourceChanged(format!(
            "{} changed while it was being uploaded (failpoint)",
            path.display()
        )));
    }
    match std::fs::metadata(path) {
        Ok(meta) if FileSignature::of(&meta).same_content(signature) => Ok(()),
        Ok(_) => Err(Stop::SourceChanged(format!(
            "{} changed while it was being uploaded",
            path.display()
        ))),
        Err(e) => Err(source_error_at(path, &e)),
    }
}

/// A source that vanished or cannot be read fails the job at once.
fn source_error(job: &Job, error: &std::io::Error) -> Stop {
    source_error_at(&job.source, error)
}

fn source_error_at(path: &Path, error: &std::io::Error) -> Stop {
    let message = match error.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{} vanished before it was delivered", path.display())
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot read {}: permission denied; give the hotfolder user read access",
            path.display()
        ),
        std::io::ErrorKind::UnexpectedEof => {
            return Stop::SourceChanged(format!(
                "{} became shorter while it was read",
                path.display()
            ));
        }
        _ => format!("cannot read {}: {error}", path.display()),
    };
    Stop::Provider(ProviderError::new(ErrorKind::Permanent, message))
}

/// Turn a provider error caused by reading the source into the source's own verdict.
fn source_error_of(job: &Job, error: &ProviderError) -> Stop {
    source_verdict(&job.source, &job.signature, error)
}

/// [`source_error_of`] for the source at `path` with `signature`.
fn source_verdict(path: &Path, signature: &FileSignature, error: &ProviderError) -> Stop {
    match check_source(path, signature) {
        Err(stop) => stop,
        Ok(()) => Stop::Provider(error.clone()),
    }
}

/// Bring a hash checkpoint to `target` by reading the source: forward from
/// the checkpoint when it is behind, from the start when it is ahead.
async fn catch_up(
    checkpoint: Option<ResumableSha256>,
    file: &Arc<File>,
    target: u64,
    counters: &Arc<Counters>,
) -> Result<ResumableSha256, Stop> {
    let (hash, _stop_on_drop) = catch_up_stoppable(checkpoint, file, target, counters);
    hash.await
}

/// [`catch_up`] that stops reading (between pieces) once the returned
/// guard is dropped: a future dropped early (a lane failed, shutdown) must
/// not leave a whole-file read running behind it.
fn catch_up_stoppable(
    checkpoint: Option<ResumableSha256>,
    file: &Arc<File>,
    target: u64,
    counters: &Arc<Counters>,
) -> (
    impl std::future::Future<Output = Result<ResumableSha256, Stop>> + use<>,
    StopOnDrop,
) {
    let stop = StopOnDrop::default();
    let stopped = Arc::clone(&stop.0);
    let mut hasher = checkpoint.unwrap_or_default();
    if hasher.length() > target {
        hasher = ResumableSha256::default();
    }
    let (file, counters) = (Arc::clone(file), Arc::clone(counters));
    let hash = async move {
        if hasher.length() == target {
            return Ok(hasher);
        }
        blocking_io(move || {
            let mut start = hasher.length();
            while start < target {
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(std::io::Error::other("stopped"));
                }
                let end = target.min(start + source::PIECE);
                source::read_range(&file, start, end, &counters, |piece| {
                    hasher.update(piece);
                })?;
                start = end;
            }
            Ok(hasher)
        })
        .await
        .map_err(|e| Stop::SourceChanged(format!("cannot re-read the source to resume: {e}")))
    };
    (hash, stop)
}

/// Sets its flag when dropped.
#[derive(Default)]
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A provider acknowledged an offset outside the chunk `start..start+len`
/// it was sent: ask its offset again.
fn acked_outside(acked: u64, start: u64, len: u64) -> ProviderError {
    ProviderError::new(
        ErrorKind::OffsetMismatch,
        format!(
            "the provider acknowledged offset {acked} after a chunk {start}..{}",
            start + len
        ),
    )
}

/// The last path segment of a URL: names an upload without the rest of a
/// URL that may work as a credential.
fn last_segment(url: &str) -> Option<&str> {
    url.trim_end_matches('/').rsplit('/').next()
}

/// Bytes the server acknowledged across `lanes`.
fn lanes_acked(lanes: &[crate::providers::Lane]) -> u64 {
    lanes.iter().map(|l| l.acked.saturating_sub(l.start)).sum()
}

/// Session key marking the join of parallel parts in flight.
const JOIN_INTENT: &str = "joining";

/// Session key marking a second create leg in flight (see
/// [`Uploader::creates_on_offset`]).
const LEG_INTENT: &str = "creating_leg";

/// Name, in the log and the receipt, a remote object that a crash inside a
/// create call may have left and that no lookup can find.
fn note_possible_orphan(job: &mut Job, what: &str) {
    let note = format!(
        "an interrupted create call may have left {what}, made around {}; delete it if it exists",
        job.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    );
    tracing::warn!(job = job.id, "{note}");
    job.replaced.push(note);
}

/// 502, 503 and 504: answers a gateway or proxy may give after the service
/// behind it acted, so they prove nothing about what was done.
fn is_gateway_error(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// Record a failure on the job.
pub fn note_failure(job: &mut Job, error: &ProviderError) {
    job.last_error = Some(ErrorInfo {
        reason: error.message.clone(),
        status: error.status,
        excerpt: error.excerpt.clone(),
        at: jiff::Timestamp::now(),
    });
}
