//! Hostile input and hostile filesystems (SPEC §4: bad input gets a clear
//! error and loses nothing): zero-byte files, one-shot uploads of absolute
//! paths, symlinked sidecars, planted symlinks at temporary names.

mod common;

use std::fs;
use std::time::Duration;

use common::providers::{wait_done, wait_failed};
use common::{Fixture, sha256, wait_for, write_random};

/// Zero bytes is never a finished video: the file stays in the watch
/// folder, is logged once (not at every rescan), and nothing is delivered;
/// once it has content it is taken like any file.
#[test]
fn a_zero_byte_file_is_left_in_place_and_said_once() {
    let fx = Fixture::new();
    fs::write(fx.watch.join("empty.mp4"), b"").unwrap();
    write_random(&fx.watch.join("a.mp4"), 1024, 1);
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    // Two more rescans (rescan_every: 2s) must not say it again.
    let scans = |log: &str| log.matches("full scan done").count();
    let before = scans(&daemon.log());
    wait_for("two more rescans", Duration::from_secs(10), || {
        (scans(&daemon.log()) >= before + 2).then_some(())
    });
    let log = daemon.log();
    assert_eq!(
        log.matches("not taken: has zero bytes").count(),
        1,
        "said once: {log}"
    );
    assert!(fx.watch.join("empty.mp4").exists(), "left in place");
    assert_eq!(
        Fixture::files_in(&fx.outbox),
        vec!["a.mp4"],
        "nothing empty delivered"
    );
    assert_eq!(fx.status().len(), 1, "no job for the empty file");

    // Once it has content, it is a file like any other.
    write_random(&fx.watch.join("empty.mp4"), 2048, 2);
    wait_done(&fx, &daemon, 2, Duration::from_secs(30));
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["a.mp4", "empty.mp4"]);
}

/// `hotfolder upload --provider <folder> /abs/path/clip.mp4` delivers into
/// the provider's folder under the file's name, and leaves the source be.
#[test]
fn a_one_shot_upload_of_an_absolute_path_lands_in_the_destination() {
    let fx = Fixture::new();
    let elsewhere = fx.root.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let source = elsewhere.join("clip.mp4");
    write_random(&source, 300_000, 3);
    let hash = sha256(&source);
    let path = source.to_str().unwrap();
    let out = fx.hotfolder(&["upload", "--provider", "archive", path]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["clip.mp4"]);
    assert_eq!(sha256(&fx.outbox.join("clip.mp4")), hash);
    assert_eq!(
        Fixture::files_in(&elsewhere),
        vec!["clip.mp4"],
        "nothing beside the source"
    );
    assert_eq!(sha256(&source), hash, "the source is untouched");
}

/// A sidecar that is a symlink (here to a file outside the watched tree)
/// is never read: the job fails with a report naming the sidecar, and the
/// target's content shows nowhere (log, status, report, metadata).
#[test]
fn a_symlinked_sidecar_is_never_read() {
    let fx = Fixture::new();
    let secret = fx.root.join("secret.yaml");
    fs::write(&secret, "title: secret-content-4711\n").unwrap();
    std::os::unix::fs::symlink(&secret, fx.watch.join("clip.yaml")).unwrap();
    write_random(&fx.watch.join("clip.mp4"), 1024, 4);
    let broken = fx.root.join("broken.yaml");
    fs::write(&broken, "secret-content-0815: [unclosed\n").unwrap();
    std::os::unix::fs::symlink(&broken, fx.watch.join("other.yaml")).unwrap();
    write_random(&fx.watch.join("other.mp4"), 1024, 5);
    let daemon = fx.start();
    wait_failed(&fx, 2, Duration::from_secs(30));
    for name in ["clip", "other"] {
        let report = fx.error_report(&format!("{name}.mp4"));
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!("{name}.yaml")) && reason.contains("link"),
            "{report}"
        );
    }
    let status = String::from_utf8_lossy(&fx.hotfolder(&["status", "--json"]).stdout).into_owned();
    let reports: String = Fixture::files_in(&fx.failed)
        .iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| fs::read_to_string(fx.failed.join(f)).unwrap_or_default())
        .collect();
    for text in [daemon.log(), status, reports] {
        assert!(!text.contains("secret-content"), "{text}");
    }
    assert_eq!(
        fs::read_to_string(&secret).unwrap(),
        "title: secret-content-4711\n"
    );
}

/// A sidecar that does not parse is named with the position of the error,
/// and its content is never quoted (it may hold anything).
#[test]
fn a_sidecar_parse_error_names_the_position_not_the_content() {
    let fx = Fixture::new();
    fs::write(
        fx.watch.join("a.json"),
        r#"{"title": ["quoted-content-1234"}"#,
    )
    .unwrap();
    write_random(&fx.watch.join("a.mp4"), 1024, 6);
    fs::write(fx.watch.join("b.yaml"), "- quoted-content-5678\n").unwrap();
    write_random(&fx.watch.join("b.mp4"), 1024, 7);
    let daemon = fx.start();
    wait_failed(&fx, 2, Duration::from_secs(30));
    for (name, sidecar) in [("a.mp4", "a.json"), ("b.mp4", "b.yaml")] {
        let report = fx.error_report(name);
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(sidecar) && reason.contains("line"),
            "{report}"
        );
        assert!(!reason.contains("quoted-content"), "{report}");
    }
    assert!(!daemon.log().contains("quoted-content"), "{}", daemon.log());
}

/// Symlinks planted at the temporary names older versions used (a cross-
/// filesystem copy's `.x.hotfolder-tmp`, a receipt's `.receipt.json.tmp`)
/// are never written through: temporaries are created exclusively, without
/// following links, under random names.
#[test]
fn planted_symlinks_at_temporary_names_are_never_written_through() {
    let other_fs = tempfile::Builder::new()
        .prefix("hotfolder-hostile-")
        .tempdir_in("/dev/shm")
        .expect("a folder on another filesystem");
    let done = other_fs.path().join("done");
    let fx = Fixture::with_config(&format!("done_dir: {}", done.display()), "", "");
    let victim = fx.root.join("victim.txt");
    fs::write(&victim, b"keep me").unwrap();
    fs::create_dir_all(&done).unwrap();
    for planted in [".clip.mp4.hotfolder-tmp", "clip.mp4.receipt.json.tmp"] {
        std::os::unix::fs::symlink(&victim, done.join(planted)).unwrap();
    }
    write_random(&fx.watch.join("clip.mp4"), 200_000, 8);
    let hash = sha256(&fx.watch.join("clip.mp4"));
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(sha256(&done.join("clip.mp4")), hash);
    assert!(done.join("clip.mp4.receipt.json").exists());
}

/// A symbolic link swapped in for the source after the watch saw it stable
/// (here: during a pause at the start of the attempt), pointing at a file of
/// the same size and modification time, is never read: the job fails
/// saying so, and the other file's bytes go nowhere.
#[test]
fn a_source_swapped_for_a_symlink_is_never_read() {
    let fx = Fixture::new();
    let source = fx.watch.join("clip.mp4");
    write_random(&source, 4096, 9);
    let secret = fx.root.join("secret.bin");
    fs::write(&secret, vec![b'S'; 4096]).unwrap();
    let mtime = fs::metadata(&source).unwrap().modified().unwrap();
    fs::File::options()
        .write(true)
        .open(&secret)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let daemon = fx.start_with_failpoints("job::attempt=sleep(1500)");
    wait_for("the job to start", Duration::from_secs(30), || {
        daemon.log().contains("new job").then_some(())
    });
    let moved = fx.root.join("original.mp4");
    fs::rename(&source, &moved).unwrap();
    std::os::unix::fs::symlink(&secret, &source).unwrap();
    let failed = wait_failed(&fx, 1, Duration::from_secs(30));
    let row = &failed[0];
    assert!(
        row["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("symbolic link"),
        "{row}"
    );
    let delivered: Vec<String> = Fixture::files_in(&fx.outbox);
    assert!(delivered.is_empty(), "{delivered:?}");
    drop(daemon);
}

/// `mode: events` whose watcher cannot start (imitated by a failpoint)
/// polls instead, says so once at `warn`, and still finds files dropped
/// after the start (it used to scan once and then never again).
#[test]
fn events_mode_without_events_polls_and_says_so() {
    let fx = Fixture::with_config("mode: events\npoll_every: 300ms", "", "");
    let daemon = fx.start_with_failpoints("watch::no_events=return");
    write_random(&fx.watch.join("late.mp4"), 2048, 10);
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    let log = daemon.log();
    assert_eq!(log.matches("polling instead").count(), 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("polling instead") && l.contains("WARN")),
        "{log}"
    );
}

/// Awkward names: a newline, a 255-byte name, bytes that are not UTF-8.
/// The first two are delivered under their own names with a receipt (a
/// report name that would pass 255 bytes is shortened), `status` answers,
/// and the newline cannot forge a log line; a watched name that is not
/// UTF-8 is left in place with a warning, while `hotfolder upload` of such
/// a file delivers it under its exact bytes. Symlinks in the tree (to a
/// file, to a folder) are never taken.
#[test]
fn awkward_names_are_delivered_and_links_are_left_alone() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let fx = Fixture::new();
    let names: Vec<std::ffi::OsString> = vec![
        "two\nlines.mp4".into(),
        format!("{}.mp4", "x".repeat(251)).into(),
    ];
    for (n, name) in names.iter().enumerate() {
        write_random(&fx.watch.join(name), 1000 + n as u64, 20 + n as u64);
    }
    let latin1 = OsStr::from_bytes(b"latin1-\xe9t\xe9.mp4").to_owned();
    write_random(&fx.watch.join(&latin1), 1000, 29);
    let outside = fx.root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    write_random(&outside.join("inner.mp4"), 1000, 30);
    std::os::unix::fs::symlink(outside.join("inner.mp4"), fx.watch.join("link.mp4")).unwrap();
    std::os::unix::fs::symlink(&outside, fx.watch.join("linked-folder")).unwrap();
    let daemon = fx.start();
    wait_done(&fx, &daemon, names.len(), Duration::from_secs(30));
    let receipts: Vec<String> = Fixture::files_in(&fx.done)
        .into_iter()
        .filter(|f| f.ends_with(".receipt.json"))
        .map(|f| {
            common::read_json(&fx.done.join(f))["file"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    for name in &names {
        assert!(fx.outbox.join(name).exists(), "{name:?} delivered");
        let name = name.to_string_lossy();
        assert_eq!(
            receipts.iter().filter(|f| **f == name).count(),
            1,
            "{name:?} has one receipt: {receipts:?}"
        );
    }
    assert!(
        fs::symlink_metadata(fx.watch.join("link.mp4")).is_ok(),
        "the link is left"
    );
    assert!(
        fx.watch.join(&latin1).exists(),
        "the non-UTF-8 name is left in place"
    );
    assert_eq!(
        fx.status().len(),
        names.len(),
        "no job for a link or the odd name"
    );
    let log = daemon.log();
    assert!(log.contains("not valid UTF-8"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("lines.mp4")),
        "a newline in a name cannot start a forged log line: {log}"
    );
    drop(daemon);

    // One-shot: the exact bytes of the name arrive.
    let source = fx.root.join(&latin1);
    write_random(&source, 1500, 31);
    let out = std::process::Command::new(common::bin())
        .args(["upload", "--provider", "archive"])
        .arg(&source)
        .arg("-c")
        .arg(&fx.config)
        .current_dir(&fx.root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run hotfolder upload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&fx.outbox.join(&latin1)), sha256(&source));
}

/// Another regular file (same size, same modification time) put in the
/// source's place after the watch saw it stable is not uploaded as if it
/// were the same: the inode tells them apart, and the new file is taken as
/// a new version.
#[test]
fn a_source_replaced_by_a_lookalike_is_not_uploaded_as_the_same() {
    let fx = Fixture::new();
    let source = fx.watch.join("clip.mp4");
    write_random(&source, 4096, 40);
    let mtime = fs::metadata(&source).unwrap().modified().unwrap();
    let lookalike = fx.root.join("lookalike.mp4");
    write_random(&lookalike, 4096, 41);
    fs::File::options()
        .write(true)
        .open(&lookalike)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let lookalike_hash = sha256(&lookalike);
    let daemon = fx.start_with_failpoints("job::attempt=1*sleep(1500)");
    wait_for("the job to start", Duration::from_secs(30), || {
        daemon.log().contains("new job").then_some(())
    });
    fs::rename(&lookalike, &source).unwrap();
    let rows = wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    assert!(
        rows.iter().any(|r| r["state"] == "superseded"),
        "the first job was superseded: {rows:?}"
    );
    assert_eq!(fx.receipt("clip.mp4")["sha256"], lookalike_hash.as_str());
    assert_eq!(sha256(&fx.outbox.join("clip.mp4")), lookalike_hash);
}
