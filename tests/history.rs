//! A long history: 100,000 finished jobs in the store (written through the
//! library, as a daemon would have written them over months). The API
//! answers in pages whose size does not grow with history, `/metrics`
//! counts by state without reading every job, and the status page's
//! refresh asks for one page. The daemon's CPU time for a minute's worth of
//! page refreshes is printed (a figure, not an assertion).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::sandbox::http;
use common::{Fixture, free_address};
use hotfolder::lifecycle::Outcome;
use hotfolder::state::{FileSignature, Job, JobStore, Store};

const JOBS: u64 = 100_000;

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat (1-based),
    // 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn ids(body: &str) -> Vec<u64> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(body).expect("a JSON list");
    rows.iter().filter_map(|r| r["id"].as_u64()).collect()
}

#[test]
fn a_long_history_is_paged_and_counted_without_reading_it_all() {
    let address = free_address();
    let fx = Fixture::with_config("", "", &format!("http: {{ listen: \"{address}\" }}"));
    let started = Instant::now();
    {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let store = Store::open(&fx.state).expect("store");
        runtime.block_on(async {
            let signature = FileSignature {
                size: 1,
                mtime_ns: 1,
                dev: 1,
                ino: 1,
            };
            for n in 1..=JOBS {
                let id = store.next_id().await.expect("id");
                assert_eq!(id, n);
                let name = format!("old/{n}.mp4");
                let mut job = Job::new(
                    id,
                    "drop",
                    Path::new(&name),
                    Path::new(&name),
                    signature,
                    "archive",
                );
                job.apply(Outcome::Delivered);
                job.apply(Outcome::Filed);
                store.put_buffered(&mut job).await.expect("put");
            }
            store.flush().await.expect("flush");
        });
    }
    eprintln!("wrote {JOBS} finished jobs in {:?}", started.elapsed());

    let daemon = fx.start_within(Duration::from_secs(90));
    let get = |path: &str| http(&address, "GET", path, &[]).expect("HTTP answer");

    let (status, body) = get("/api/jobs");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ids(&body),
        (1..=100).collect::<Vec<_>>(),
        "a default page of 100, oldest first"
    );
    let (_, body) = get("/api/jobs?newest=1&limit=3");
    assert_eq!(ids(&body), vec![JOBS, JOBS - 1, JOBS - 2]);
    let (_, body) = get(&format!("/api/jobs?after={}&limit=1000", JOBS - 5));
    assert_eq!(
        ids(&body),
        ((JOBS - 4)..=JOBS).collect::<Vec<_>>(),
        "the last page"
    );
    let (_, body) = get("/api/jobs?limit=5000");
    assert_eq!(ids(&body).len(), 1000, "a page holds at most 1000 jobs");
    let (status, body) = get("/api/jobs?state=bogus");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bogus"), "{body}");

    let (_, metrics) = get("/metrics");
    assert!(
        metrics.contains(&format!("hotfolder_jobs{{state=\"done\"}} {JOBS}")),
        "{metrics}"
    );

    // A minute of the status page (one refresh a second) and one scrape.
    let before = cpu_seconds(daemon.pid());
    let clock = Instant::now();
    for _ in 0..60 {
        let (status, _) = get("/api/jobs?newest=1&limit=200");
        assert_eq!(status, 200);
    }
    let (status, _) = get("/metrics");
    assert_eq!(status, 200);
    eprintln!(
        "60 page refreshes and a scrape with {JOBS} jobs: {:?} wall, {:.2} s of daemon CPU",
        clock.elapsed(),
        cpu_seconds(daemon.pid()) - before
    );
}
