//! Files flow from the watch folder to the folder provider: awkward names,
//! nested folders, a `.part` renamed into place; hidden and too-small files
//! stay untouched.

mod common;

use std::fs;
use std::time::Duration;

use common::{Fixture, sha256, wait_for, write_random};

#[test]
fn awkward_names_are_delivered_byte_identical_with_receipts() {
    let fx = Fixture::with_config("min_size: 1KiB", "chunk_size: 64KiB", "");
    let names = [
        "with spaces.mp4",
        "Ünïcödé – ビデオ.mov",
        "nested/deeper/folder/clip.mxf",
        "quote's & (parens).mkv",
    ];
    let mut hashes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let path = fx.watch.join(name);
        write_random(&path, 200_000 + i as u64 * 77_777, i as u64);
        hashes.push(sha256(&path));
    }
    // Copied as .part, renamed into place: taken under its final name.
    write_random(&fx.watch.join("renamed.mp4.part"), 150_000, 99);
    let renamed_hash = sha256(&fx.watch.join("renamed.mp4.part"));
    // Ignored: hidden, and below min_size.
    fs::write(fx.watch.join(".hidden.mp4"), vec![1u8; 5000]).unwrap();
    fs::write(fx.watch.join("tiny.mp4"), b"too small").unwrap();

    let _daemon = fx.start();
    fs::rename(
        fx.watch.join("renamed.mp4.part"),
        fx.watch.join("renamed.mp4"),
    )
    .unwrap();

    let expected = names.len() + 1;
    wait_for("every file done", Duration::from_secs(30), || {
        let rows = fx.status();
        (common::in_state(&rows, "done").len() == expected).then_some(())
    });
    for (name, hash) in names.iter().zip(&hashes) {
        assert_eq!(
            &sha256(&fx.outbox.join(name)),
            hash,
            "{name} delivered byte-identical"
        );
        assert!(fx.done.join(name).exists(), "{name} moved to done/");
        assert!(
            !fx.watch.join(name).exists(),
            "{name} left the watch folder"
        );
        let receipt: serde_json::Value = serde_json::from_slice(
            &fs::read(fx.done.join(format!("{name}.receipt.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(receipt["sha256"], hash.as_str());
        assert_eq!(receipt["provider"], "archive");
        assert_eq!(receipt["file"], *name);
    }
    assert_eq!(sha256(&fx.outbox.join("renamed.mp4")), renamed_hash);
    assert!(
        !fx.outbox.join("renamed.mp4.part").exists(),
        "the .part name is never taken"
    );
    // Ignored files untouched, never jobs.
    assert!(fx.watch.join(".hidden.mp4").exists());
    assert!(fx.watch.join("tiny.mp4").exists());
    let rows = fx.status();
    assert_eq!(rows.len(), expected, "no job for ignored files: {rows:?}");
}

#[test]
fn a_file_appended_in_bursts_is_taken_only_when_complete() {
    let fx = Fixture::with_config("stable_for: 1500ms", "", "");
    let daemon = fx.start();
    let path = fx.watch.join("growing.mp4");
    let mut file = fs::File::create(&path).unwrap();
    use std::io::Write;
    // Bursts with pauses shorter than stable_for: the daemon must not take it.
    for burst in 0..6u8 {
        file.write_all(&vec![burst; 100_000]).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            fx.status().is_empty(),
            "taken during burst {burst} while still growing"
        );
    }
    drop(file);
    let final_hash = sha256(&path);
    wait_for("the file delivered", Duration::from_secs(20), || {
        let rows = fx.status();
        (common::in_state(&rows, "done").len() == 1).then_some(())
    });
    assert_eq!(sha256(&fx.outbox.join("growing.mp4")), final_hash);
    assert_eq!(
        fs::metadata(fx.outbox.join("growing.mp4")).unwrap().len(),
        600_000
    );
    assert!(daemon.log().contains("new job"), "{}", daemon.log());
    assert_eq!(fx.status().len(), 1, "exactly one job");
}

#[test]
fn poll_mode_delivers_without_events() {
    let fx = Fixture::with_config("mode: poll\npoll_every: 200ms", "", "");
    let _daemon = fx.start();
    write_random(&fx.watch.join("a/b.mp4"), 300_000, 5);
    let hash = sha256(&fx.watch.join("a/b.mp4"));
    wait_for("poll mode delivery", Duration::from_secs(20), || {
        let rows = fx.status();
        (common::in_state(&rows, "done").len() == 1).then_some(())
    });
    assert_eq!(sha256(&fx.outbox.join("a/b.mp4")), hash);
}
