//! A big drop never makes a task per file: job tasks live only while they
//! can make progress (a few per provider beyond its `max_concurrent`); the
//! other jobs wait as ids. `/metrics` shows the live tasks
//! (`hotfolder_job_tasks`) beside the queue. And a drop of small files
//! costs few durable database writes per file: steps with no request or
//! irreversible move between them share one.

mod common;

use std::time::Duration;

use common::sandbox::http;
use common::{Fixture, counter, free_address, gauge, in_state, wait_for, write_random};

#[test]
fn a_big_drop_keeps_job_tasks_bounded() {
    const FILES: usize = 300;
    let address = free_address();
    let fx = Fixture::with_config(
        "",
        "max_concurrent: 1\nchunk_size: 64KiB",
        &format!("workers: 1\nhttp: {{ listen: \"{address}\" }}"),
    );
    let staged = fx.root.join("staged");
    for n in 0..FILES {
        write_random(&staged.join(format!("f{n:04}.mp4")), 256 << 10, n as u64);
    }
    let daemon = fx.start();
    std::fs::rename(&staged, fx.watch.join("batch")).unwrap();
    let mut most_tasks = 0.0f64;
    let mut most_queued = 0.0f64;
    wait_for("every file done", Duration::from_secs(240), || {
        let (_, metrics) = http(&address, "GET", "/metrics", &[]).ok()?;
        most_tasks = most_tasks.max(gauge(&metrics, "hotfolder_job_tasks").unwrap_or(f64::MAX));
        most_queued = most_queued.max(gauge(&metrics, "hotfolder_queue_depth").unwrap_or(0.0));
        (in_state(&fx.status(), "done").len() == FILES).then_some(())
    });
    eprintln!("{FILES} files: at most {most_tasks} job tasks, at most {most_queued} jobs queued");
    assert!(
        most_queued >= 50.0,
        "the jobs did queue up ({most_queued}); the test proves nothing otherwise"
    );
    assert!(
        most_tasks <= 4.0,
        "at most a few job tasks at once, not one per file: {most_tasks}"
    );
    drop(daemon);
}

/// Each durable write is a wait for the disk (shared by the steps of jobs
/// that wait at once): a small file's job takes five: its create intent,
/// its session, its upload's end (the last chunk's acknowledgement with
/// it), its filing and receipt names (its delivery with them), and its end.
#[test]
fn a_small_file_costs_five_durable_writes() {
    const FILES: usize = 40;
    const WRITES_PER_FILE: f64 = 5.0;
    let address = free_address();
    let fx = Fixture::with_config("", "", &format!("http: {{ listen: \"{address}\" }}"));
    let staged = fx.root.join("staged");
    for n in 0..FILES {
        write_random(&staged.join(format!("f{n:03}.mp4")), 4096, n as u64);
    }
    let daemon = fx.start();
    let before = counter(&address, "hotfolder_store_durable_writes_total");
    std::fs::rename(&staged, fx.watch.join("batch")).expect("drop");
    wait_for("every file done", Duration::from_secs(120), || {
        (in_state(&fx.status(), "done").len() == FILES).then_some(())
    });
    let writes = counter(&address, "hotfolder_store_durable_writes_total") - before;
    let flushes = counter(&address, "hotfolder_store_flushes_total");
    drop(daemon);
    let receipts = Fixture::files_in(&fx.done.join("batch"))
        .iter()
        .filter(|name| name.ends_with(".receipt.json"))
        .count();
    assert_eq!(receipts, FILES, "every file filed with its receipt");
    eprintln!(
        "{FILES} small files: {writes} durable writes ({:.1} per file), {flushes} flushes in all",
        writes / FILES as f64
    );
    assert!(
        writes <= WRITES_PER_FILE * FILES as f64,
        "at most {WRITES_PER_FILE} durable writes per small file, not {:.1}",
        writes / FILES as f64
    );
}
