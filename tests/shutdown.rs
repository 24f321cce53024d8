//! Graceful shutdown: SIGTERM or SIGINT in the middle of a delivery makes the
//! daemon checkpoint the chunk in flight and exit 0 well within
//! `shutdown_timeout`; the job is left resumable, not failed, and the next
//! start resumes it from that checkpoint and delivers it once.

mod common;

use std::fs;
use std::time::Duration;

use common::{Fixture, same_bytes, sha256, wait_for, write_random};

/// Big enough that the delivery is still under way when the signal comes
/// (about 6 s for a debug build on a 2-CPU VM).
const SIZE: u64 = 128 << 20;
const CHUNK: u64 = 256 << 10;
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Start a delivery of `big.mp4`, send `signal` a quarter of the way in, and
/// check the stop was graceful. Answers the fixture, the source's sha256 and
/// the checkpoint the stopped job holds.
fn stop_mid_delivery(signal: i32) -> (Fixture, String, u64) {
    let fx = Fixture::with_config(
        "",
        &format!("chunk_size: {CHUNK}"),
        &format!("shutdown_timeout: {}s", SHUTDOWN_TIMEOUT.as_secs()),
    );
    let staged = fx.root.join("big.mp4");
    write_random(&staged, SIZE, 7);
    let hash = sha256(&staged);

    let mut daemon = fx.start();
    fs::rename(&staged, fx.watch.join("big.mp4")).unwrap();
    let live = fx.wait_for_bytes("big.mp4", SIZE / 4, Duration::from_secs(30));
    let (status, took) = daemon.stop_with(signal, SHUTDOWN_TIMEOUT);
    let log = daemon.log();
    assert!(
        live < SIZE,
        "delivery finished before the signal ({live} bytes); use a bigger file"
    );
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(log.contains("stopped; state flushed"), "{log}");
    assert!(
        !log.contains("shutdown_timeout reached"),
        "the job did not checkpoint in time (took {took:?}):\n{log}"
    );

    // Stopped: the job waits to be resumed, with the chunk that was in
    // flight at the signal acknowledged.
    let rows = fx.status();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "uploading", "{rows:?}");
    assert!(rows[0]["last_error"].is_null(), "{rows:?}");
    let checkpoint = rows[0]["bytes_acknowledged"].as_u64().unwrap();
    assert!(
        checkpoint >= live && checkpoint < SIZE,
        "checkpoint {checkpoint} after {live} live bytes"
    );
    // Nothing left the watch folder; nothing was placed in the outbox yet.
    assert!(fx.watch.join("big.mp4").exists());
    assert!(
        Fixture::files_in(&fx.outbox).is_empty(),
        "{:?}",
        Fixture::files_in(&fx.outbox)
    );
    drop(daemon);
    (fx, hash, checkpoint)
}

#[test]
fn sigterm_mid_delivery_exits_0_and_the_next_start_resumes() {
    let (fx, hash, checkpoint) = stop_mid_delivery(libc::SIGTERM);

    let daemon = fx.start();
    let row = wait_for("the resumed job done", Duration::from_secs(60), || {
        fx.status().into_iter().find(|r| r["state"] == "done")
    });
    assert_eq!(
        daemon.resume_offsets(),
        vec![checkpoint],
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(row["attempts"], 2, "{row}");
    // The stop lost no work: no byte was written twice.
    assert_eq!(row["bytes_sent"], SIZE, "{row}");
    assert_eq!(fx.status().len(), 1, "exactly one job");

    assert_eq!(Fixture::files_in(&fx.outbox), vec!["big.mp4"]);
    assert!(
        fx.partial_leftovers().is_empty(),
        "{:?}",
        fx.partial_leftovers()
    );
    assert!(same_bytes(
        &fx.outbox.join("big.mp4"),
        &fx.done.join("big.mp4")
    ));
    let receipt: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.done.join("big.mp4.receipt.json")).unwrap()).unwrap();
    assert_eq!(receipt["sha256"], hash.as_str());
}

#[test]
fn sigint_mid_delivery_exits_0_with_the_job_resumable() {
    stop_mid_delivery(libc::SIGINT);
}
