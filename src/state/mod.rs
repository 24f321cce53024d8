//! The job store: one versioned record per job in sled, written before any
//! work starts and after every acknowledged step, so that a restart resumes
//! what was in flight and never redoes what finished.

pub use crate::notify::Notification;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod migrate;
mod paths;
mod pg_store;
mod sled_store;
pub mod tally;

pub use self::pg_store::{Imported, Member, NodeView, PgStore};
pub use self::sled_store::SledStore;
pub use self::tally::ProviderCounts;
use crate::hashing::ResumableSha256;
pub use crate::lifecycle::JobState;
use crate::lifecycle::{Outcome, next};
use crate::providers::{Delivery, Session};
pub use crate::source::FileSignature;

/// Version tag written into every job record.
pub const JOB_RECORD_VERSION: u32 = 1;

/// A move recorded before it is made (SPEC §3.6: a crash never loses the
/// file and never files it twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilingIntent {
    /// Where the file is.
    #[serde(with = "paths")]
    pub from: PathBuf,
    /// The free name chosen for it.
    #[serde(with = "paths")]
    pub to: PathBuf,
    /// The hidden temporary that a copy across filesystems writes first.
    #[serde(with = "paths::optional", default)]
    pub temporary: Option<PathBuf>,
}

/// The last failure of a job, for status and error reports (secrets removed
/// by the code that builds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// One sentence: what went wrong.
    pub reason: String,
    /// Last HTTP status, where there was one.
    pub status: Option<u16>,
    /// An excerpt of the provider's answer.
    pub excerpt: Option<String>,
    /// When it happened.
    pub at: jiff::Timestamp,
}

/// A delivered fingerprint and the jobs that claimed it (a store's
/// duplicate detection, as moved between stores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentEntry {
    /// The provider the content went to.
    pub provider: String,
    /// Size and ends hash ([`crate::hashing::fingerprint_of`]).
    pub fingerprint: String,
    /// The jobs, by id in their store.
    pub jobs: Vec<u64>,
}

/// One file's journey. Serialized as JSON with a version tag; what it does
/// not have (an empty `Option`) is left out of the record, which the
/// database copies several times over for each of a job's many writes
/// (records that spell it out as `null` read the same).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Record layout version ([`JOB_RECORD_VERSION`]).
    pub version: u32,
    /// Unique, never reused.
    pub id: u64,
    /// The watch it came from (empty for `hotfolder upload`).
    pub watch: String,
    /// Path relative to the watch folder (the file name for `upload`).
    #[serde(with = "paths")]
    pub relpath: PathBuf,
    /// Where the source is now.
    #[serde(with = "paths")]
    pub source: PathBuf,
    /// The version of the source this job delivers.
    pub signature: FileSignature,
    /// Provider name.
    pub provider: String,
    /// Index of the rule that routed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// What that rule said ([`crate::config::Rule::fingerprint`]): after a
    /// reload moved or changed the rules, the index alone could name
    /// another rule (and its webhooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_fingerprint: Option<String>,
    /// Rendered metadata sent with the upload.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Sidecar file that travels with the source.
    #[serde(
        with = "paths::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sidecar: Option<PathBuf>,
    /// Skip content already delivered to this provider.
    pub skip_duplicates: bool,
    /// Current state.
    pub state: JobState,
    /// Provider session (remote id, upload URL...), persisted before the first byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// Bytes per request, fixed when the job starts.
    pub chunk_size: u64,
    /// Bytes the provider acknowledged.
    pub acked: u64,
    /// Hash state at some offset ≤ `acked` (normally equal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<ResumableSha256>,
    /// Full sha256, once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size + ends hash, for duplicate candidates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Bytes sent over all attempts (resends included).
    pub bytes_sent: u64,
    /// Source bytes read over all attempts.
    pub source_bytes_read: u64,
    /// Attempts started.
    pub attempts: u32,
    /// Failed attempts since the last progress.
    pub failures: u32,
    /// The most recent failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorInfo>,
    /// What the provider reported at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// An earlier job that delivered the same content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<u64>,
    /// Where the source was (or is being) filed: done/ or failed/.
    #[serde(
        with = "paths::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub filed_to: Option<PathBuf>,
    /// Where the sidecar was filed.
    #[serde(
        with = "paths::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sidecar_filed_to: Option<PathBuf>,
    /// The move about to be made (into done/ or failed/, or back into the
    /// watch folder for `retry`), recorded before it is made so that a
    /// crash in the middle is finished from what was meant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filing: Option<FilingIntent>,
    /// The receipt or error report about to be written (or written) for
    /// this filing: a restart finds its own report instead of writing a
    /// second one beside it.
    #[serde(
        with = "paths::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub report: Option<PathBuf>,
    /// The hidden temporary that report is written through, recorded before
    /// it is created so a crash never leaves it behind.
    #[serde(
        with = "paths::optional",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub report_temporary: Option<PathBuf>,
    /// Remote objects abandoned or possibly orphaned on the way.
    pub replaced: Vec<String>,
    /// In a fleet, the node that runs the job (`None` on a single box).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// In a fleet, the epoch of the claim this copy of the job was read
    /// under: a write with an older epoch is refused (0: unclaimed).
    #[serde(default)]
    pub epoch: u64,
    /// Created.
    pub created_at: jiff::Timestamp,
    /// First byte sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<jiff::Timestamp>,
    /// Reached a terminal state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<jiff::Timestamp>,
    /// Webhook events raised so far: each event's id counts on from it, so
    /// a job retried by hand raises new ids, while a step redone after a
    /// crash (whose count was not recorded) raises the same one again.
    #[serde(default)]
    pub events_raised: u64,
    /// Last write.
    pub updated_at: jiff::Timestamp,
}

impl Job {
    /// A new queued job.
    pub fn new(
        id: u64,
        watch: &str,
        relpath: &Path,
        source: &Path,
        signature: FileSignature,
        provider: &str,
    ) -> Self {
        let now = jiff::Timestamp::now();
        Job {
            version: JOB_RECORD_VERSION,
            id,
            watch: watch.to_string(),
            relpath: relpath.to_path_buf(),
            source: source.to_path_buf(),
            signature,
            provider: provider.to_string(),
            rule: None,
            rule_fingerprint: None,
            metadata: BTreeMap::new(),
            sidecar: None,
            skip_duplicates: true,
            state: JobState::Queued,
            session: None,
            chunk_size: 0,
            acked: 0,
            hash: None,
            sha256: None,
            fingerprint: None,
            bytes_sent: 0,
            source_bytes_read: 0,
            attempts: 0,
            failures: 0,
            last_error: None,
            delivery: None,
            duplicate_of: None,
            filed_to: None,
            sidecar_filed_to: None,
            filing: None,
            report: None,
            report_temporary: None,
            replaced: Vec::new(),
            node: None,
            epoch: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
            events_raised: 0,
            updated_at: now,
        }
    }

    /// The file name, for messages.
    pub fn file_name(&self) -> String {
        self.relpath.file_name().map_or_else(
            || self.relpath.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// Apply what the job's owner learned: the state becomes what the
    /// lifecycle table says. Answers the new state.
    pub fn apply(&mut self, outcome: Outcome) -> JobState {
        let to = next(self.state, outcome);
        if to != self.state {
            tracing::debug!(
                job = self.id,
                from = self.state.as_str(),
                to = to.as_str(),
                ?outcome,
                "state"
            );
        }
        self.state = to;
        if to.is_terminal() {
            self.finished_at.get_or_insert_with(jiff::Timestamp::now);
        } else {
            self.finished_at = None;
        }
        to
    }
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("cannot open the state database in {path}: {reason}")]
    Open {
        /// The state folder.
        path: PathBuf,
        /// What went wrong and what to do (said once: not also a source).
        reason: String,
    },
    /// A read or write failed.
    #[error("state database error: {0}")]
    Db(#[from] sled::Error),
    /// The state folder could not be prepared.
    #[error("cannot prepare state folder {path}: {source}")]
    Folder {
        /// The state folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A record could not be decoded.
    #[error("job record {key} is unreadable: {source}")]
    Decode {
        /// The record key.
        key: String,
        /// The decode error.
        source: serde_json::Error,
    },
    /// A record written by a newer hotfolder.
    #[error(
        "job {job} was written by a newer hotfolder (record version {version}); upgrade hotfolder"
    )]
    TooNew {
        /// Job id.
        job: u64,
        /// Its version.
        version: u32,
    },
    /// No such job.
    #[error("no job {0}; `hotfolder status` lists the jobs")]
    NotFound(u64),
    /// The fleet database failed a statement (unreachable, restarting,
    /// refusing): the work is retried, nothing is lost.
    #[error("the fleet database failed: {0}")]
    Database(String),
    /// Another node of the fleet took this job over (this node's claim ran
    /// out): this node stops working on it at once, deleting nothing.
    #[error("job {0} is held by another node now; this node stops working on it")]
    Fenced(u64),
    /// Another live node of the fleet has this node's name.
    #[error(
        "node name {node:?} is in use by a live node (its last heartbeat {seconds:.0} s ago); give this node another `store.node`, or stop the other one"
    )]
    NodeNameTaken {
        /// The name.
        node: String,
        /// Seconds since the other node's heartbeat.
        seconds: f64,
    },
    /// The fleet database was migrated by a newer hotfolder.
    #[error(
        "the fleet database has schema version {found}, this hotfolder knows up to {known}; upgrade this node"
    )]
    SchemaTooNew {
        /// The database's version.
        found: usize,
        /// The newest this build knows.
        known: usize,
    },
}

/// What a job store must do, whatever keeps the records: one versioned
/// record per job, written before any work and after every acknowledged
/// step; an index from a watch-relative path to its latest job; the
/// fingerprints of content delivered (or being delivered) per provider. Today's one
/// implementation is [`SledStore`], the embedded database of a single box.
#[allow(async_fn_in_trait)]
pub trait JobStore {
    /// This installation's id: random, made once when the store is first
    /// opened, kept for its life. Job ids count from 1 in every store, so
    /// remote objects are tagged with both.
    fn installation(&self) -> &str;

    /// A fresh job id, never reused.
    ///
    /// # Errors
    /// Database failure.
    async fn next_id(&self) -> Result<u64, StoreError>;

    /// Write a job durably (on disk before returning).
    ///
    /// # Errors
    /// Database failure.
    async fn put(&self, job: &mut Job) -> Result<(), StoreError>;

    /// Write a job without waiting for the disk (for progress that may be
    /// lost in a crash without harm, because the server's offset is asked).
    ///
    /// # Errors
    /// Database failure.
    async fn put_buffered(&self, job: &mut Job) -> Result<(), StoreError>;

    /// Record a new job unless a job exists for this version of its file
    /// (another node of a fleet took it at the same moment): `false` then.
    /// The record may reach the disk only with the next durable write
    /// ([`JobStore::put`], [`JobStore::flush`]): nothing acts on a job (no
    /// request, no move) before its first durable step, and a new job lost
    /// to a crash before that is simply its file, found again at start.
    ///
    /// # Errors
    /// Database failure.
    async fn create(&self, job: &mut Job) -> Result<bool, StoreError>;

    /// Make everything written so far durable.
    ///
    /// # Errors
    /// Database failure.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Read one job.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], or a decode failure.
    async fn get(&self, id: u64) -> Result<Job, StoreError>;

    /// An operator's setting kept with the jobs (the paused scopes), so
    /// that it survives a restart and holds for every node of a fleet.
    ///
    /// # Errors
    /// Database failure.
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Keep `value` for a setting, durably, if it is still `expected`
    /// (`None`: not set); answers whether it was. Two processes changing
    /// it at once (two nodes of a fleet) cannot lose each other's change:
    /// the one that read an older value finds out and reads again.
    ///
    /// # Errors
    /// Database failure.
    async fn swap_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, StoreError>;

    /// Add a webhook delivery that `job`'s step raised to the outbox,
    /// unless one with its key is there. Like [`JobStore::create`], it may
    /// reach the disk only with the next durable write (that step's). In a
    /// fleet it is fenced as the job's writes are: a node that lost the job
    /// adds nothing.
    ///
    /// # Errors
    /// Database failure; [`StoreError::Fenced`].
    async fn outbox_add(&self, delivery: &Notification, job: &Job) -> Result<(), StoreError>;

    /// Deliveries whose time has come, at most `limit`, oldest first; in a
    /// fleet each is kept from the other nodes for
    /// [`crate::notify::SENDING_FOR`] while this one sends it.
    ///
    /// # Errors
    /// Database or decode failure.
    async fn outbox_due(&self, limit: usize) -> Result<Vec<Notification>, StoreError>;

    /// Record a failed try (attempts, next time, reason).
    ///
    /// # Errors
    /// Database failure.
    async fn outbox_update(&self, delivery: &Notification) -> Result<(), StoreError>;

    /// A delivery the receiver took.
    ///
    /// # Errors
    /// Database failure.
    async fn outbox_remove(&self, key: &str) -> Result<(), StoreError>;

    /// Every delivery waiting, at most `limit`, oldest first (for status).
    ///
    /// # Errors
    /// Database or decode failure.
    async fn outbox(&self, limit: usize) -> Result<Vec<Notification>, StoreError>;

    /// One page of jobs in id order (or newest first), at most
    /// `query.limit`: the cost of a page does not grow with history.
    ///
    /// # Errors
    /// Database or decode failure.
    async fn page(&self, query: &Page) -> Result<Vec<Job>, StoreError>;

    /// How many jobs are in each state, without reading them.
    async fn counts(&self) -> std::collections::BTreeMap<JobState, u64>;

    /// Per provider: unfinished jobs, and those finished since `since`
    /// (the status page's "today"), without reading the whole history.
    ///
    /// # Errors
    /// Database failure.
    async fn provider_counts(
        &self,
        since: jiff::Timestamp,
    ) -> Result<std::collections::BTreeMap<String, ProviderCounts>, StoreError>;

    /// Every job, oldest first.
    ///
    /// # Errors
    /// Database or decode failure.
    async fn all(&self) -> Result<Vec<Job>, StoreError>;

    /// The latest job for a watch-relative path.
    ///
    /// # Errors
    /// Database or decode failure.
    async fn latest_for(&self, watch: &str, relpath: &Path) -> Result<Option<Job>, StoreError>;

    /// Remember that `job` delivers content with this fingerprint: recorded
    /// before its upload starts (so a job with the same content waits for
    /// it instead of uploading it a second time) and again on delivery.
    ///
    /// # Errors
    /// Database failure.
    async fn record_content(
        &self,
        provider: &str,
        fingerprint: &str,
        job: u64,
    ) -> Result<(), StoreError>;

    /// Jobs that delivered, or are delivering, content with this
    /// fingerprint to this provider (their states say which).
    ///
    /// # Errors
    /// Database failure.
    async fn jobs_with_content(
        &self,
        provider: &str,
        fingerprint: &str,
    ) -> Result<Vec<u64>, StoreError>;
}

/// Which jobs a page holds.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Jobs after this id (before it, newest first); `None`: from the start
    /// (from the newest).
    pub after: Option<u64>,
    /// At most this many.
    pub limit: usize,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
}

/// The job store the daemon runs with: an enum that forwards (the set of
/// stores is fixed and needs no boxing). Cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// The embedded sled database in `state_dir`.
    Sled(SledStore),
    /// A PostgreSQL database shared by a fleet.
    Postgres(PgStore),
}

impl Store {
    /// Open (creating) the single-box store in `state_dir`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when another process holds it or it is damaged.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        SledStore::open(state_dir).map(Store::Sled)
    }

    /// Open the store the config names.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming what failed.
    pub async fn open_configured(config: &crate::config::Config) -> Result<Self, StoreError> {
        match &config.store {
            crate::config::StoreConfig::Sled => Self::open(&config.state_dir),
            crate::config::StoreConfig::Postgres {
                url, node, lease, ..
            } => {
                // The control socket lives in state_dir whatever the store.
                prepare_state_dir(&config.state_dir)?;
                let store = PgStore::open(url.expose()).await?;
                Ok(Store::Postgres(store.as_node(node, *lease)))
            }
        }
    }
}

impl Store {
    /// Job `id` for this process to work on: `None` when another node of a
    /// fleet holds it now (a single box holds every job).
    ///
    /// # Errors
    /// Database or decode failure.
    pub async fn get_for_work(&self, id: u64) -> Result<Option<Job>, StoreError> {
        match self {
            Store::Sled(s) => s.get(id).await.map(Some),
            Store::Postgres(s) => s.get_held(id).await,
        }
    }

    /// Before deleting anything remote for `job`: does this process still
    /// hold it? (Always, on a single box.) In a fleet the claim is checked
    /// against its epoch and its lease renewed.
    ///
    /// # Errors
    /// [`StoreError::Fenced`] when another node holds it now, or a
    /// database failure.
    pub async fn confirm_hold(&self, job: &Job) -> Result<(), StoreError> {
        match self {
            Store::Sled(_) => Ok(()),
            Store::Postgres(s) => s.confirm_hold(job).await,
        }
    }

    /// A failed job about to be retried: in a fleet, this process claims
    /// it (see [`PgStore::claim_for_retry`]); nothing to do on one box.
    ///
    /// # Errors
    /// [`StoreError::Fenced`] when it was retried meanwhile elsewhere, or a
    /// database failure.
    pub async fn claim_for_retry(&self, job: &mut Job) -> Result<(), StoreError> {
        match self {
            Store::Sled(_) => Ok(()),
            Store::Postgres(s) => s.claim_for_retry(job).await,
        }
    }

    /// Let go of a job this process claimed but will not run, so that a
    /// running node of the fleet takes it; nothing to do on one box.
    ///
    /// # Errors
    /// A database failure.
    pub async fn release_claim(&self, job: &Job) -> Result<(), StoreError> {
        match self {
            Store::Sled(_) => Ok(()),
            Store::Postgres(s) => s.release_claim(job).await,
        }
    }

    /// The nodes of a fleet (none for a single box).
    ///
    /// # Errors
    /// The store's failure.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, StoreError> {
        match self {
            Store::Sled(_) => Ok(Vec::new()),
            Store::Postgres(s) => s.nodes().await,
        }
    }

    /// Does the store answer? (A fleet's database may be away for a while.)
    ///
    /// # Errors
    /// The store's failure.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sled(_) => Ok(()),
            Store::Postgres(s) => s.ping().await,
        }
    }
}

/// Whether the fleet database answers, said once per outage: `warn` when
/// it goes away, `info` when it is back, and counted for `/metrics`.
#[derive(Debug, Default)]
pub struct StoreHealth {
    down: std::sync::atomic::AtomicBool,
    /// Outages since start.
    pub outages: std::sync::atomic::AtomicU64,
}

impl StoreHealth {
    /// A statement failed because the database is unreachable.
    pub fn failed(&self, error: &StoreError) {
        use std::sync::atomic::Ordering;
        if !self.down.swap(true, Ordering::SeqCst) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %error, "the fleet database is unreachable; this node takes no new work and retries until it answers (nothing is lost)");
        }
    }

    /// A statement succeeded.
    pub fn answered(&self) {
        if self.down.swap(false, std::sync::atomic::Ordering::SeqCst) {
            tracing::info!("the fleet database answers again; work goes on");
        }
    }

    /// Is the database away now?
    pub fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::SeqCst)
    }
}

macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Sled($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Durable writes asked for and flushes run so far (the embedded
    /// store's group commit); `None` for a fleet database, whose every
    /// write is its own transaction.
    pub fn durability_counts(&self) -> Option<(u64, u64)> {
        match self {
            Store::Sled(s) => Some(s.durability_counts()),
            Store::Postgres(_) => None,
        }
    }

    /// Job records the embedded store has written (none counted for the
    /// fleet's, whose server counts its own).
    pub fn records_written(&self) -> Option<u64> {
        match self {
            Store::Sled(s) => Some(s.records_written()),
            Store::Postgres(_) => None,
        }
    }
}

impl JobStore for Store {
    fn installation(&self) -> &str {
        forward!(self, s => s.installation())
    }

    async fn next_id(&self) -> Result<u64, StoreError> {
        forward!(self, s => s.next_id().await)
    }

    async fn put(&self, job: &mut Job) -> Result<(), StoreError> {
        forward!(self, s => s.put(job).await)
    }

    async fn put_buffered(&self, job: &mut Job) -> Result<(), StoreError> {
        forward!(self, s => s.put_buffered(job).await)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        forward!(self, s => s.flush().await)
    }

    async fn create(&self, job: &mut Job) -> Result<bool, StoreError> {
        forward!(self, s => s.create(job).await)
    }

    async fn get(&self, id: u64) -> Result<Job, StoreError> {
        forward!(self, s => s.get(id).await)
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        forward!(self, s => s.setting(key).await)
    }

    async fn swap_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, StoreError> {
        forward!(self, s => s.swap_setting(key, expected, value).await)
    }

    async fn outbox_add(&self, delivery: &Notification, job: &Job) -> Result<(), StoreError> {
        forward!(self, s => s.outbox_add(delivery, job).await)
    }

    async fn outbox_due(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        forward!(self, s => s.outbox_due(limit).await)
    }

    async fn outbox_update(&self, delivery: &Notification) -> Result<(), StoreError> {
        forward!(self, s => s.outbox_update(delivery).await)
    }

    async fn outbox_remove(&self, key: &str) -> Result<(), StoreError> {
        forward!(self, s => s.outbox_remove(key).await)
    }

    async fn outbox(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        forward!(self, s => s.outbox(limit).await)
    }

    async fn page(&self, query: &Page) -> Result<Vec<Job>, StoreError> {
        forward!(self, s => s.page(query).await)
    }

    async fn counts(&self) -> std::collections::BTreeMap<JobState, u64> {
        forward!(self, s => s.counts().await)
    }

    async fn provider_counts(
        &self,
        since: jiff::Timestamp,
    ) -> Result<std::collections::BTreeMap<String, ProviderCounts>, StoreError> {
        forward!(self, s => s.provider_counts(since).await)
    }

    async fn all(&self) -> Result<Vec<Job>, StoreError> {
        forward!(self, s => s.all().await)
    }

    async fn latest_for(&self, watch: &str, relpath: &Path) -> Result<Option<Job>, StoreError> {
        forward!(self, s => s.latest_for(watch, relpath).await)
    }

    async fn record_content(
        &self,
        provider: &str,
        fingerprint: &str,
        job: u64,
    ) -> Result<(), StoreError> {
        forward!(self, s => s.record_content(provider, fingerprint, job).await)
    }

    async fn jobs_with_content(
        &self,
        provider: &str,
        fingerprint: &str,
    ) -> Result<Vec<u64>, StoreError> {
        forward!(self, s => s.jobs_with_content(provider, fingerprint).await)
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Job, StoreError> {
    #[derive(Deserialize)]
    struct Header {
        version: u32,
        id: u64,
    }
    // Read whole once; only a record that does not read is read again for
    // its version (a newer binary's record says so, not "damaged").
    let job = match serde_json::from_slice::<Job>(bytes) {
        Ok(job) if job.version > JOB_RECORD_VERSION => {
            return Err(StoreError::TooNew {
                job: job.id,
                version: job.version,
            });
        }
        Ok(job) => return Ok(job),
        Err(e) => e,
    };
    let header: Header = serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: "?".into(),
        source,
    })?;
    if header.version > JOB_RECORD_VERSION {
        return Err(StoreError::TooNew {
            job: header.id,
            version: header.version,
        });
    }
    Err(StoreError::Decode {
        key: header.id.to_string(),
        source: job,
    })
}

/// Create `state_dir` (owner-only) if missing and tighten its mode.
///
/// # Errors
/// [`StoreError::Folder`].
pub fn prepare_state_dir(state_dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let folder_error = |source| StoreError::Folder {
        path: state_dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(folder_error)?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(folder_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature() -> FileSignature {
        FileSignature {
            size: 5,
            mtime_ns: 1,
            dev: 1,
            ino: 2,
        }
    }

    /// A small file is written four times or more; each record is copied
    /// several times over by the database, so what a job does not have is
    /// left out of it, and records that spell it out (written before) still
    /// read the same.
    #[test]
    fn a_record_leaves_out_what_the_job_does_not_have_and_older_records_still_read() {
        let job = Job::new(
            7,
            "w",
            Path::new("a.mp4"),
            Path::new("/w/a.mp4"),
            signature(),
            "p",
        );
        let record = serde_json::to_string(&job).unwrap();
        assert!(
            !record.contains("null"),
            "a new job's record spells out nothing it lacks: {record}"
        );
        let mut spelled_out: serde_json::Value = serde_json::to_value(&job).unwrap();
        for field in [
            "rule",
            "rule_fingerprint",
            "sidecar",
            "session",
            "hash",
            "sha256",
            "fingerprint",
            "last_error",
            "delivery",
            "duplicate_of",
            "filed_to",
            "sidecar_filed_to",
            "filing",
            "report",
            "report_temporary",
            "node",
            "started_at",
            "finished_at",
        ] {
            spelled_out[field] = serde_json::Value::Null;
        }
        let older = decode(spelled_out.to_string().as_bytes()).unwrap();
        let newer = decode(record.as_bytes()).unwrap();
        assert_eq!(
            serde_json::to_value(&older).unwrap(),
            serde_json::to_value(&newer).unwrap()
        );
        assert_eq!(
            serde_json::to_value(&newer).unwrap(),
            serde_json::to_value(&job).unwrap()
        );
    }

    #[tokio::test]
    async fn jobs_survive_reopen_and_index_by_source() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        {
            let store = Store::open(&state).unwrap();
            let id = store.next_id().await.unwrap();
            let mut job = Job::new(
                id,
                "w",
                Path::new("a/b.mp4"),
                Path::new("/x/a/b.mp4"),
                signature(),
                "p",
            );
            store.put(&mut job).await.unwrap();
            store.record_content("p", "fp", id).await.unwrap();
            store.flush().await.unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // sled's flusher thread lets go of the file lock a moment after the
        // store is dropped (longer on a loaded machine).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match Store::open(&state) {
                Ok(store) => break store,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let job = store
            .latest_for("w", Path::new("a/b.mp4"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(
            store.jobs_with_content("p", "fp").await.unwrap(),
            vec![job.id]
        );
        assert!(store.next_id().await.unwrap() > job.id);
    }

    /// As the fleet's store answers it (the highest id): an older job of the
    /// same source written again (a retry, a late status) does not take the
    /// source back from the newer one.
    #[tokio::test]
    async fn the_latest_job_of_a_source_is_the_newest_even_after_an_older_one_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let relpath = Path::new("a/b.mp4");
        let mut older = Job::new(
            store.next_id().await.unwrap(),
            "w",
            relpath,
            Path::new("/x/a/b.mp4"),
            signature(),
            "p",
        );
        store.put(&mut older).await.unwrap();
        let mut newer = older.clone();
        newer.id = store.next_id().await.unwrap();
        store.put(&mut newer).await.unwrap();
        older.state = JobState::Failed;
        store.put(&mut older).await.unwrap();
        let latest = store.latest_for("w", relpath).await.unwrap().unwrap();
        assert_eq!(latest.id, newer.id);
    }

    #[test]
    fn debug_output_never_shows_an_upload_url() {
        let mut job = Job::new(1, "w", Path::new("a"), Path::new("/a"), signature(), "p");
        job.session = Some(crate::providers::Session {
            remote_id: Some("v1".into()),
            upload_url: Some("https://up.example/u?token=SECRET-77".into()),
            ..Default::default()
        });
        let text = format!("{job:?}");
        assert!(!text.contains("SECRET-77"), "{text}");
        assert!(text.contains("v1") && text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn applying_outcomes_stamps_the_finish() {
        use crate::lifecycle::Outcome;
        let mut job = Job::new(1, "w", Path::new("a"), Path::new("/a"), signature(), "p");
        assert_eq!(job.apply(Outcome::Filed), JobState::Queued);
        assert_eq!(job.apply(Outcome::Permanent), JobState::Failing);
        assert_eq!(job.apply(Outcome::Filed), JobState::Failed);
        assert!(job.finished_at.is_some());
        assert_eq!(job.apply(Outcome::Retry), JobState::Queued);
        assert!(job.finished_at.is_none());
    }

    /// Many jobs flushing at once never hang (with sled 0.34's
    /// `flush_async` this hung on every run). The writers run on a runtime
    /// of their own so that a hang fails the test instead of freezing it.
    #[test]
    fn concurrent_puts_do_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let writer = store.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for task in 0..32 {
                    let store = writer.clone();
                    tasks.spawn(async move {
                        for n in 0..20 {
                            let relpath = PathBuf::from(format!("{task}/{n}.mp4"));
                            let id = store.next_id().await.unwrap();
                            let mut job = Job::new(id, "w", &relpath, &relpath, signature(), "p");
                            store.put(&mut job).await.unwrap();
                        }
                    });
                }
                while let Some(result) = tasks.join_next().await {
                    result.unwrap();
                }
            });
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("640 concurrent puts finish within a minute");
        let all = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(store.all())
            .unwrap();
        assert_eq!(all.len(), 32 * 20);
    }

    #[test]
    fn newer_records_are_refused() {
        let bytes = br#"{"version": 99, "id": 4}"#;
        assert!(matches!(
            decode(bytes),
            Err(StoreError::TooNew {
                job: 4,
                version: 99
            })
        ));
        // A newer record that reads as a job all the same is refused too.
        let mut job = Job::new(5, "w", Path::new("a"), Path::new("/a"), signature(), "p");
        job.version = 99;
        assert!(matches!(
            decode(&serde_json::to_vec(&job).unwrap()),
            Err(StoreError::TooNew {
                job: 5,
                version: 99
            })
        ));
        job.version = JOB_RECORD_VERSION;
        assert_eq!(decode(&serde_json::to_vec(&job).unwrap()).unwrap().id, 5);
    }
}
