//! Jobs counted as the embedded store writes them: by state (for
//! `/metrics`) and per provider (for the status page: waiting, under way,
//! and finished in each quarter hour of the last two days). Neither reads
//! the history again, however long it grows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::JobState;

/// A quarter hour: every time zone's midnight falls on one, so "since
/// midnight here" is a whole number of them.
const QUARTER: i64 = 15 * 60;

/// Finished jobs are counted per quarter for this long.
const HORIZON: i64 = 2 * 24 * 3600;

/// One provider's jobs: waiting, under way, and finished since a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderCounts {
    /// Queued (new, waiting for a retry, or held by a pause).
    pub queued: u64,
    /// Being created, uploaded, finalized or filed.
    pub in_flight: u64,
    /// Delivered since the moment asked about.
    pub done: u64,
    /// Failed since the moment asked about.
    pub failed: u64,
}

impl ProviderCounts {
    /// Count `n` jobs in `state` (the finished ones only if recent enough,
    /// which the caller decides).
    pub fn add(&mut self, state: JobState, n: u64) {
        match state {
            JobState::Queued => self.queued += n,
            JobState::Done => self.done += n,
            JobState::Failed => self.failed += n,
            JobState::Superseded => {}
            _ => self.in_flight += n,
        }
    }
}

/// What the counts need of a job record (read without decoding the rest).
#[derive(Debug, Deserialize)]
pub struct Counted {
    /// Its state.
    pub state: JobState,
    /// Its provider ("" until routed).
    #[serde(default)]
    pub provider: String,
    /// When it was last written (when it finished, for a finished job);
    /// a record without it counts as long finished.
    #[serde(default)]
    pub updated_at: jiff::Timestamp,
}

impl Counted {
    /// The counted fields of a stored record, if it has them.
    pub fn of(bytes: &[u8]) -> Option<Counted> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The counts of every job written.
#[derive(Debug, Default)]
pub struct Tally {
    by_state: BTreeMap<JobState, u64>,
    unfinished: BTreeMap<(String, JobState), u64>,
    finished: BTreeMap<(i64, String, JobState), u64>,
}

impl Tally {
    /// A job record is there now.
    pub fn add(&mut self, job: &Counted) {
        *self.by_state.entry(job.state).or_default() += 1;
        if let Some(key) = self.finished_key(job) {
            *self.finished.entry(key).or_default() += 1;
        } else if !job.state.is_terminal() {
            *self
                .unfinished
                .entry((job.provider.clone(), job.state))
                .or_default() += 1;
        }
    }

    /// A job record was replaced (or removed).
    pub fn remove(&mut self, job: &Counted) {
        fn take<K: Ord>(map: &mut BTreeMap<K, u64>, key: K) {
            if let Some(n) = map.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        take(&mut self.by_state, job.state);
        if let Some(key) = self.finished_key(job) {
            take(&mut self.finished, key);
        } else if !job.state.is_terminal() {
            take(&mut self.unfinished, (job.provider.clone(), job.state));
        }
    }

    /// Where a recently finished job is counted (`None` for an unfinished
    /// or an older one); older quarters are forgotten on the way.
    fn finished_key(&mut self, job: &Counted) -> Option<(i64, String, JobState)> {
        if !matches!(job.state, JobState::Done | JobState::Failed) {
            return None;
        }
        let horizon = (jiff::Timestamp::now().as_second() - HORIZON).div_euclid(QUARTER);
        if self
            .finished
            .keys()
            .next()
            .is_some_and(|(quarter, _, _)| *quarter < horizon)
        {
            self.finished = self
                .finished
                .split_off(&(horizon, String::new(), JobState::Queued));
        }
        let quarter = job.updated_at.as_second().div_euclid(QUARTER);
        (quarter >= horizon).then(|| (quarter, job.provider.clone(), job.state))
    }

    /// Jobs by state.
    pub fn by_state(&self) -> BTreeMap<JobState, u64> {
        self.by_state.clone()
    }

    /// Per provider: unfinished jobs, and those finished since `since`
    /// (counted by quarter hour: exact for a `since` on a quarter, such as
    /// a midnight, within the last two days).
    pub fn providers(&self, since: jiff::Timestamp) -> BTreeMap<String, ProviderCounts> {
        let mut out: BTreeMap<String, ProviderCounts> = BTreeMap::new();
        for ((provider, state), n) in &self.unfinished {
            out.entry(provider.clone()).or_default().add(*state, *n);
        }
        let from = since.as_second().div_euclid(QUARTER);
        for ((_, provider, state), n) in self
            .finished
            .range((from, String::new(), JobState::Queued)..)
        {
            out.entry(provider.clone()).or_default().add(*state, *n);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState, provider: &str, ago: i64) -> Counted {
        Counted {
            state,
            provider: provider.into(),
            updated_at: jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - ago)
                .expect("a time"),
        }
    }

    #[test]
    fn counts_follow_a_job_from_queued_to_done_and_back() {
        let mut tally = Tally::default();
        let queued = job(JobState::Queued, "a", 0);
        tally.add(&queued);
        tally.add(&job(JobState::Uploading, "b", 0));
        let midnight = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 3600)
            .expect("a time");
        assert_eq!(tally.providers(midnight)["a"].queued, 1);
        assert_eq!(tally.providers(midnight)["b"].in_flight, 1);
        // Delivered: no longer queued, done today.
        tally.remove(&queued);
        let done = job(JobState::Done, "a", 0);
        tally.add(&done);
        let a = tally.providers(midnight)["a"];
        assert_eq!((a.queued, a.done), (0, 1));
        // Done yesterday (before `since`) and long ago are not today's.
        tally.add(&job(JobState::Done, "a", 2 * 3600));
        tally.add(&job(JobState::Failed, "a", 30 * 24 * 3600));
        assert_eq!(tally.providers(midnight)["a"].done, 1);
        assert_eq!(tally.providers(midnight)["a"].failed, 0);
        // Retried by hand: done again becomes queued.
        tally.remove(&done);
        tally.add(&job(JobState::Queued, "a", 0));
        let a = tally.providers(midnight)["a"];
        assert_eq!((a.queued, a.done), (1, 0));
        assert_eq!(tally.by_state()[&JobState::Done], 1);
        assert_eq!(tally.by_state()[&JobState::Failed], 1);
    }
}
