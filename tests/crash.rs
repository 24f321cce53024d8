//! `kill -9` in the middle of a large folder delivery, then a restart: the
//! job resumes from its last persisted checkpoint (not from zero) and the
//! file is delivered exactly once, byte-identical.

mod common;

use std::fs;
use std::time::Duration;

use common::{Fixture, same_bytes, sha256, wait_for, write_random};

/// Large enough that the delivery takes seconds (about 6 s for a debug build
/// on a 2-CPU VM), so a kill a quarter of the way in leaves seconds before
/// the end; small enough to keep the test near 10 s.
const SIZE: u64 = 128 << 20;
/// One fsync of the partial file and one database flush per chunk.
const CHUNK: u64 = 256 << 10;

#[test]
fn kill_9_mid_delivery_resumes_and_delivers_exactly_once() {
    let fx = Fixture::with_config("", &format!("chunk_size: {CHUNK}"), "");
    // Written outside, then renamed in: the watch sees it complete at once.
    let staged = fx.root.join("big.mp4");
    write_random(&staged, SIZE, 42);
    let hash = sha256(&staged);

    let mut first = fx.start();
    fs::rename(&staged, fx.watch.join("big.mp4")).unwrap();
    let live = fx.wait_for_bytes("big.mp4", SIZE / 4, Duration::from_secs(30));
    first.kill9();
    assert!(
        live < SIZE,
        "delivery finished before the kill ({live} bytes); use a bigger file"
    );

    // Stopped: status reads the database, which holds the last checkpoint.
    let rows = fx.status();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "uploading", "{rows:?}");
    assert_eq!(rows[0]["attempts"], 1, "{rows:?}");
    let checkpoint = rows[0]["bytes_acknowledged"].as_u64().unwrap();
    // The daemon may acknowledge another chunk between the status call that
    // read `live` and the kill; what the checkpoint must never exceed is what
    // the partial file durably holds.
    let partials = fx.partial_leftovers();
    assert_eq!(partials.len(), 1, "{partials:?}");
    let on_disk = fs::metadata(fx.outbox.join(".hotfolder-partial").join(&partials[0]))
        .unwrap()
        .len();
    assert!(
        checkpoint > 0 && checkpoint <= on_disk && checkpoint < SIZE,
        "checkpoint {checkpoint}, {on_disk} bytes in the partial file, {live} live bytes before the kill"
    );
    assert_eq!(
        checkpoint % CHUNK,
        0,
        "checkpoints fall on chunk boundaries"
    );

    let second = fx.start();
    let row = wait_for("the resumed job done", Duration::from_secs(60), || {
        fx.status().into_iter().find(|r| r["state"] == "done")
    });
    // Resumed from the checkpoint, not restarted.
    assert_eq!(
        second.resume_offsets(),
        vec![checkpoint],
        "log:\n{}",
        second.log()
    );
    assert!(
        !second.log().contains("starting a new remote upload"),
        "{}",
        second.log()
    );
    assert!(row["attempts"].as_u64().unwrap() >= 2, "{row}");
    let sent = row["bytes_sent"].as_u64().unwrap();
    assert!(sent < 2 * SIZE, "bytes_sent {sent} of a {SIZE}-byte file");
    // Only bytes past the checkpoint were written again: at most one chunk.
    assert!(
        sent <= SIZE + CHUNK,
        "bytes_sent {sent}: more than one chunk sent twice"
    );
    assert_eq!(fx.status().len(), 1, "exactly one job");

    // Delivered exactly once, byte-identical, no numbered copy, no leftovers.
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["big.mp4"]);
    assert!(
        fx.partial_leftovers().is_empty(),
        "{:?}",
        fx.partial_leftovers()
    );
    assert!(!fx.watch.join("big.mp4").exists());
    assert!(same_bytes(
        &fx.outbox.join("big.mp4"),
        &fx.done.join("big.mp4")
    ));
    let receipt: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.done.join("big.mp4.receipt.json")).unwrap()).unwrap();
    assert_eq!(
        receipt["sha256"],
        hash.as_str(),
        "the delivered bytes hash as the source did"
    );
    assert_eq!(receipt["bytes"], SIZE);
    assert!(receipt["attempts"].as_u64().unwrap() >= 2, "{receipt}");
}
