//! Group commit: many tasks that each need "everything I wrote is on disk"
//! share one flush instead of queueing one fsync each.
//!
//! Every job step is made durable before the job moves on, so a burst of
//! small files asks for thousands of flushes a second; one fsync covers every
//! write made before it started, so a caller that arrives while a flush runs
//! only needs the next one, which then serves everyone who arrived meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Result of one flush, as seen by everyone it covered.
#[derive(Clone, Debug, Default)]
struct Completed {
    /// Requests up to this ticket are covered.
    ticket: u64,
    /// The flush's error, if it failed (the same for all it covered).
    error: Option<String>,
}

#[derive(Default)]
struct Queue {
    /// Tickets handed out so far.
    requested: u64,
    /// A flusher task is running.
    flushing: bool,
}

/// The blocking flush a group commit runs.
type FlushFn = dyn Fn() -> Result<(), String> + Send + Sync;

/// Coalesces flushes of one store. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    flush: Arc<FlushFn>,
    queue: Arc<Mutex<Queue>>,
    completed: watch::Sender<Completed>,
    counts: Arc<Counts>,
}

/// How much durability was asked for and what it cost, for `/metrics`: a
/// bulk drop's flushes per file are what a group commit is there to cut.
#[derive(Default)]
struct Counts {
    requested: AtomicU64,
    flushed: AtomicU64,
}

impl GroupCommit {
    /// Coalesce calls of `flush`, which makes every earlier write durable.
    pub fn new(flush: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        GroupCommit {
            flush: Arc::new(flush),
            queue: Arc::default(),
            completed: watch::Sender::new(Completed::default()),
            counts: Arc::default(),
        }
    }

    /// Durable writes asked for, and flushes run to serve them, so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.requested.load(Ordering::Relaxed),
            self.counts.flushed.load(Ordering::Relaxed),
        )
    }

    /// Wait until a flush that started after this call has finished.
    ///
    /// `flush` runs on the blocking pool, at most one at a time, in a task of
    /// its own, so cancelling a caller never leaves the queue stuck.
    ///
    /// # Errors
    /// The message of the failed flush that covered this request.
    pub async fn flush(&self) -> Result<(), String> {
        let mut completed = self.completed.subscribe();
        self.counts.requested.fetch_add(1, Ordering::Relaxed);
        let ticket = {
            let mut queue = self.queue.lock().map_err(|_| "flush queue poisoned")?;
            queue.requested += 1;
            if !queue.flushing {
                queue.flushing = true;
                tokio::spawn(self.clone().run());
            }
            queue.requested
        };
        let done = completed
            .wait_for(|c| c.ticket >= ticket)
            .await
            .map_err(|_| "the flusher stopped")?;
        match &done.error {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Flush until no request is left uncovered.
    async fn run(self) {
        loop {
            let target = match self.queue.lock() {
                Ok(queue) => queue.requested,
                Err(_) => return,
            };
            let run = Arc::clone(&self.flush);
            self.counts.flushed.fetch_add(1, Ordering::Relaxed);
            let error = match tokio::task::spawn_blocking(move || run()).await {
                Ok(result) => result.err(),
                Err(e) => Some(format!("flush thread failed: {e}")),
            };
            self.completed.send_replace(Completed {
                ticket: target,
                error,
            });
            let Ok(mut queue) = self.queue.lock() else {
                return;
            };
            if queue.requested == target {
                queue.flushing = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Callers arriving while a flush runs share the next one; every caller
    /// returns only after a flush that started after its write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_share_flushes() {
        let writes = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let flushes = Arc::new(AtomicU64::new(0));
        let commit = {
            let (writes, durable, flushes) = (
                Arc::clone(&writes),
                Arc::clone(&durable),
                Arc::clone(&flushes),
            );
            GroupCommit::new(move || {
                // A flush makes every write made before it started durable.
                let seen = writes.load(Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                flushes.fetch_add(1, Ordering::SeqCst);
                durable.fetch_max(seen, Ordering::SeqCst);
                Ok(())
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (commit, writes, durable) =
                (commit.clone(), Arc::clone(&writes), Arc::clone(&durable));
            tasks.spawn(async move {
                let mine = writes.fetch_add(1, Ordering::SeqCst) + 1;
                commit.flush().await.unwrap();
                assert!(durable.load(Ordering::SeqCst) >= mine);
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        let flushes = flushes.load(Ordering::SeqCst);
        assert!(
            (1..64).contains(&flushes),
            "{flushes} flushes for 64 callers"
        );
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_callers_and_the_next_one_runs() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&calls);
        let commit = GroupCommit::new(move || match counted.fetch_add(1, Ordering::SeqCst) {
            0 => Err("disk full".to_string()),
            _ => Ok(()),
        });
        assert_eq!(commit.flush().await, Err("disk full".to_string()));
        assert_eq!(commit.flush().await, Ok(()));
    }
}
