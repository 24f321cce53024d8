//! Pause and resume (issue 15): through the command line, the HTTP API and
//! the store when no daemon runs. A paused scope takes no new upload while
//! its files keep being found and queued, an upload in flight stops after
//! its chunk (acknowledged and recorded, nothing half-sent), the pause
//! survives a restart, and resuming delivers everything once.

mod common;

use std::time::Duration;

use common::sandbox::{Sandbox, http};
use common::{ConfigParts, Fixture, free_address, in_state, succeeded, wait_for, write_random};

const MIB: u64 = 1 << 20;

/// A job of `file` exists and its daemon logged that a pause holds it.
fn wait_until_held(fx: &Fixture, daemon: &common::Daemon, file: &str) {
    wait_for(
        &format!("{file} queued and held by the pause"),
        Duration::from_secs(30),
        || {
            let queued = fx
                .status()
                .iter()
                .any(|r| r["file"] == file && r["state"] == "queued");
            (queued && daemon.log().contains("paused; waiting to be resumed")).then_some(())
        },
    );
}

#[test]
fn a_paused_provider_queues_its_files_and_resume_delivers_them() {
    let fx = Fixture::new();
    let daemon = fx.start();
    let said = succeeded(&fx.hotfolder(&["pause", "--provider", "archive"]));
    assert!(said.contains("paused provider archive"), "{said}");
    write_random(&fx.watch.join("held.mp4"), 300_000, 1);
    wait_until_held(&fx, &daemon, "held.mp4");
    assert!(
        Fixture::files_in(&fx.outbox).is_empty(),
        "nothing delivered while paused"
    );
    let status = succeeded(&fx.hotfolder(&["status"]));
    assert!(status.contains("paused: provider archive"), "{status}");

    let said = succeeded(&fx.hotfolder(&["resume", "--provider", "archive"]));
    assert!(said.contains("resumed provider archive"), "{said}");
    wait_for("held.mp4 done", Duration::from_secs(30), || {
        (in_state(&fx.status(), "done").len() == 1).then_some(())
    });
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["held.mp4"]);
    let row = &fx.status()[0];
    assert_eq!(row["attempts"], 1, "waiting is not an attempt: {row}");
    drop(daemon);
}

#[test]
fn a_pause_made_without_a_daemon_holds_after_its_start_until_the_api_resumes() {
    let address = free_address();
    let fx = Fixture::with_config("", "", &format!("http: {{ listen: \"{address}\" }}"));
    // No daemon runs: the pause goes into the store.
    let said = succeeded(&fx.hotfolder(&["pause", "--watch", "drop"]));
    assert!(said.contains("paused watch drop"), "{said}");
    write_random(&fx.watch.join("early.mp4"), 100_000, 2);
    let daemon = fx.start();
    wait_until_held(&fx, &daemon, "early.mp4");
    assert!(
        daemon
            .log()
            .contains("uploads are paused (kept from before the restart)"),
        "{}",
        daemon.log()
    );
    let (code, body) = http(&address, "GET", "/api/pauses", &[]).expect("pauses");
    assert_eq!((code, body.trim()), (200, r#"[{"watch":"drop"}]"#));
    let (_, metrics) = http(&address, "GET", "/metrics", &[]).expect("metrics");
    assert!(
        metrics.contains(r#"hotfolder_paused{scope="watch",name="drop"} 1"#),
        "{metrics}"
    );

    // A name that is not in the config is refused, naming what is.
    let (code, body) = http(&address, "POST", "/api/resume?watch=dorp", &[]).expect("resume");
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains("no watch named \\\"dorp\\\"") && body.contains("known: drop"),
        "{body}"
    );

    // A misspelled parameter is refused; it does not mean "everything".
    let (code, body) = http(&address, "POST", "/api/pause?provder=archive", &[]).expect("pause");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("provder"), "{body}");
    let (_, body) = http(&address, "GET", "/api/pauses", &[]).expect("pauses");
    assert_eq!(body.trim(), r#"[{"watch":"drop"}]"#);

    let (code, body) = http(&address, "POST", "/api/resume?watch=drop", &[]).expect("resume");
    assert_eq!((code, body.trim()), (200, "[]"));
    wait_for("early.mp4 done", Duration::from_secs(30), || {
        (in_state(&fx.status(), "done").len() == 1).then_some(())
    });
    drop(daemon);
}

#[test]
fn pausing_everything_stops_an_upload_after_its_chunk_and_resuming_sends_the_rest_once() {
    const SIZE: u64 = 12 * MIB;
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "4MiB"]);
    let fx = Fixture::with_parts(ConfigParts {
        providers: &format!(
            "t: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB }}\n",
            sandbox.endpoint()
        ),
        rules: Some("- match: {}\n  provider: t\n"),
        ..ConfigParts::default()
    });
    let daemon = fx.start();
    write_random(&fx.watch.join("long.mp4"), SIZE, 3);
    fx.wait_for_bytes("long.mp4", MIB, Duration::from_secs(30));
    succeeded(&fx.hotfolder(&["pause"]));
    wait_for(
        "the upload to stop after its chunk",
        Duration::from_secs(30),
        || {
            daemon
                .log()
                .contains("paused after the chunk in flight")
                .then_some(())
        },
    );
    let row = fx
        .status()
        .into_iter()
        .find(|r| r["file"] == "long.mp4")
        .expect("row");
    let acked = row["bytes_acknowledged"].as_u64().expect("acked");
    assert!(acked > 0 && acked < SIZE, "stopped mid-file: {row}");
    assert_eq!(acked % MIB, 0, "stopped at a chunk boundary: {row}");
    let upload = sandbox.upload_named("long.mp4").expect("the tus upload");
    assert_eq!(
        (upload.offset, upload.bytes_received),
        (acked, acked),
        "the server holds exactly what was recorded, nothing half-sent"
    );

    succeeded(&fx.hotfolder(&["resume"]));
    wait_for("long.mp4 done", Duration::from_secs(60), || {
        (in_state(&fx.status(), "done").len() == 1).then_some(())
    });
    let upload = sandbox.upload_named("long.mp4").expect("the tus upload");
    assert_eq!(
        (upload.offset, upload.bytes_received),
        (SIZE, SIZE),
        "one upload, resumed, no byte sent twice"
    );
    drop(daemon);
}

#[test]
fn pause_refuses_a_name_the_config_does_not_have() {
    let fx = Fixture::new();
    let out = fx.hotfolder(&["pause", "--provider", "arcive"]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no provider named \"arcive\"") && said.contains("known: archive"),
        "{said}"
    );
    let out = fx.hotfolder(&["pause", "--provider", "archive", "--watch", "drop"]);
    assert_eq!(out.status.code(), Some(2), "both a provider and a watch");
}

#[test]
fn a_paused_watch_holds_no_slot_that_another_watch_needs() {
    // One upload at a time to the provider: at most two job tasks. Five
    // paused files must not keep the other watch's file waiting.
    let fx = Fixture::with_config("", "max_concurrent: 1", "");
    let text = std::fs::read_to_string(&fx.config).expect("config");
    std::fs::create_dir_all(fx.root.join("other")).expect("other watch");
    std::fs::write(
        &fx.config,
        text.replacen(
            "watches:\n",
            "watches:\n  - name: other\n    path: ./other\n",
            1,
        ),
    )
    .expect("config");
    let daemon = fx.start();
    succeeded(&fx.hotfolder(&["pause", "--watch", "drop"]));
    for n in 0..5 {
        write_random(&fx.watch.join(format!("held{n}.mp4")), 10_000, n);
    }
    wait_for("five jobs queued and held", Duration::from_secs(30), || {
        (in_state(&fx.status(), "queued").len() == 5).then_some(())
    });
    write_random(&fx.root.join("other/free.mp4"), 10_000, 9);
    wait_for(
        "the other watch's file done",
        Duration::from_secs(30),
        || (in_state(&fx.status(), "done").len() == 1).then_some(()),
    );
    assert_eq!(
        in_state(&fx.status(), "queued").len(),
        5,
        "the paused ones still wait"
    );
    succeeded(&fx.hotfolder(&["resume", "--watch", "drop"]));
    wait_for("all six done", Duration::from_secs(30), || {
        (in_state(&fx.status(), "done").len() == 6).then_some(())
    });
    drop(daemon);
}

/// Without a daemon to ask, each `pause` of a fleet writes the database
/// itself: twelve at once, from twelve processes, all hold (none is lost to
/// another's write of the list it read before).
#[test]
fn pauses_written_at_once_by_many_processes_are_all_kept() {
    let pg = common::postgres::Postgres::start();
    let url = pg.database("pauses");
    const MANY: usize = 12;
    let providers: String = (0..MANY)
        .map(|n| format!("p{n}: {{ type: folder, path: ./outbox }}\n"))
        .collect();
    let fx = Fixture::with_parts(ConfigParts {
        top: &format!("store: {{ type: postgres, url: \"{url}\", node: a }}"),
        providers: &providers,
        ..ConfigParts::default()
    });
    let children: Vec<_> = (0..MANY)
        .map(|n| {
            std::process::Command::new(common::bin())
                .args(["pause", "--provider", &format!("p{n}"), "-c"])
                .arg(&fx.config)
                .current_dir(&fx.root)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn pause")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("pause ran");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = succeeded(&fx.hotfolder(&["status"]));
    let line = status
        .lines()
        .find(|l| l.starts_with("paused:"))
        .unwrap_or_default();
    for n in 0..MANY {
        assert!(
            line.contains(&format!("provider p{n}")),
            "p{n} is paused: {line}"
        );
    }
}
