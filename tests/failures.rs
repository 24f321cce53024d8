//! Bad input gets a clear error and loses nothing: an unreadable file, a
//! file that vanishes before it is stable, a destination that cannot be
//! written, a sidecar that is not JSON. In every case the other files keep
//! flowing.

mod common;

use std::fs;
use std::time::Duration;

use common::{
    ConfigParts, Fixture, chmod, log_lines_with, read_json, sha256, wait_for, wait_for_outcome,
    write_random,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn row<'a>(rows: &'a [serde_json::Value], file: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["file"] == file)
        .unwrap_or_else(|| panic!("no job for {file}: {rows:?}"))
}

#[test]
fn an_unreadable_file_fails_with_a_report_and_the_others_still_flow() {
    let fx = Fixture::new();
    let _daemon = fx.start_unprivileged();
    // Made unreadable outside the watch folder and renamed in, so the daemon
    // never sees a readable version (and make_world_accessible never sees it).
    let staging = fx.root.join("staging");
    fs::create_dir(&staging).unwrap();
    write_random(&staging.join("locked.mp4"), 150_000, 1);
    let locked_hash = sha256(&staging.join("locked.mp4"));
    chmod(&staging.join("locked.mp4"), 0o000);
    fs::rename(staging.join("locked.mp4"), fx.watch.join("locked.mp4")).unwrap();
    write_random(&fx.watch.join("good.mp4"), 120_000, 2);
    let good_hash = sha256(&fx.watch.join("good.mp4"));

    let rows = wait_for_outcome(&fx, 1, 1);
    assert_eq!(row(&rows, "locked.mp4")["state"], "failed");
    assert_eq!(row(&rows, "good.mp4")["state"], "done");

    // The report names the file and says why.
    let report = read_json(&fx.failed.join("locked.mp4.error.json"));
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("locked.mp4"),
        "reason names the file: {reason}"
    );
    assert!(
        reason.to_lowercase().contains("permission denied"),
        "reason says permission denied: {reason}"
    );
    assert_eq!(report["file"], "locked.mp4");
    assert!(report["attempts"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(
        report["retry_with"],
        format!(
            "hotfolder retry -c {} {}",
            fx.config.canonicalize().unwrap().display(),
            report["job"]
        )
    );
    let last_error = row(&rows, "locked.mp4")["last_error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(last_error.contains("permission denied"), "{last_error}");

    // Nothing lost: the file is in failed/, whole, and was never delivered.
    assert!(
        !fx.watch.join("locked.mp4").exists(),
        "left the watch folder"
    );
    chmod(&fx.failed.join("locked.mp4"), 0o644);
    assert_eq!(sha256(&fx.failed.join("locked.mp4")), locked_hash);
    assert!(!fx.outbox.join("locked.mp4").exists());

    // The good file dropped at the same time was delivered.
    assert_eq!(sha256(&fx.outbox.join("good.mp4")), good_hash);
    assert!(fx.done.join("good.mp4").exists());
    assert!(fx.done.join("good.mp4.receipt.json").exists());
}

#[test]
fn a_file_deleted_before_it_is_stable_is_forgotten_and_the_others_still_flow() {
    let fx = Fixture::with_config("stable_for: 2s", "", "");
    let daemon = fx.start();
    write_random(&fx.watch.join("vanishing.mp4"), 100_000, 3);
    wait_for("the daemon to notice vanishing.mp4", DEADLINE, || {
        (log_lines_with(&daemon.log(), &["new candidate", "vanishing.mp4"]) > 0).then_some(())
    });
    fs::remove_file(fx.watch.join("vanishing.mp4")).unwrap();
    wait_for("the daemon to forget vanishing.mp4", DEADLINE, || {
        (log_lines_with(
            &daemon.log(),
            &["disappeared", "forgotten", "vanishing.mp4"],
        ) > 0)
            .then_some(())
    });

    write_random(&fx.watch.join("good.mp4"), 100_000, 4);
    let good_hash = sha256(&fx.watch.join("good.mp4"));
    let rows = wait_for_outcome(&fx, 1, 0);
    assert_eq!(
        rows[0]["file"], "good.mp4",
        "no job for the vanished file: {rows:?}"
    );
    assert_eq!(sha256(&fx.outbox.join("good.mp4")), good_hash);
    assert!(
        !fx.failed.exists() || Fixture::files_in(&fx.failed).is_empty(),
        "no error report for a vanished file"
    );
}

#[test]
fn an_unwritable_destination_fails_the_job_without_losing_the_file() {
    let fx = Fixture::with_parts(ConfigParts {
        providers: "readonly:\n  type: folder\n  path: ./readonly",
        rules: Some(
            "- match: { glob: \"bad/**\" }\n  provider: readonly\n- match: {}\n  provider: archive",
        ),
        ..Default::default()
    });
    let readonly = fx.root.join("readonly");
    fs::create_dir(&readonly).unwrap();
    // Folders the unprivileged daemon must move files out of exist before it
    // starts, so start_unprivileged opens them up.
    fs::create_dir(fx.watch.join("bad")).unwrap();
    let _daemon = fx.start_unprivileged();
    chmod(&readonly, 0o555);
    write_random(&fx.watch.join("bad/clip.mp4"), 200_000, 5);
    let bad_hash = sha256(&fx.watch.join("bad/clip.mp4"));
    write_random(&fx.watch.join("good.mp4"), 200_000, 6);
    let good_hash = sha256(&fx.watch.join("good.mp4"));

    let rows = wait_for_outcome(&fx, 1, 1);
    assert_eq!(row(&rows, "bad/clip.mp4")["provider"], "readonly");

    let report = read_json(&fx.failed.join("bad/clip.mp4.error.json"));
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains(&readonly.display().to_string()),
        "reason names the destination: {reason}"
    );
    assert!(
        reason.to_lowercase().contains("permission denied"),
        "{reason}"
    );
    assert_eq!(report["provider"], "readonly");

    // Nothing lost, nothing half-written in the read-only folder.
    assert_eq!(sha256(&fx.failed.join("bad/clip.mp4")), bad_hash);
    assert!(!fx.watch.join("bad/clip.mp4").exists());
    assert_eq!(Fixture::files_in(&readonly), Vec::<String>::new());

    // Files routed to the good provider still flow.
    assert_eq!(sha256(&fx.outbox.join("good.mp4")), good_hash);
    assert!(fx.done.join("good.mp4.receipt.json").exists());
}

#[test]
fn a_sidecar_that_is_not_json_fails_the_job_naming_it() {
    let fx = Fixture::new();
    let daemon = fx.start();
    // The sidecar first, as an operator would write it: once its video
    // arrives it must never be taken as a file of its own, even though the
    // daemon already saw it alone.
    let broken = b"{\"title\": \"Launch\", \"tags\": [\"promo\",";
    fs::write(fx.watch.join("clip.json"), broken).unwrap();
    wait_for("the daemon to see the lone sidecar", DEADLINE, || {
        (log_lines_with(&daemon.log(), &["new candidate", "clip.json"]) > 0).then_some(())
    });
    write_random(&fx.watch.join("clip.mp4"), 100_000, 7);
    let clip_hash = sha256(&fx.watch.join("clip.mp4"));
    write_random(&fx.watch.join("other.mp4"), 100_000, 8);

    let rows = wait_for_outcome(&fx, 1, 1);
    assert_eq!(row(&rows, "clip.mp4")["state"], "failed");
    assert_eq!(row(&rows, "other.mp4")["state"], "done");

    let report = read_json(&fx.failed.join("clip.mp4.error.json"));
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("clip.json"),
        "reason names the sidecar: {reason}"
    );
    assert!(reason.contains("JSON"), "{reason}");
    assert!(
        reason.contains("fix or remove it, then retry the job"),
        "reason says what to do: {reason}"
    );

    // Both files in failed/, untouched; none left behind, none delivered.
    assert_eq!(sha256(&fx.failed.join("clip.mp4")), clip_hash);
    assert_eq!(fs::read(fx.failed.join("clip.json")).unwrap(), broken);
    assert_eq!(Fixture::files_in(&fx.watch), Vec::<String>::new());
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["other.mp4".to_string()]);
}
