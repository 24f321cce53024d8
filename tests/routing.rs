//! Routing and finishing decisions: duplicates, sidecars, unmatched files,
//! `after_success`, `retry` (through the running daemon and offline), and
//! `check PATH` as a dry run that never shows a secret.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{
    ConfigParts, Daemon, Fixture, chmod, log_lines_with, read_json, sha256, wait_for,
    wait_for_outcome, write_random,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Full scans the daemon finished so far.
fn scans(daemon: &Daemon) -> usize {
    log_lines_with(&daemon.log(), &["full scan done"])
}

/// Wait until the daemon has started and finished a full scan after now.
fn wait_for_fresh_scan(daemon: &Daemon) {
    let before = scans(daemon);
    // One more could have been under way already; the second began after now.
    wait_for("a full rescan", DEADLINE, || {
        (scans(daemon) >= before + 2).then_some(())
    });
}

fn files(dir: &Path) -> Vec<String> {
    Fixture::files_in(dir)
}

#[test]
fn the_same_content_is_not_uploaded_twice() {
    let fx = Fixture::new();
    let _daemon = fx.start();
    write_random(&fx.watch.join("first.mp4"), 300_000, 11);
    let hash = sha256(&fx.watch.join("first.mp4"));
    let rows = wait_for_outcome(&fx, 1, 0);
    let first_id = rows[0]["id"].as_u64().unwrap();

    write_random(&fx.watch.join("second name.mp4"), 300_000, 11);
    let rows = wait_for_outcome(&fx, 2, 0);
    let second = rows
        .iter()
        .find(|r| r["file"] == "second name.mp4")
        .unwrap();
    assert_eq!(second["duplicate_of"], first_id, "{second}");

    assert_eq!(files(&fx.outbox), vec!["first.mp4"], "one copy delivered");
    assert!(
        fx.done.join("second name.mp4").exists(),
        "the duplicate is filed as done"
    );
    assert!(!fx.watch.join("second name.mp4").exists());
    let receipt = read_json(&fx.done.join("second name.mp4.receipt.json"));
    assert_eq!(receipt["duplicate_of"]["job"], first_id, "{receipt}");
    assert_eq!(receipt["sha256"], hash.as_str());
    assert!(
        receipt["duplicate_of"]["remote_id"]
            .as_str()
            .unwrap()
            .ends_with("first.mp4"),
        "{receipt}"
    );
}

#[test]
fn duplicates_upload_sends_the_same_content_again() {
    let fx = Fixture::with_parts(ConfigParts {
        rules: Some("- match: {}\n  provider: archive\n  duplicates: upload"),
        ..Default::default()
    });
    let _daemon = fx.start();
    write_random(&fx.watch.join("first.mp4"), 300_000, 12);
    let hash = sha256(&fx.watch.join("first.mp4"));
    wait_for_outcome(&fx, 1, 0);
    write_random(&fx.watch.join("second.mp4"), 300_000, 12);
    let rows = wait_for_outcome(&fx, 2, 0);
    assert!(rows.iter().all(|r| r["duplicate_of"].is_null()), "{rows:?}");
    assert_eq!(files(&fx.outbox), vec!["first.mp4", "second.mp4"]);
    assert_eq!(sha256(&fx.outbox.join("second.mp4")), hash);
    assert!(read_json(&fx.done.join("second.mp4.receipt.json"))["duplicate_of"].is_null());
}

#[test]
fn a_sidecar_overrides_the_title_and_travels_with_the_filed_video() {
    let fx = Fixture::new();
    // A clip.mp4 filed earlier: the new one is filed as clip-1.mp4, and its
    // sidecar must follow that name, not overwrite or orphan anything.
    fs::create_dir_all(&fx.done).unwrap();
    fs::write(fx.done.join("clip.mp4"), b"an earlier clip").unwrap();
    let daemon = fx.start();
    let sidecar = br#"{"title": "Launch day", "tags": ["promo", "2026"]}"#;
    fs::write(fx.watch.join("clip.json"), sidecar).unwrap();
    wait_for("the daemon to see the sidecar", DEADLINE, || {
        (log_lines_with(&daemon.log(), &["new candidate", "clip.json"]) > 0).then_some(())
    });
    write_random(&fx.watch.join("clip.mp4"), 200_000, 13);
    let hash = sha256(&fx.watch.join("clip.mp4"));
    let rows = wait_for_outcome(&fx, 1, 0);
    assert_eq!(
        rows[0]["file"], "clip.mp4",
        "the sidecar is no job of its own"
    );

    let receipt = read_json(&fx.done.join("clip-1.mp4.receipt.json"));
    assert_eq!(
        receipt["metadata"]["title"], "Launch day",
        "the sidecar beats the rule's {{stem}}"
    );
    assert_eq!(
        receipt["metadata"]["tags"],
        serde_json::json!(["promo", "2026"])
    );
    assert_eq!(sha256(&fx.done.join("clip-1.mp4")), hash);
    assert_eq!(
        fs::read(fx.done.join("clip-1.json")).unwrap(),
        sidecar,
        "the sidecar follows the video's name"
    );
    assert_eq!(
        fs::read(fx.done.join("clip.mp4")).unwrap(),
        b"an earlier clip",
        "nothing overwritten"
    );
    assert_eq!(files(&fx.watch), Vec::<String>::new());
    assert_eq!(
        files(&fx.outbox),
        vec!["clip.mp4"],
        "the sidecar is not delivered as a video"
    );
}

const MP4_ONLY: &str = "- match: { glob: \"*.mp4\" }\n  provider: archive";

/// Many files found ready together in one folder: their folder is listed
/// once for sidecars (not three lookups per file), and each file still
/// gets its own sidecar, whatever its extension, and only its own.
#[test]
fn sidecars_of_a_drop_found_ready_together_are_each_found() {
    const MANY: usize = 64;
    let fx = Fixture::new();
    let staged = fx.root.join("staged");
    for n in 0..MANY {
        write_random(
            &staged.join(format!("v{n:02}.mp4")),
            3000 + n as u64,
            n as u64,
        );
    }
    let sidecars = [
        ("v03", "json", r#"{"title": "three"}"#),
        ("v17", "yaml", "title: seventeen\n"),
        ("v42", "yml", "title: forty-two\n"),
    ];
    for (stem, ext, body) in sidecars {
        fs::write(staged.join(format!("{stem}.{ext}")), body).unwrap();
    }
    let daemon = fx.start();
    fs::rename(&staged, fx.watch.join("drop")).unwrap();
    let rows = wait_for_outcome(&fx, MANY, 0);
    assert_eq!(rows.len(), MANY, "the sidecars are no jobs of their own");
    assert!(
        log_lines_with(&daemon.log(), &["listed for sidecars"]) > 0,
        "the folder was listed once for its files' sidecars"
    );
    drop(daemon);
    for n in 0..MANY {
        let stem = format!("v{n:02}");
        let receipt = read_json(&fx.done.join(format!("drop/{stem}.mp4.receipt.json")));
        let title =
            sidecars
                .iter()
                .find(|(s, _, _)| *s == stem)
                .map_or(stem.clone(), |(_, _, body)| {
                    body.trim_end()
                        .trim_start_matches("title: ")
                        .trim_start_matches(r#"{"title": ""#)
                        .trim_end_matches(r#""}"#)
                        .to_string()
                });
        assert_eq!(receipt["metadata"]["title"], title.as_str(), "{stem}");
    }
    for (stem, ext, body) in sidecars {
        assert_eq!(
            fs::read_to_string(fx.done.join(format!("drop/{stem}.{ext}"))).unwrap(),
            body,
            "{stem}'s sidecar follows it"
        );
    }
}

/// A running daemon with `unmatched: <mode>` and only `*.mp4` routed, a
/// `notes.txt` no rule matches (answered with its mtime) and a `clip.mp4`
/// (random bytes from `seed`) dropped in.
fn unmatched_run(mode: &str, seed: u64) -> (Fixture, Daemon, std::time::SystemTime) {
    let top = format!("unmatched: {mode}");
    let fx = Fixture::with_parts(ConfigParts {
        top: &top,
        rules: Some(MP4_ONLY),
        ..Default::default()
    });
    let daemon = fx.start();
    fs::write(fx.watch.join("notes.txt"), b"not a video").unwrap();
    let mtime = fs::metadata(fx.watch.join("notes.txt"))
        .unwrap()
        .modified()
        .unwrap();
    write_random(&fx.watch.join("clip.mp4"), 100_000, seed);
    (fx, daemon, mtime)
}

#[test]
fn unmatched_fail_files_the_file_with_a_report() {
    let (fx, _daemon, _) = unmatched_run("fail", 14);
    wait_for_outcome(&fx, 1, 1);
    let report = read_json(&fx.failed.join("notes.txt.error.json"));
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("no rule matches notes.txt"), "{reason}");
    assert!(
        reason.contains("unmatched: leave"),
        "says what to do: {reason}"
    );
    assert_eq!(
        fs::read(fx.failed.join("notes.txt")).unwrap(),
        b"not a video"
    );
    assert_eq!(files(&fx.watch), Vec::<String>::new());
    assert_eq!(files(&fx.outbox), vec!["clip.mp4"]);
}

#[test]
fn unmatched_leave_leaves_the_file_and_makes_no_job() {
    let (fx, daemon, mtime) = unmatched_run("leave", 15);
    wait_for_outcome(&fx, 1, 0);
    wait_for("the daemon to leave notes.txt", DEADLINE, || {
        (log_lines_with(
            &daemon.log(),
            &["no rule matches", "left in place", "notes.txt"],
        ) > 0)
            .then_some(())
    });
    wait_for_fresh_scan(&daemon);
    assert_eq!(fx.status().len(), 1, "no job for notes.txt");
    assert_eq!(files(&fx.watch), vec!["notes.txt"]);
    assert_eq!(
        fs::read(fx.watch.join("notes.txt")).unwrap(),
        b"not a video"
    );
    assert_eq!(
        fs::metadata(fx.watch.join("notes.txt"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert!(files(&fx.failed).is_empty());
    assert_eq!(
        log_lines_with(&daemon.log(), &["left in place", "notes.txt"]),
        1,
        "decided once, not at every scan"
    );
}

#[test]
fn after_success_delete_removes_the_source_and_keeps_a_receipt() {
    let fx = Fixture::with_config("after_success: delete", "", "");
    let _daemon = fx.start();
    fs::write(fx.watch.join("clip.json"), br#"{"title": "Gone"}"#).unwrap();
    write_random(&fx.watch.join("clip.mp4"), 150_000, 16);
    let hash = sha256(&fx.watch.join("clip.mp4"));
    wait_for_outcome(&fx, 1, 0);
    assert_eq!(sha256(&fx.outbox.join("clip.mp4")), hash);
    assert_eq!(
        files(&fx.watch),
        Vec::<String>::new(),
        "source and sidecar deleted"
    );
    assert_eq!(
        files(&fx.done),
        vec!["clip.mp4.receipt.json"],
        "only the receipt is kept"
    );
    let receipt = read_json(&fx.done.join("clip.mp4.receipt.json"));
    assert_eq!(receipt["sha256"], hash.as_str());
    assert_eq!(receipt["metadata"]["title"], "Gone");
}

#[test]
fn after_success_leave_keeps_the_source_and_never_delivers_it_again() {
    let fx = Fixture::with_config("after_success: leave", "", "");
    let mut daemon = fx.start();
    write_random(&fx.watch.join("clip.mp4"), 150_000, 17);
    let hash = sha256(&fx.watch.join("clip.mp4"));
    wait_for_outcome(&fx, 1, 0);
    assert_eq!(sha256(&fx.watch.join("clip.mp4")), hash, "the source stays");
    assert_eq!(
        files(&fx.done),
        vec!["clip.mp4.receipt.json"],
        "the receipt still goes to done/"
    );
    assert_eq!(
        read_json(&fx.done.join("clip.mp4.receipt.json"))["sha256"],
        hash.as_str()
    );

    // A periodic rescan sees it again: not taken again.
    wait_for_fresh_scan(&daemon);
    assert_eq!(fx.status().len(), 1);

    // Nor after a restart, when the in-memory view is gone.
    let (status, _) = daemon.terminate(DEADLINE);
    assert!(status.success());
    let daemon = fx.start();
    wait_for(
        "the restarted daemon to recognise clip.mp4",
        DEADLINE,
        || (log_lines_with(&daemon.log(), &["already covered", "clip.mp4"]) > 0).then_some(()),
    );
    assert_eq!(fx.status().len(), 1, "one job only");
    assert_eq!(files(&fx.outbox), vec!["clip.mp4"], "delivered once");
    assert_eq!(files(&fx.watch), vec!["clip.mp4"]);
}

/// Drop `clip.mp4` with a sidecar that is not JSON and wait until it failed.
fn fail_with_a_broken_sidecar(fx: &Fixture, daemon: &Daemon) -> (String, u64) {
    fs::write(fx.watch.join("clip.json"), b"{\"title\": ").unwrap();
    wait_for("the daemon to see the sidecar", DEADLINE, || {
        (log_lines_with(&daemon.log(), &["new candidate", "clip.json"]) > 0).then_some(())
    });
    write_random(&fx.watch.join("clip.mp4"), 250_000, 18);
    let hash = sha256(&fx.watch.join("clip.mp4"));
    let rows = wait_for_outcome(fx, 0, 1);
    assert!(fx.failed.join("clip.mp4.error.json").exists());
    assert!(fx.failed.join("clip.json").exists());
    (hash, rows[0]["id"].as_u64().unwrap())
}

/// The failed clip.mp4 was delivered by job `id` with the fixed sidecar, and
/// failed/ holds nothing any more.
fn assert_retried_and_delivered(fx: &Fixture, hash: &str, id: u64) {
    let rows = wait_for_outcome(fx, 1, 0);
    assert_eq!(rows[0]["id"], id, "the same job, retried");
    assert_eq!(sha256(&fx.outbox.join("clip.mp4")), hash);
    assert_eq!(
        files(&fx.failed),
        Vec::<String>::new(),
        "file, sidecar and error report left failed/"
    );
    assert_eq!(
        files(&fx.done),
        vec!["clip.json", "clip.mp4", "clip.mp4.receipt.json"]
    );
    assert_eq!(
        read_json(&fx.done.join("clip.mp4.receipt.json"))["metadata"]["title"],
        "Fixed"
    );
}

#[test]
fn retry_through_the_running_daemon_delivers_once_the_cause_is_fixed() {
    let fx = Fixture::new();
    let daemon = fx.start();
    let (hash, id) = fail_with_a_broken_sidecar(&fx, &daemon);
    fs::write(fx.failed.join("clip.json"), br#"{"title": "Fixed"}"#).unwrap();
    let out = fx.hotfolder(&["retry", "--failed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("job {id} queued again")));
    assert_retried_and_delivered(&fx, &hash, id);
}

#[test]
fn retry_while_stopped_is_picked_up_at_start() {
    let fx = Fixture::new();
    let mut daemon = fx.start();
    let (hash, id) = fail_with_a_broken_sidecar(&fx, &daemon);
    let (status, _) = daemon.terminate(DEADLINE);
    assert!(status.success());

    fs::write(fx.failed.join("clip.json"), br#"{"title": "Fixed"}"#).unwrap();
    let out = fx.hotfolder(&["retry", "--failed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("job {id} queued again")));
    // Offline, retry already put the file back and removed the report.
    assert_eq!(files(&fx.watch), vec!["clip.json", "clip.mp4"]);
    assert_eq!(files(&fx.failed), Vec::<String>::new());
    assert_eq!(fx.status()[0]["state"], "queued");

    let _daemon = fx.start();
    assert_retried_and_delivered(&fx, &hash, id);
}

#[test]
fn retry_after_the_destination_is_made_writable() {
    let fx = Fixture::with_parts(ConfigParts {
        providers: "readonly:\n  type: folder\n  path: ./readonly",
        rules: Some("- match: {}\n  provider: readonly"),
        ..Default::default()
    });
    let readonly = fx.root.join("readonly");
    fs::create_dir(&readonly).unwrap();
    let _daemon = fx.start_unprivileged();
    chmod(&readonly, 0o555);
    write_random(&fx.watch.join("clip.mp4"), 200_000, 19);
    let hash = sha256(&fx.watch.join("clip.mp4"));
    let id = wait_for_outcome(&fx, 0, 1)[0]["id"].as_u64().unwrap();
    assert!(fx.failed.join("clip.mp4.error.json").exists());

    chmod(&readonly, 0o777);
    let out = fx.hotfolder(&["retry", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = wait_for_outcome(&fx, 1, 0);
    assert_eq!(rows[0]["id"], id);
    assert_eq!(sha256(&readonly.join("clip.mp4")), hash);
    assert_eq!(
        files(&fx.failed),
        Vec::<String>::new(),
        "error report removed"
    );
    assert!(fx.done.join("clip.mp4.receipt.json").exists());
}

#[test]
fn check_explains_a_path_and_never_shows_a_secret() {
    let fx = Fixture::with_parts(ConfigParts {
        providers: "tusd:\n  type: tus\n  endpoint: http://127.0.0.1:9/files/\n  headers: { Authorization: \"Bearer s3cr3t-token\" }",
        rules: Some(
            "- match: { glob: \"promo/**\" }\n  provider: tusd\n  metadata: { title: \"Promo {stem}\" }\n\
             - match: {}\n  provider: archive\n  metadata: { title: \"{stem}\" }",
        ),
        ..Default::default()
    });
    write_random(&fx.watch.join("promo/launch.mp4"), 1000, 20);
    write_random(&fx.watch.join("other.mp4"), 1000, 21);
    let promo = fx.watch.join("promo/launch.mp4");
    let other = fx.watch.join("other.mp4");
    let out = fx.hotfolder(&["check", promo.to_str().unwrap(), other.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let explain = |path: &Path| {
        let start = stdout
            .find(&format!("{}\n  watch:", path.display()))
            .unwrap_or_else(|| panic!("no explanation for {}: {stdout}", path.display()));
        stdout[start..]
            .lines()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let promo_text = explain(&promo);
    assert!(promo_text.contains("watch: drop"), "{promo_text}");
    assert!(promo_text.contains("rule: 0"), "{promo_text}");
    assert!(promo_text.contains("provider: tusd"), "{promo_text}");
    assert!(promo_text.contains("Promo launch"), "{promo_text}");
    let other_text = explain(&other);
    assert!(other_text.contains("rule: 1"), "{other_text}");
    assert!(other_text.contains("provider: archive"), "{other_text}");
    assert!(stdout.contains("***"), "the secret shows masked: {stdout}");
    assert!(
        !stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"),
        "secret leaked: {stdout}{stderr}"
    );

    // Outside every watch: said so, exit 2; the secret still never shows.
    let outside = fx.root.join("elsewhere.mp4");
    fs::write(&outside, b"x").unwrap();
    let out = fx.hotfolder(&["check", outside.to_str().unwrap()]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains(&format!(
            "{}: is not inside any watch folder",
            outside.display()
        )),
        "{all}"
    );
    assert!(!all.contains("s3cr3t"), "{all}");
}
