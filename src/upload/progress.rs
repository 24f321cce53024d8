//! Live progress of uploads in flight (bytes, rate, ETA) for `status`, the
//! progress bar and later the status page. Nothing here is persisted: the
//! store holds what was acknowledged; this holds what is moving now.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::source::Counters;
use crate::state::Job;

/// A snapshot for display.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Bytes acknowledged plus bytes of the chunk in flight (for a
    /// progress bar that moves smoothly).
    pub bytes: u64,
    /// Bytes the provider has confirmed.
    pub acknowledged: u64,
    /// File size.
    pub total: u64,
    /// Average rate since this attempt started.
    pub bytes_per_second: f64,
    /// Seconds left at that rate.
    pub eta_seconds: Option<f64>,
}

struct Live {
    provider: String,
    counters: Arc<Counters>,
    acked: u64,
    acked_at_start: u64,
    total: u64,
    started: Instant,
}

/// Progress of every job in flight. Cheap to clone.
#[derive(Clone, Default)]
pub struct ProgressBoard {
    live: Arc<Mutex<HashMap<u64, Live>>>,
}

impl ProgressBoard {
    /// A job's attempt starts; returns the counters the engine updates
    /// (reads also add to `all_jobs_read`).
    pub fn start(&self, job: &Job, all_jobs_read: &Counter) -> Arc<Counters> {
        let counters = Arc::new(Counters::new(all_jobs_read.clone()));
        if let Ok(mut live) = self.live.lock() {
            live.insert(
                job.id,
                Live {
                    provider: job.provider.clone(),
                    counters: Arc::clone(&counters),
                    acked: job.acked,
                    acked_at_start: job.acked,
                    total: job.signature.size,
                    started: Instant::now(),
                },
            );
        }
        counters
    }

    /// A chunk was acknowledged.
    pub fn acked(&self, job: u64, offset: u64) {
        if let Ok(mut live) = self.live.lock()
            && let Some(entry) = live.get_mut(&job)
        {
            entry.acked = offset;
            entry.counters.in_flight.store(0, Ordering::Relaxed);
        }
    }

    /// The attempt ended.
    pub fn finish(&self, job: u64) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&job);
        }
    }

    /// How many attempts are moving bytes now.
    pub fn in_flight(&self) -> usize {
        self.live.lock().map_or(0, |live| live.len())
    }

    /// Per provider, the rates of its uploads in flight added up (bytes
    /// per second, each averaged since its attempt started).
    pub fn rates_by_provider(&self) -> std::collections::BTreeMap<String, f64> {
        let Ok(live) = self.live.lock() else {
            return Default::default();
        };
        let mut rates = std::collections::BTreeMap::new();
        for entry in live.values() {
            let rate = Self::snapshot(entry).bytes_per_second;
            *rates.entry(entry.provider.clone()).or_insert(0.0) += rate;
        }
        rates
    }

    /// A snapshot of one job, if it is in flight.
    pub fn get(&self, job: u64) -> Option<Progress> {
        let live = self.live.lock().ok()?;
        Some(Self::snapshot(live.get(&job)?))
    }

    fn snapshot(entry: &Live) -> Progress {
        let bytes =
            (entry.acked + entry.counters.in_flight.load(Ordering::Relaxed)).min(entry.total);
        let elapsed = entry.started.elapsed().as_secs_f64();
        let moved = bytes.saturating_sub(entry.acked_at_start) as f64;
        let rate = if elapsed > 0.0 { moved / elapsed } else { 0.0 };
        Progress {
            bytes,
            acknowledged: entry.acked,
            total: entry.total,
            bytes_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| (entry.total - bytes) as f64 / rate),
        }
    }
}
