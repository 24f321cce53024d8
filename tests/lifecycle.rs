//! One owner for a job's life: the paths that used to lose an error, a
//! file or a report, each driven through the real binary (with failpoints
//! where a step must be stopped or an odd filesystem imitated).

mod common;

use std::fs;
use std::time::Duration;

use common::providers::{
    GENEROUS_RETRY, MIB, apivideo_provider, gcore_provider, id_of, wait_done, wait_failed,
};
use common::sandbox::{Sandbox, tus_provider};
use common::{Fixture, read_json, sha256, wait_for, write_random};

/// The file `name`'s row in `status`, once `check` holds for it.
fn wait_row(
    fx: &Fixture,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(&format!("{name}: {what}"), Duration::from_secs(60), || {
        fx.status()
            .into_iter()
            .find(|row| row["file"] == name && check(row))
    })
}

/// SPEC §3.5: a file overwritten while its Gcore upload waits for `ready`
/// is uploaded again as new; the abandoned video is deleted, and the
/// receipt in done/ describes the bytes that are in done/.
#[test]
fn a_file_changed_while_finalizing_is_delivered_as_its_new_version() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("chunk_size: 1MiB, wait_until: ready, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", r#"{ title: "{stem}" }"#);
    let path = fx.watch.join("clip.mp4");
    write_random(&path, 3 * MIB, 1);
    let daemon = fx.start();
    wait_row(&fx, "clip.mp4", "finalizing", |r| {
        r["state"] == "finalizing"
    });
    write_random(&path, 2 * MIB, 2);
    let new_hash = sha256(&path);

    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    let rows = fx.status();
    assert!(
        rows.iter().any(|r| r["state"] == "superseded"),
        "the first job was superseded: {rows:?}"
    );
    assert_eq!(sha256(&fx.done.join("clip.mp4")), new_hash);
    let receipt = fx.receipt("clip.mp4");
    assert_eq!(receipt["sha256"], new_hash.as_str(), "{receipt}");
    assert_eq!(receipt["bytes"], 2 * MIB, "{receipt}");
    let live: Vec<_> = sandbox
        .records_where("gcore", "name", "clip")
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .collect();
    assert_eq!(live.len(), 1, "one live video, the new version: {live:?}");
    assert_eq!(
        id_of(&live[0], "id"),
        receipt["remote_id"].as_str().unwrap_or("")
    );
    let upload = live[0]["upload"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        sha256(&sandbox.bin(&upload)),
        new_hash,
        "the video holds the new bytes"
    );
}

/// A server's absurd `Retry-After` used to overflow a duration and kill
/// the job's task silently (`1e30`), or make it wait an hour although
/// `max_backoff` is 200 ms (`99999999999`): now every server-given wait is
/// clamped to `max_backoff` and the file is delivered.
#[test]
fn an_absurd_retry_after_is_clamped_not_fatal() {
    absurd_retry_after("1e30");
}

#[test]
fn a_huge_retry_after_waits_max_backoff_not_an_hour() {
    absurd_retry_after("99999999999");
}

fn absurd_retry_after(value: &str) {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--rate-limit-every", "3", "--retry-after", value],
    );
    fx.write_tus_config(
        &sandbox.endpoint(),
        &format!("chunk_size: 1MiB, {GENEROUS_RETRY}"),
    );
    write_random(&fx.watch.join("a.mp4"), 3 * MIB, 3);
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    assert!(sandbox.stats().rate_limited > 0, "the 429s were sent");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

/// A panic inside a job's task is caught: logged with the job id, recorded
/// on the job (so `status` shows it), and the job is tried again.
#[test]
fn a_panic_inside_a_job_is_caught_recorded_and_retried() {
    let fx = Fixture::new();
    write_random(&fx.watch.join("a.mp4"), 1024, 4);
    let daemon = fx.start_with_failpoints("job::attempt=1*panic(injected)");
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("job task failed")
            && l.contains("job=1")
            && l.contains("injected")),
        "{log}"
    );
    assert_eq!(fx.receipt_count("a.mp4"), 1);
}

/// A 502 to a create call can come after the service made the video: the
/// job looks for its tagged video (api.video) instead of creating another.
#[test]
fn a_gateway_error_on_create_is_a_lost_answer_not_a_refusal() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--gateway-rate", "0.5", "--seed", "11"],
    );
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", r#"{ title: "{stem}" }"#);
    let names: Vec<String> = (1..=10).map(|n| format!("g{n}.mp4")).collect();
    for (n, name) in names.iter().enumerate() {
        write_random(&fx.watch.join(name), MIB, 20 + n as u64);
    }
    let daemon = fx.start();
    wait_done(&fx, &daemon, names.len(), Duration::from_secs(90));
    assert!(sandbox.stats().gateway_errors > 0, "502s were sent");
    for name in &names {
        let stem = name.trim_end_matches(".mp4");
        let videos: Vec<_> = sandbox
            .records_where("apivideo", "title", stem)
            .into_iter()
            .filter(|v| v["deleted"] != true)
            .collect();
        assert_eq!(videos.len(), 1, "one video for {name}: {videos:?}");
        assert_eq!(videos[0]["complete"], true, "{name}: {videos:?}");
    }
}

/// SPEC §3.6: nothing a user may need is overwritten. With `after_success:
/// leave`, a second version of a file gets a second receipt beside the
/// first; two failures of a vanished file get two reports.
#[test]
fn receipts_and_reports_are_never_written_over() {
    let fx = Fixture::with_config("after_success: leave", "", "");
    let path = fx.watch.join("clip.mp4");
    write_random(&path, 4096, 5);
    let first = sha256(&path);
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    write_random(&path, 8192, 6);
    let second = sha256(&path);
    wait_done(&fx, &daemon, 2, Duration::from_secs(30));
    let hashes: Vec<String> = ["clip.mp4.receipt.json", "clip.mp4.receipt-1.json"]
        .iter()
        .map(|name| {
            read_json(&fx.done.join(name))["sha256"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        hashes,
        vec![first, second],
        "{:?}",
        Fixture::files_in(&fx.done)
    );
}

/// A permanent failure gives up the remote upload: the tus upload is
/// terminated, and a folder destination keeps no partial file.
#[test]
fn a_permanent_failure_abandons_the_remote_upload() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "4MiB"]);
    let tus = tus_provider("t", &sandbox.endpoint(), "chunk_size: 1MiB");
    fx.write_config_parts(common::ConfigParts {
        providers: &tus,
        rules: Some("- match: { glob: \"t/**\" }\n  provider: t\n- match: {}\n  provider: archive"),
        archive: "chunk_size: 256KiB",
        ..common::ConfigParts::default()
    });
    write_random(&fx.watch.join("t/gone.mp4"), 16 * MIB, 7);
    write_random(&fx.watch.join("gone.mp4"), 64 * MIB, 8);
    let daemon = fx.start();
    sandbox.wait_for_upload("gone.mp4", "bytes arriving", Duration::from_secs(30), |u| {
        u.bytes_received > 0
    });
    fx.wait_for_bytes("gone.mp4", 1, Duration::from_secs(30));
    fs::remove_file(fx.watch.join("t/gone.mp4")).unwrap();
    fs::remove_file(fx.watch.join("gone.mp4")).unwrap();
    let failed = wait_failed(&fx, 2, Duration::from_secs(60));
    assert_eq!(failed.len(), 2, "{failed:?}");
    drop(daemon);
    let uploads = sandbox.uploads_named("gone.mp4");
    assert!(
        uploads.iter().all(|u| u.terminated),
        "the tus upload was terminated: {uploads:?}"
    );
    assert!(
        !fx.outbox.join(".hotfolder-partial").exists() || fx.partial_leftovers().is_empty(),
        "{:?}",
        fx.partial_leftovers()
    );
    assert_eq!(Fixture::files_in(&fx.outbox), Vec::<String>::new());
}

/// A NAS archive is the user's folder: once jobs are done, the destination
/// holds the delivered files and nothing of ours.
#[test]
fn a_folder_destination_holds_only_the_delivered_files() {
    let fx = Fixture::new();
    write_random(&fx.watch.join("a.mp4"), 4096, 9);
    write_random(&fx.watch.join("sub/b.mp4"), 3 * MIB, 10);
    let daemon = fx.start();
    wait_done(&fx, &daemon, 2, Duration::from_secs(30));
    let mut all: Vec<String> = fs::read_dir(&fx.outbox)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    all.sort();
    assert_eq!(all, vec!["a.mp4", "sub"], "nothing else in the destination");
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["a.mp4", "sub/b.mp4"]);
}

/// `retry` queues the job before the file moves back, so a watch with a
/// short `stable_for` (here given 1.5 s between the move and the record)
/// never makes a second job for it.
#[test]
fn a_retried_file_is_never_taken_as_a_new_one() {
    let fx = Fixture::new();
    fs::write(fx.watch.join("clip.json"), b"{ not json").unwrap();
    write_random(&fx.watch.join("clip.mp4"), 4096, 11);
    let daemon = fx.start_with_failpoints("retry::after_move=sleep(1500)");
    wait_failed(&fx, 1, Duration::from_secs(30));
    let sidecar = fx.failed.join("clip.json");
    fs::write(&sidecar, br#"{ "title": "fixed" }"#).unwrap();
    let out = fx.hotfolder(&["retry", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    let rows = fx.status();
    assert_eq!(rows.len(), 1, "one job only: {rows:?}");
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["clip.mp4"]);
    assert_eq!(fx.receipt_count("clip.mp4"), 1);
}

/// On a mount with neither `RENAME_NOREPLACE` nor hard links (imitated by
/// failpoints), delivery and filing fall back instead of retrying forever,
/// and still never overwrite.
#[test]
fn filing_works_without_exclusive_rename_or_hard_links() {
    let fx = Fixture::new();
    fs::create_dir_all(&fx.done).unwrap();
    fs::write(fx.done.join("a.mp4"), b"already here").unwrap();
    fs::create_dir_all(&fx.outbox).unwrap();
    fs::write(fx.outbox.join("a.mp4"), b"already here too").unwrap();
    write_random(&fx.watch.join("a.mp4"), 4096, 12);
    let hash = sha256(&fx.watch.join("a.mp4"));
    let daemon = fx.start_with_failpoints("fsx::no_renameat2=return;fsx::no_hard_links=return");
    wait_done(&fx, &daemon, 1, Duration::from_secs(30));
    assert_eq!(fs::read(fx.done.join("a.mp4")).unwrap(), b"already here");
    assert_eq!(sha256(&fx.done.join("a-1.mp4")), hash);
    assert_eq!(
        fs::read(fx.outbox.join("a.mp4")).unwrap(),
        b"already here too"
    );
    assert_eq!(sha256(&fx.outbox.join("a-1.mp4")), hash);
    assert!(
        daemon.log().contains("no exclusive rename"),
        "{}",
        daemon.log()
    );
}

/// A create that could not even connect made nothing: the next attempt
/// does not name a possible orphan (every retry of an unreachable server
/// used to add one to the log and the report).
#[test]
fn a_create_that_never_connected_names_no_orphan() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/files/", closed.local_addr().unwrap());
    drop(closed);
    let fx = Fixture::with_tus(
        &endpoint,
        "retry: { max_attempts: 3, initial_backoff: 10ms, max_backoff: 20ms }",
    );
    write_random(&fx.watch.join("a.mp4"), 4096, 13);
    let daemon = fx.start();
    wait_failed(&fx, 1, Duration::from_secs(30));
    let report = fx.error_report("a.mp4");
    assert_eq!(report["attempts"], 3, "{report}");
    assert_eq!(report["replaced"], serde_json::json!([]), "{report}");
    assert!(
        !daemon.log().contains("interrupted create"),
        "{}",
        daemon.log()
    );
}
