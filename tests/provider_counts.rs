//! The status page's per-provider counts (jobs queued, in flight, done and
//! failed since a moment) from both stores: the embedded one counts as it
//! writes and again from disk after a restart, PostgreSQL counts with two
//! indexed queries. Both give the same answer.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use hotfolder::state::{FileSignature, Job, JobState, JobStore, PgStore, ProviderCounts, Store};

/// Five jobs: queued, uploading and done to `archive`, failed to `vod`,
/// and one that failed before it had a provider.
async fn write_jobs(store: &Store) {
    let jobs = [
        ("archive", JobState::Queued),
        ("archive", JobState::Uploading),
        ("archive", JobState::Done),
        ("vod", JobState::Failed),
        ("", JobState::Failed),
    ];
    for (i, (provider, state)) in jobs.into_iter().enumerate() {
        let id = i as u64 + 1;
        let signature = FileSignature {
            size: 1,
            mtime_ns: i128::from(id),
            dev: 1,
            ino: id,
        };
        let name = format!("f{id}.mp4");
        let mut job = Job::new(
            id,
            "drop",
            Path::new(&name),
            &Path::new("/x").join(&name),
            signature,
            provider,
        );
        store.put(&mut job).await.expect("a new job");
        // Through every step a job takes, as a daemon writes it.
        job.state = state;
        store.put(&mut job).await.expect("its state");
    }
}

fn counts(queued: u64, in_flight: u64, done: u64, failed: u64) -> ProviderCounts {
    ProviderCounts {
        queued,
        in_flight,
        done,
        failed,
    }
}

async fn check(store: &Store) {
    let hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let expected: BTreeMap<String, ProviderCounts> = [
        ("", counts(0, 0, 0, 1)),
        ("archive", counts(1, 1, 1, 0)),
        ("vod", counts(0, 0, 0, 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(store.provider_counts(hour_ago).await.unwrap(), expected);
    // Finished before the moment asked about: not counted.
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let unfinished = store.provider_counts(later).await.unwrap();
    assert_eq!(unfinished.get("archive"), Some(&counts(1, 1, 0, 0)));
    assert!(
        unfinished
            .get("vod")
            .is_none_or(|c| *c == counts(0, 0, 0, 0))
    );
}

#[tokio::test]
async fn the_embedded_store_counts_as_it_writes_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).expect("sled");
        write_jobs(&store).await;
        check(&store).await;
        store.flush().await.unwrap();
    }
    let reopened = Store::open(dir.path()).expect("sled again");
    check(&reopened).await;
}

#[tokio::test]
async fn postgresql_counts_the_same() {
    let pg = common::postgres::Postgres::start();
    let url = pg.database("counts");
    let store = Store::Postgres(PgStore::open(&url).await.expect("the fleet store"));
    write_jobs(&store).await;
    check(&store).await;
}
