//! The single box's job store: sled, embedded in `state_dir`. Records are
//! versioned JSON; concurrent job steps share one flush (group commit).

use std::path::Path;

use super::tally::{Counted, ProviderCounts};
use super::{
    ContentEntry, Job, JobState, JobStore, Notification, Page, StoreError, decode,
    prepare_state_dir,
};
use crate::group_commit::GroupCommit;

/// sled's page cache: enough for the jobs in flight and recent history.
const CACHE_BYTES: u64 = 32 << 20;

/// About the size of a job's record once under way (1 to 1.5 KiB).
const RECORD_BYTES: usize = 2048;

/// The sled-backed job store. Cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    installation: std::sync::Arc<str>,
    /// Jobs per state, counted once at open and kept as jobs are written,
    /// so `/metrics` costs the same with a hundred or a million jobs; and
    /// what the next write of an unfinished job needs to know.
    tally: std::sync::Arc<std::sync::Mutex<Written>>,
    commit: GroupCommit,
    /// Job records written, for `/metrics`.
    records_written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    jobs: sled::Tree,
    sources: sled::Tree,
    delivered: sled::Tree,
    meta: sled::Tree,
    /// Webhook deliveries waiting, by their key.
    outbox: sled::Tree,
    /// Batches of small files noted since the store was opened (each
    /// note's number; the notes a start finds are forgotten before any
    /// batch runs).
    batches_noted: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What the store keeps in memory of the jobs it writes.
#[derive(Default)]
struct Written {
    tally: super::tally::Tally,
    /// Each unfinished job as last counted, and the source (its key in the
    /// index) under which the index names it, or a newer job of that
    /// source, already: a job is written four times or more on its way,
    /// and its later writes then neither decode the record they replace
    /// nor read the index. A job whose file comes back under another name
    /// (a retry, where its name was taken) is named again under it. Finished
    /// jobs leave it, so it holds no more than the jobs under way.
    unfinished: std::collections::HashMap<u64, (Counted, Option<Vec<u8>>)>,
}

fn source_key(watch: &str, relpath: &Path) -> Vec<u8> {
    let mut key = watch.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(relpath.as_os_str().as_encoded_bytes());
    key
}

fn delivered_key(provider: &str, fingerprint: &str) -> Vec<u8> {
    format!("{provider}\0{fingerprint}").into_bytes()
}

/// Where the meta tree notes a batch of small files under way.
const BATCH_PREFIX: &str = "batch/";

fn batch_key(number: u64) -> String {
    format!("{BATCH_PREFIX}{number:020}")
}

impl SledStore {
    /// Durable writes asked for and flushes run, for `/metrics`.
    pub fn durability_counts(&self) -> (u64, u64) {
        self.commit.counts()
    }

    /// Note that a batch of small files, jobs `ids`, is under way, and
    /// make the note durable before the batch reads any of its files. A
    /// batch a crash, a kill or a power cut stops is still noted at the
    /// next start ([`Self::batches_cut_short`]): its jobs then go on one at
    /// a time, each recording its attempt, so a file that takes the process
    /// down (or hangs it until a watchdog does) cannot stop a whole batch
    /// again at every start. Answers the note's number, for
    /// [`Self::batch_ended`].
    ///
    /// # Errors
    /// A write failure.
    pub async fn note_batch(&self, ids: &[u64]) -> Result<u64, StoreError> {
        let number = self
            .batches_noted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let members: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
        self.meta.insert(batch_key(number), members)?;
        self.flush().await?;
        Ok(number)
    }

    /// The batch noted as `number` ended without a crash (its jobs done,
    /// handed on alone, or left between steps by a shutdown). Not waited
    /// for: a crash that loses this only sends its unfinished jobs on alone.
    ///
    /// # Errors
    /// A write failure.
    pub fn batch_ended(&self, number: u64) -> Result<(), StoreError> {
        self.meta.remove(batch_key(number))?;
        Ok(())
    }

    /// The jobs of every batch noted and not ended: batches a crash cut
    /// short. Forgotten with [`Self::forget_batches_cut_short`].
    ///
    /// # Errors
    /// A read failure.
    pub fn batches_cut_short(&self) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::new();
        for entry in self.meta.scan_prefix(BATCH_PREFIX) {
            let (_, members) = entry?;
            ids.extend(
                members
                    .chunks_exact(8)
                    .filter_map(|id| id.try_into().ok().map(u64::from_be_bytes)),
            );
        }
        Ok(ids)
    }

    /// Forget the batches [`Self::batches_cut_short`] found, once what
    /// their jobs need is recorded.
    ///
    /// # Errors
    /// A write failure.
    pub fn forget_batches_cut_short(&self) -> Result<(), StoreError> {
        for entry in self.meta.scan_prefix(BATCH_PREFIX) {
            let (key, _) = entry?;
            self.meta.remove(key)?;
        }
        Ok(())
    }

    /// Job records written since it was opened.
    pub fn records_written(&self) -> u64 {
        self.records_written
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Open (creating) the database in `state_dir`, which is created with
    /// owner-only permissions.
    ///
    /// # Errors
    /// [`StoreError::Open`] when another process holds it or it is damaged.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        prepare_state_dir(state_dir)?;
        let path = state_dir.join("db");
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::HighThroughput)
            // sled caches up to 1 GiB by default, which a long history (or
            // one big drop) fills: the daemon's memory would grow with the
            // number of jobs ever stored.
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|source| {
                let reason = if source.to_string().contains("could not acquire lock") {
                    "another process holds it; is a hotfolder daemon already running with this state_dir? Stop it, or give this command a config with another state_dir".to_string()
                } else {
                    source.to_string()
                };
                StoreError::Open {
                    path: path.clone(),
                    reason,
                }
            })?;
        let flushed = db.clone();
        let meta = db.open_tree("meta")?;
        let installation = installation_id(&meta)?;
        let jobs = db.open_tree("jobs")?;
        let mut tally = super::tally::Tally::default();
        for entry in jobs.iter() {
            let (_, bytes) = entry?;
            if let Some(job) = Counted::of(&bytes) {
                tally.add(&job);
            }
        }
        Ok(SledStore {
            tally: std::sync::Arc::new(std::sync::Mutex::new(Written {
                tally,
                unfinished: Default::default(),
            })),
            installation,
            // Not `flush_async`: in sled 0.34 concurrent `flush_async` calls
            // can miss their wake-up and hang forever (spacejam/sled#1308,
            // #1241), which froze every job of a busy daemon. The blocking
            // `flush` has no such problem; the group commit runs it on the
            // blocking pool, one at a time, for everyone waiting.
            commit: GroupCommit::new(move || flushed.flush().map(drop).map_err(|e| e.to_string())),
            records_written: Default::default(),
            jobs,
            sources: db.open_tree("sources")?,
            delivered: db.open_tree("delivered")?,
            outbox: db.open_tree("outbox")?,
            meta,
            batches_noted: Default::default(),
        })
    }
}

impl JobStore for SledStore {
    fn installation(&self) -> &str {
        &self.installation
    }

    async fn next_id(&self) -> Result<u64, StoreError> {
        // A plain counter, not sled's generate_id (which leaps by a million
        // after every restart): operators type these ids into `retry`.
        let next = self.meta.update_and_fetch("next_job_id", |old| {
            let last = old
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            Some((last + 1).to_be_bytes().to_vec())
        })?;
        Ok(next
            .and_then(|b| b.as_ref().try_into().ok())
            .map_or(1, u64::from_be_bytes))
    }

    async fn put(&self, job: &mut Job) -> Result<(), StoreError> {
        self.put_buffered(job).await?;
        self.flush().await
    }

    async fn put_buffered(&self, job: &mut Job) -> Result<(), StoreError> {
        job.updated_at = jiff::Timestamp::now();
        // Room for a typical record at once, not grown by doubling.
        let mut bytes = Vec::with_capacity(RECORD_BYTES);
        serde_json::to_writer(&mut bytes, job).map_err(|source| StoreError::Decode {
            key: job.id.to_string(),
            source,
        })?;
        let counted = Counted {
            state: job.state,
            provider: job.provider.clone(),
            updated_at: job.updated_at,
        };
        let unfinished = !job.state.is_terminal();
        // The record and the counts change together: two writes of one
        // job at once (a double-clicked retry) cannot count in the other
        // order than they were stored.
        let mut written = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.jobs.insert(job.id.to_be_bytes(), bytes)?;
        self.records_written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let indexed = !job.watch.is_empty() || !job.relpath.as_os_str().is_empty();
        let key = indexed.then(|| source_key(&job.watch, &job.relpath));
        let known = written.unfinished.remove(&job.id);
        let (replaced, named) = match known {
            Some((old, named_as)) => (Some(old), named_as.is_some() && named_as == key),
            None => (previous.as_deref().and_then(Counted::of), false),
        };
        if let Some(old) = replaced {
            written.tally.remove(&old);
        }
        written.tally.add(&counted);
        if unfinished {
            written
                .unfinished
                .insert(job.id, (counted, key.clone().filter(|_| named)));
        }
        drop(written);
        // The source names its newest job (the highest id, as in the
        // fleet's store): an older job written again does not take the
        // source back, and a job's later steps, which find it named
        // already, only read the index (each write is an insert). A job
        // whose entry a crash lost (the two trees are written one after
        // the other) is named again at its first write after the restart.
        if let Some(key) = key.filter(|_| !named) {
            let named = self
                .sources
                .get(&key)?
                .and_then(|id| id.as_ref().try_into().ok().map(u64::from_be_bytes));
            if named.is_none_or(|named| named < job.id) {
                self.sources.insert(key.as_slice(), &job.id.to_be_bytes())?;
            }
            // Once named (by it or a newer job) it stays so: the index only
            // moves to higher ids.
            if unfinished {
                let mut written = self.tally.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((_, named_as)) = written.unfinished.get_mut(&job.id) {
                    *named_as = Some(key);
                }
            }
        }
        Ok(())
    }

    /// One process owns a sled store and takes files one at a time: a new
    /// job is simply written, and reaches the disk with the job's first
    /// durable step (which comes before anything acts on it), so a burst of
    /// new files does not wait for the disk once per file.
    async fn create(&self, job: &mut Job) -> Result<bool, StoreError> {
        self.put_buffered(job).await?;
        Ok(true)
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .meta
            .get(setting_key(key))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    async fn swap_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, StoreError> {
        let swapped = self.meta.compare_and_swap(
            setting_key(key),
            expected.map(str::as_bytes),
            Some(value.as_bytes()),
        )?;
        if swapped.is_err() {
            return Ok(false);
        }
        self.flush().await?;
        Ok(true)
    }

    async fn outbox_add(&self, delivery: &Notification, _job: &Job) -> Result<(), StoreError> {
        let bytes = encode_delivery(delivery)?;
        let _ =
            self.outbox
                .compare_and_swap(delivery.key.as_bytes(), None::<&[u8]>, Some(bytes))?;
        Ok(())
    }

    async fn outbox_due(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        let now = jiff::Timestamp::now();
        let mut due: Vec<Notification> = self
            .outbox(usize::MAX)
            .await?
            .into_iter()
            .filter(|d| d.next_at <= now)
            .collect();
        due.truncate(limit);
        Ok(due)
    }

    async fn outbox_update(&self, delivery: &Notification) -> Result<(), StoreError> {
        // Only while it waits: a delivery removed meanwhile stays removed.
        let bytes = encode_delivery(delivery)?;
        let _ = self
            .outbox
            .fetch_and_update(delivery.key.as_bytes(), |old| old.map(|_| bytes.clone()))?;
        Ok(())
    }

    async fn outbox_remove(&self, key: &str) -> Result<(), StoreError> {
        self.outbox.remove(key.as_bytes())?;
        Ok(())
    }

    async fn outbox(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        let mut all = Vec::new();
        for entry in &self.outbox {
            let (key, bytes) = entry?;
            let delivery: Notification =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    source,
                })?;
            all.push(delivery);
        }
        all.sort_by_key(|d| d.next_at);
        all.truncate(limit);
        Ok(all)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.commit
            .flush()
            .await
            .map_err(|e| StoreError::from(sled::Error::Io(std::io::Error::other(e))))
    }

    async fn page(&self, query: &Page) -> Result<Vec<Job>, StoreError> {
        let matches = |job: &Job| query.state.is_none_or(|s| job.state == s);
        let mut out = Vec::new();
        let mut take = |entry: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool, StoreError> {
            let (_, bytes) = entry?;
            let job = decode(&bytes)?;
            if matches(&job) {
                out.push(job);
            }
            Ok(out.len() < query.limit)
        };
        if query.newest_first {
            let end = query.after.map_or(u64::MAX, |a| a.saturating_sub(1));
            for entry in self.jobs.range(..=end.to_be_bytes()).rev() {
                if !take(entry)? {
                    break;
                }
            }
        } else {
            let start = query.after.map_or(0, |a| a.saturating_add(1));
            for entry in self.jobs.range(start.to_be_bytes()..) {
                if !take(entry)? {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn counts(&self) -> std::collections::BTreeMap<JobState, u64> {
        self.tally
            .lock()
            .map(|w| w.tally.by_state())
            .unwrap_or_default()
    }

    async fn provider_counts(
        &self,
        since: jiff::Timestamp,
    ) -> Result<std::collections::BTreeMap<String, ProviderCounts>, StoreError> {
        Ok(self
            .tally
            .lock()
            .map(|w| w.tally.providers(since))
            .unwrap_or_default())
    }

    async fn get(&self, id: u64) -> Result<Job, StoreError> {
        let bytes = self
            .jobs
            .get(id.to_be_bytes())?
            .ok_or(StoreError::NotFound(id))?;
        decode(&bytes)
    }

    async fn all(&self) -> Result<Vec<Job>, StoreError> {
        self.jobs
            .iter()
            .map(|entry| {
                let (_, bytes) = entry?;
                decode(&bytes)
            })
            .collect()
    }

    async fn latest_for(&self, watch: &str, relpath: &Path) -> Result<Option<Job>, StoreError> {
        match self.sources.get(source_key(watch, relpath))? {
            None => Ok(None),
            Some(id) => {
                let id = u64::from_be_bytes(id.as_ref().try_into().unwrap_or([0; 8]));
                match self.get(id).await {
                    Ok(job) => Ok(Some(job)),
                    Err(StoreError::NotFound(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn record_content(
        &self,
        provider: &str,
        fingerprint: &str,
        job: u64,
    ) -> Result<(), StoreError> {
        let key = delivered_key(provider, fingerprint);
        let mut ids = self.jobs_with_content(provider, fingerprint).await?;
        if !ids.contains(&job) {
            ids.push(job);
        }
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
        self.delivered.insert(key, bytes)?;
        Ok(())
    }

    async fn jobs_with_content(
        &self,
        provider: &str,
        fingerprint: &str,
    ) -> Result<Vec<u64>, StoreError> {
        let Some(bytes) = self.delivered.get(delivered_key(provider, fingerprint))? else {
            return Ok(Vec::new());
        };
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }
}

impl SledStore {
    /// Every delivered fingerprint with the jobs that claimed it, for
    /// moving a box's history into a fleet's store.
    ///
    /// # Errors
    /// A read failure.
    pub fn content_entries(&self) -> Result<Vec<ContentEntry>, StoreError> {
        let mut entries = Vec::new();
        for entry in self.delivered.iter() {
            let (key, ids) = entry?;
            let key = String::from_utf8_lossy(&key);
            let Some((provider, fingerprint)) = key.split_once('\0') else {
                continue;
            };
            entries.push(ContentEntry {
                provider: provider.to_string(),
                fingerprint: fingerprint.to_string(),
                jobs: ids
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            });
        }
        Ok(entries)
    }
}

fn encode_delivery(delivery: &Notification) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(delivery).map_err(|source| StoreError::Decode {
        key: delivery.key.clone(),
        source,
    })
}

/// Operators' settings live in the meta tree beside the store's own keys,
/// under a prefix of their own.
fn setting_key(key: &str) -> String {
    format!("setting/{key}")
}

fn installation_id(meta: &sled::Tree) -> Result<std::sync::Arc<str>, StoreError> {
    let fresh = format!("{:016x}", rand::random::<u64>());
    // Only the first opening's id sticks.
    let _ = meta.compare_and_swap("installation", None::<&[u8]>, Some(fresh.as_bytes()))?;
    let stored = meta
        .get("installation")?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    Ok(stored.unwrap_or(fresh).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a fresh folder (kept while the folder lives), with a
    /// runtime to wait on its calls.
    fn open_store() -> (tempfile::TempDir, SledStore, tokio::runtime::Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (dir, store, rt)
    }

    #[test]
    fn a_job_whose_file_comes_back_under_another_name_is_found_under_it() {
        use crate::state::{Job, JobStore};
        let (_dir, store, rt) = open_store();
        let signature = crate::source::FileSignature {
            size: 5,
            mtime_ns: 1,
            dev: 1,
            ino: 2,
        };
        let mut job = Job::new(
            1,
            "w",
            Path::new("x.mp4"),
            Path::new("/w/x.mp4"),
            signature,
            "p",
        );
        rt.block_on(store.put(&mut job)).unwrap();
        // As a retry brings the file back where its name was taken.
        job.relpath = "x-1.mp4".into();
        job.source = "/w/x-1.mp4".into();
        rt.block_on(store.put(&mut job)).unwrap();
        let found = rt
            .block_on(store.latest_for("w", Path::new("x-1.mp4")))
            .unwrap();
        assert_eq!(found.map(|j| j.id), Some(1), "the job under its new name");
    }

    #[test]
    fn a_batch_noted_and_not_ended_is_found_cut_short() {
        let (_dir, store, rt) = open_store();
        rt.block_on(store.note_batch(&[4, 5])).unwrap();
        let ended = rt.block_on(store.note_batch(&[10, 11, 12])).unwrap();
        store.batch_ended(ended).unwrap();
        assert_eq!(store.batches_cut_short().unwrap(), vec![4, 5]);
        store.forget_batches_cut_short().unwrap();
        assert!(store.batches_cut_short().unwrap().is_empty());
    }
}
