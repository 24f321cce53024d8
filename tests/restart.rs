//! A restart with 1,000 finished jobs in the database redoes nothing: with
//! `after_success: leave` every delivered file stays in the watch folder, so
//! the scans after the restart offer all of them again, and each must be
//! recognised as already done.

mod common;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use common::{Fixture, in_state, wait_for};

const FILES: usize = 1000;

/// A few KiB of content unique to file `i` (so no file is a duplicate of
/// another, which would be skipped rather than delivered).
fn content(i: usize) -> Vec<u8> {
    let len = 2048 + (i * 37) % 2048;
    let mut state = i as u64 + 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

fn name(i: usize) -> String {
    format!("clip-{i:04}.mp4")
}

/// `status` (the table) lists every file once, done.
fn assert_table_lists_all_done(fx: &Fixture, files: usize) {
    let out = fx.hotfolder(&["status"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    // FILE is `watch/relpath`, the second column; STATE the fourth.
    let mut listed: HashMap<String, Vec<String>> = HashMap::new();
    for row in table.lines().skip(1) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        listed
            .entry(cells[1].to_string())
            .or_default()
            .push(cells[3].to_string());
    }
    assert_eq!(listed.len(), files, "one row per file:\n{table}");
    for i in 0..files {
        let file = format!("drop/{}", name(i));
        assert_eq!(
            listed.get(&file),
            Some(&vec!["done".to_string()]),
            "{file}:\n{table}"
        );
    }
}

#[test]
fn a_restart_with_1000_finished_jobs_redoes_nothing() {
    let fx = Fixture::with_config("after_success: leave", "", "");
    for i in 0..FILES {
        fs::write(fx.watch.join(name(i)), content(i)).unwrap();
    }

    let mut first = fx.start();
    wait_for("1,000 jobs done", Duration::from_secs(120), || {
        (in_state(&fx.status(), "done").len() == FILES).then_some(())
    });
    let (status, _) = first.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");

    // Stopped: status reads the database itself.
    let rows = fx.status();
    assert_eq!(in_state(&rows, "done").len(), FILES, "{} jobs", rows.len());
    assert_eq!(rows.len(), FILES);
    assert_table_lists_all_done(&fx, FILES);

    let mut second = fx.start();
    assert!(second.log().contains("resumed=0"), "{}", second.log());
    // The scan at start and one periodic rescan have both seen every file.
    wait_for(
        "two full scans after the restart",
        Duration::from_secs(20),
        || {
            let log = second.log();
            let scans = log.lines().filter(|l| l.contains("full scan done")).count();
            (scans >= 2).then_some(())
        },
    );
    // A new file is taken only after everything offered before it (one
    // channel, in order), so once its job is done the 1,000 old files have
    // been offered and judged too; it also proves the watcher is live.
    fs::write(fx.watch.join(name(FILES)), content(FILES)).unwrap();
    wait_for("the new file done", Duration::from_secs(20), || {
        fx.status()
            .iter()
            .find(|r| r["file"] == name(FILES) && r["state"] == "done")
            .map(|_| ())
    });

    let rows = fx.status();
    assert_eq!(rows.len(), FILES + 1, "exactly one job per file");
    assert_eq!(in_state(&rows, "done").len(), FILES + 1);
    let redone: Vec<_> = rows.iter().filter(|r| r["attempts"] != 1).collect();
    assert!(redone.is_empty(), "jobs attempted again: {redone:?}");
    let log = second.log();
    assert_eq!(
        log.matches("new job").count(),
        1,
        "only the new file is a new job:\n{log}"
    );
    assert!(!log.contains("resuming"), "{log}");

    let mut delivered = Fixture::files_in(&fx.outbox);
    let mut expected: Vec<String> = (0..=FILES).map(name).collect();
    delivered.sort();
    expected.sort();
    assert_eq!(
        delivered, expected,
        "each file delivered once, no numbered copies"
    );
    assert_table_lists_all_done(&fx, FILES + 1);

    let (status, _) = second.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(in_state(&fx.status(), "done").len(), FILES + 1);
}
