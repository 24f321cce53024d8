//! An operator's first hour (issue 12): every answer the product gives about
//! what it does is true. `check` runs the daemon's own decision, skipped
//! input is said once and counted, byte counters move while bytes move,
//! files the daemon moves itself are not reported as vanished, identical
//! content dropped at once is uploaded once, and hints name commands and
//! paths as they are now.

mod common;

use std::os::unix::fs::symlink;
use std::time::Duration;

use common::sandbox::{Sandbox, http};
use common::{
    ConfigParts, Fixture, free_address, log_lines_with, wait_for, wait_for_outcome, write_random,
};

/// `/metrics` of a daemon listening on `address`, as text.
fn scrape(address: &str) -> String {
    let (status, text) = http(address, "GET", "/metrics", &[]).expect("HTTP answer");
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of the first sample of `name` whose labels contain `labels`.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The files of the drop folder that the daemon must never take, each
/// with the words `check` must use to say why.
fn plant_untaken(fx: &Fixture) -> Vec<(std::path::PathBuf, &'static str)> {
    let w = &fx.watch;
    std::fs::write(w.join("clip.mp4.part"), b"still copying").unwrap();
    std::fs::write(w.join(".hidden.mp4"), b"hidden").unwrap();
    std::fs::write(w.join("empty.mp4"), b"").unwrap();
    write_random(&w.join("side.mp4"), 2048, 7);
    std::fs::write(w.join("side.json"), br#"{"title": "t"}"#).unwrap();
    std::fs::create_dir_all(w.join(".cache")).unwrap();
    std::fs::write(w.join(".cache/x.mp4"), b"cached").unwrap();
    std::fs::write(w.join("tiny.mp4"), b"abc").unwrap();
    symlink(w.join("side.mp4"), w.join("link.mp4")).unwrap();
    vec![
        (w.join("clip.mp4.part"), "ignore: \"*.part\""),
        (w.join(".hidden.mp4"), "ignore: \".*\""),
        (w.join("empty.mp4"), "zero bytes"),
        (w.join("side.json"), "sidecar of side.mp4"),
        (w.join(".cache/x.mp4"), "ignore: \".*\""),
        (w.join("tiny.mp4"), "min_size"),
        (w.join("link.mp4"), "symbolic link"),
        (w.clone(), "is the watch folder"),
    ]
}

#[test]
fn check_runs_the_daemons_decision_and_says_why_not() {
    let fx = Fixture::with_config("min_size: 1KiB", "", "");
    let untaken = plant_untaken(&fx);
    write_random(&fx.watch.join("good.mp4"), 4096, 1);

    let taken = fx.hotfolder(&["check", fx.watch.join("good.mp4").to_str().unwrap()]);
    let out = String::from_utf8_lossy(&taken.stdout);
    assert!(taken.status.success(), "{out}");
    assert!(out.contains("provider: archive"), "{out}");

    for (path, why) in &untaken {
        let answer = fx.hotfolder(&["check", path.to_str().unwrap()]);
        let out = String::from_utf8_lossy(&answer.stdout);
        let tail = out.rsplit("\n\n").next().unwrap_or(&out).to_string();
        assert_eq!(answer.status.code(), Some(2), "{}: {out}", path.display());
        assert!(
            tail.contains("not taken") && tail.contains(why),
            "{} must be 'not taken' because of {why}: {tail}",
            path.display()
        );
        assert!(!tail.contains("provider: archive"), "{tail}");
    }
}

#[test]
fn skipped_input_is_logged_once_and_counted_by_reason() {
    let address = free_address();
    let fx = Fixture::with_config(
        "min_size: 1KiB",
        "",
        &format!("http: {{ listen: \"{address}\" }}"),
    );
    plant_untaken(&fx);
    write_random(&fx.watch.join("good.mp4"), 4096, 1);
    let daemon = fx.start();
    wait_for_outcome(&fx, 2, 0);
    // Two full scans later (rescan_every: 2s) nothing is said twice.
    let scans = |text: &str| sample(text, "hotfolder_scans_total", "").unwrap_or(0.0);
    let first = scans(&scrape(&address));
    wait_for("two more full scans", Duration::from_secs(10), || {
        (scans(&scrape(&address)) >= first + 2.0).then_some(())
    });
    let log = daemon.log();
    for (file, reason) in [
        ("clip.mp4.part", "ignored"),
        (".hidden.mp4", "ignored"),
        ("empty.mp4", "empty"),
        ("tiny.mp4", "below_min_size"),
        ("link.mp4", "symlink"),
    ] {
        assert_eq!(
            log_lines_with(&log, &["not taken", file, reason]),
            1,
            "{file} is said once, at info, with its reason {reason}:\n{log}"
        );
    }
    let text = scrape(&address);
    for (reason, count) in [
        ("ignored", 3.0),
        ("empty", 1.0),
        ("below_min_size", 1.0),
        ("symlink", 1.0),
    ] {
        assert_eq!(
            sample(
                &text,
                "hotfolder_files_skipped_total",
                &format!("reason=\"{reason}\"")
            ),
            Some(count),
            "skipped {reason}:\n{text}"
        );
    }
    assert!(
        text.contains("# TYPE hotfolder_files_skipped_total counter"),
        "{text}"
    );
}

/// A fixture delivering `big*` files to a slow tus sandbox (`slow`) and
/// everything else to the folder provider, with the HTTP API on.
fn slow_tus_fixture(sandbox: &Sandbox, address: &str) -> Fixture {
    let fx = Fixture::with_config("", "", &format!("http: {{ listen: \"{address}\" }}"));
    fx.write_config_parts(ConfigParts {
        top: &format!("http: {{ listen: \"{address}\" }}"),
        providers: &format!(
            "slow: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB }}\n",
            sandbox.endpoint()
        ),
        rules: Some(
            "- match: { glob: \"big*\" }\n  provider: slow\n- match: {}\n  provider: archive\n",
        ),
        ..ConfigParts::default()
    });
    fx
}

#[test]
fn byte_counters_move_while_an_upload_runs() {
    let address = free_address();
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "2MiB"]);
    let fx = slow_tus_fixture(&sandbox, &address);
    write_random(&fx.watch.join("big.mp4"), 40 << 20, 3);
    let _daemon = fx.start();
    sandbox.wait_for_offset("big.mp4", 6 << 20, Duration::from_secs(30));
    let text = scrape(&address);
    let uploaded = sample(&text, "hotfolder_bytes_uploaded_total", "provider=\"slow\"");
    let read = sample(&text, "hotfolder_source_bytes_read_total", "");
    let rows = fx.status();
    assert!(
        rows.iter().all(|r| r["state"] == "uploading"),
        "the upload is still running: {rows:?}"
    );
    // What the status says is acknowledged, the server has (asked after).
    let acknowledged = rows[0]["bytes_acknowledged"].as_u64();
    let committed = sandbox.upload_named("big.mp4").map(|u| u.offset);
    assert!(
        acknowledged.is_some_and(|a| a >= 4 << 20 && Some(a) <= committed),
        "bytes_acknowledged {acknowledged:?} is what the server committed ({committed:?}): {rows:?}"
    );
    assert!(
        uploaded.is_some_and(|b| b >= (4 << 20) as f64),
        "bytes acknowledged so far are counted now: {uploaded:?}\n{text}"
    );
    assert!(
        read.is_some_and(|b| b >= (4 << 20) as f64),
        "bytes read so far are counted now: {read:?}\n{text}"
    );
}

#[test]
fn files_the_daemon_moves_itself_never_vanished() {
    let address = free_address();
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "4MiB"]);
    let fx = slow_tus_fixture(&sandbox, &address);
    // A retry: a broken sidecar fails its job; fixed, the job is retried.
    std::fs::write(fx.watch.join("b.json"), b"{oops").unwrap();
    write_random(&fx.watch.join("b.mp4"), 10_000, 1);
    // A resume: an upload cut by kill -9 goes on after the restart.
    write_random(&fx.watch.join("big.mp4"), 24 << 20, 2);
    let mut first = fx.start();
    sandbox.wait_for_offset("big.mp4", 4 << 20, Duration::from_secs(30));
    wait_for(
        "the broken sidecar's job failed",
        Duration::from_secs(30),
        || (common::in_state(&fx.status(), "failed").len() == 1).then_some(()),
    );
    first.kill9();
    let daemon = fx.start();
    std::fs::write(fx.failed.join("b.json"), br#"{"title": "fixed"}"#).unwrap();
    let retried = fx.hotfolder(&["retry", "--failed"]);
    assert!(retried.status.success(), "{retried:?}");
    wait_for_outcome(&fx, 2, 0);
    // A scan after the last filing would notice a vanished candidate too.
    let scans = |text: &str| sample(text, "hotfolder_scans_total", "").unwrap_or(0.0);
    let before = scans(&scrape(&address));
    wait_for("one more full scan", Duration::from_secs(10), || {
        (scans(&scrape(&address)) > before).then_some(())
    });
    let log = format!("{}{}", first.log(), daemon.log());
    assert_eq!(
        log_lines_with(&log, &["disappeared"]),
        0,
        "files the daemon moved are not 'disappeared':\n{log}"
    );
    let text = scrape(&address);
    assert_eq!(
        sample(&text, "hotfolder_files_vanished_total", "watch=\"drop\""),
        Some(0.0),
        "{text}"
    );
    for family in [
        "hotfolder_files_vanished_total",
        "hotfolder_files_detected_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} counter")),
            "{family} is a counter:\n{text}"
        );
    }
}

#[test]
fn identical_content_dropped_at_once_is_uploaded_once() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "4MiB"]);
    let fx = slow_tus_fixture(&sandbox, &free_address());
    // Written elsewhere and moved in together: both become stable at once.
    let staging = fx.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    write_random(&staging.join("big-a.mp4"), 8 << 20, 5);
    std::fs::copy(staging.join("big-a.mp4"), staging.join("big-b.mp4")).unwrap();
    for name in ["big-a.mp4", "big-b.mp4"] {
        std::fs::rename(staging.join(name), fx.watch.join(name)).unwrap();
    }
    let daemon = fx.start();
    let rows = wait_for_outcome(&fx, 2, 0);
    let receipts: Vec<serde_json::Value> = ["big-a.mp4", "big-b.mp4"]
        .iter()
        .map(|n| common::read_json(&fx.done.join(format!("{n}.receipt.json"))))
        .collect();
    let duplicates = receipts
        .iter()
        .filter(|r| !r["duplicate_of"].is_null())
        .count();
    assert_eq!(
        duplicates,
        1,
        "one upload, one duplicate of it: {receipts:#?}\n{rows:?}\n{}",
        daemon.log()
    );
    let complete = sandbox.uploads().iter().filter(|u| u.complete()).count();
    assert_eq!(complete, 1, "{:?}", sandbox.uploads());
}

#[test]
fn a_waiting_duplicate_uploads_when_the_first_fails() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "2MiB"]);
    let fx = slow_tus_fixture(&sandbox, &free_address());
    let staging = fx.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    write_random(&staging.join("big-a.mp4"), 8 << 20, 6);
    std::fs::copy(staging.join("big-a.mp4"), staging.join("big-b.mp4")).unwrap();
    for name in ["big-a.mp4", "big-b.mp4"] {
        std::fs::rename(staging.join(name), fx.watch.join(name)).unwrap();
    }
    let daemon = fx.start();
    // The one that started uploading loses its file: that job fails, and
    // the one waiting for it uploads the content itself.
    let uploading = wait_for("one upload under way", Duration::from_secs(30), || {
        let rows = fx.status();
        rows.iter()
            .find(|r| r["state"] == "uploading" && r["bytes_acknowledged"].as_u64() > Some(0))
            .and_then(|r| r["file"].as_str().map(str::to_string))
    });
    std::fs::remove_file(fx.watch.join(&uploading)).unwrap();
    let rows = wait_for_outcome(&fx, 1, 1);
    assert_eq!(
        log_lines_with(&daemon.log(), &["the same content", "waiting for it"]),
        1,
        "the second job waited for the first: {}",
        daemon.log()
    );
    let other = if uploading == "big-a.mp4" {
        "big-b.mp4"
    } else {
        "big-a.mp4"
    };
    let receipt = common::read_json(&fx.done.join(format!("{other}.receipt.json")));
    assert!(
        receipt["duplicate_of"].is_null(),
        "{other} was uploaded, not a duplicate of a failed job: {receipt:#}\n{rows:?}\n{}",
        daemon.log()
    );
}

#[test]
fn a_one_shot_upload_needs_only_a_provider_and_a_state_dir() {
    let fx = Fixture::new();
    fx.write_raw_config(
        "state_dir: ./state\nproviders:\n  archive: { type: folder, path: ./outbox }\n",
    );
    std::fs::create_dir_all(&fx.outbox).unwrap();
    let clip = fx.root.join("clip.mp4");
    write_random(&clip, 100_000, 9);
    let out = fx.hotfolder(&["upload", "--provider", "archive", clip.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(common::same_bytes(&clip, &fx.outbox.join("clip.mp4")));
    // The daemon does need a watch, and says so.
    let run = fx.hotfolder(&["run"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("hotfolder.yaml")
            && stderr.contains("watches")
            && stderr.contains("hotfolder upload"),
        "{stderr}"
    );
}

#[test]
fn hints_name_the_command_and_the_paths_as_they_are_now() {
    let fx = Fixture::new();
    std::fs::write(fx.watch.join("badside.json"), b"{oops").unwrap();
    write_random(&fx.watch.join("badside.mp4"), 10_000, 4);
    let daemon = fx.start();
    wait_for_outcome(&fx, 0, 1);
    let report = common::read_json(&fx.failed.join("badside.mp4.error.json"));
    let reason = report["reason"].as_str().unwrap_or_default();
    let moved = fx.failed.join("badside.json");
    assert!(moved.exists());
    assert!(
        reason.contains(&moved.display().to_string())
            && !reason.contains(&fx.watch.join("badside.json").display().to_string()),
        "the reason names the sidecar where it is now: {reason}"
    );
    let rows = fx.status();
    assert!(
        rows[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&moved.display().to_string())),
        "{rows:?}"
    );
    // The hint works as written, from another folder, with the daemon running.
    std::fs::write(&moved, br#"{"title": "fixed"}"#).unwrap();
    let hint = report["retry_with"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(hint.replacen("hotfolder", common::bin(), 1))
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{hint}` works as written: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_outcome(&fx, 1, 0);
    drop(daemon);
}

#[test]
fn uploads_are_private_unless_a_rule_or_sidecar_says_public() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &[]);
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        providers: &common::providers::apivideo_provider("av", &sandbox, ""),
        rules: Some("- match: {}\n  provider: av\n  metadata: { title: \"{stem}\" }\n"),
        ..ConfigParts::default()
    });
    write_random(&fx.watch.join("quiet.mp4"), 10_000, 11);
    write_random(&fx.watch.join("loud.mp4"), 10_000, 12);
    std::fs::write(fx.watch.join("loud.json"), br#"{"public": true}"#).unwrap();
    let check = fx.hotfolder(&[
        "check",
        fx.watch.join("quiet.mp4").to_str().unwrap(),
        fx.watch.join("loud.mp4").to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&check.stdout);
    let tail = out.split("quiet.mp4\n").last().unwrap_or_default();
    let (quiet, loud) = tail.split_once("loud.mp4").unwrap_or_default();
    assert!(quiet.contains("visibility: private"), "{out}");
    assert!(loud.contains("visibility: public"), "{out}");

    let _daemon = fx.start();
    wait_for_outcome(&fx, 2, 0);
    let videos = sandbox.records("apivideo");
    let public_of = |title: &str| {
        videos
            .iter()
            .find(|v| v["title"] == title)
            .map(|v| v["public"].clone())
    };
    assert_eq!(
        public_of("quiet"),
        Some(serde_json::json!(false)),
        "{videos:?}"
    );
    assert_eq!(
        public_of("loud"),
        Some(serde_json::json!(true)),
        "{videos:?}"
    );
}

#[test]
fn the_command_line_says_what_it_does() {
    let run = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .args(args)
            .env_remove("HOTFOLDER_CONFIG")
            .output()
            .expect("run hotfolder")
    };
    // The sandbox reads no config, so it offers no -c.
    let help = run(&["sandbox", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && !text.contains("--config"),
        "{text}"
    );
    assert_eq!(run(&["sandbox", "-c", "x.yaml"]).status.code(), Some(2));
    // `retry` with nothing to retry shows both ways to say what.
    let retry = run(&["retry"]);
    let text = String::from_utf8_lossy(&retry.stderr);
    assert_eq!(retry.status.code(), Some(2), "{text}");
    assert!(
        text.contains("Usage: hotfolder retry") && text.contains("--failed"),
        "{text}"
    );
}

#[test]
fn a_second_daemon_says_why_once_and_logs_carry_no_colour_codes() {
    let fx = Fixture::new();
    let first = fx.start();
    let second = fx.hotfolder(&["run"]);
    let text = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{text}");
    assert!(text.contains("already running"), "{text}");
    assert_eq!(
        text.matches("cannot open the state database").count(),
        1,
        "{text}"
    );
    assert!(!text.contains("Os {"), "no debug-formatted error: {text}");
    let raw = std::fs::read(&first.log).unwrap();
    assert!(
        !raw.contains(&0x1b),
        "a log written to a file has no ANSI codes"
    );

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sandbox.log");
    let mut sandbox = std::process::Command::new(common::bin())
        .args(["sandbox", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the sandbox logs", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|text| text.contains("sandbox listening"))
            .then_some(())
    });
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    let raw = std::fs::read(&log).unwrap();
    assert!(
        !raw.contains(&0x1b),
        "the sandbox's file log has no ANSI codes: {}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn receipts_carry_valid_file_urls_and_emptied_subfolders_go() {
    let fx = Fixture::new();
    std::fs::create_dir_all(fx.watch.join("show/ep 1")).unwrap();
    std::fs::create_dir_all(fx.watch.join("kept-empty")).unwrap();
    std::fs::create_dir_all(fx.watch.join("busy")).unwrap();
    write_random(&fx.watch.join("show/ep 1/take #1 100%.mp4"), 5_000, 1);
    write_random(&fx.watch.join("busy/a.mp4"), 5_000, 2);
    std::fs::write(fx.watch.join("busy/notes.part"), b"still copying").unwrap();
    let _daemon = fx.start();
    wait_for_outcome(&fx, 2, 0);
    let receipt = common::read_json(&fx.done.join("show/ep 1/take #1 100%.mp4.receipt.json"));
    let url = receipt["url"].as_str().unwrap_or_default();
    let expected = format!(
        "file://{}/show/ep%201/take%20%231%20100%25.mp4",
        fx.outbox.canonicalize().unwrap().display()
    );
    assert_eq!(url, expected, "{receipt:#}");
    assert!(
        !fx.watch.join("show").exists(),
        "folders emptied by filing are removed"
    );
    assert!(
        fx.watch.join("kept-empty").exists(),
        "a folder hotfolder did not empty stays"
    );
    assert!(
        fx.watch.join("busy/notes.part").exists(),
        "a folder with files stays"
    );
    assert!(fx.watch.exists());
}

#[test]
fn first_steps_in_the_docs_are_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("config.example.yaml")).unwrap();
    assert!(
        !example.contains("coming"),
        "config.example.yaml promises nothing for later"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("cargo install --path ."),
        "the README says how to install the binary"
    );
}
