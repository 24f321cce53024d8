//! The PostgreSQL job store (issue 13, first steps): a private server
//! started by the test (tests/common/postgres.rs), a database per test. A
//! daemon keeps its jobs there, `status` reads them with no daemon running,
//! a kill -9 resumes from the database, and bad store settings are refused
//! with clear words that never show a password.

mod common;

use std::time::Duration;

use common::postgres::Postgres;
use common::sandbox::Sandbox;
use common::{ConfigParts, Fixture, in_state, wait_for, wait_for_outcome, write_random};

/// The top-level config line of a fleet node named `node` with its jobs in
/// `url` (a 2 s lease, so that takeovers come quickly).
fn store_line(url: &str, node: &str) -> String {
    format!("store: {{ type: postgres, url: \"{url}\", node: {node}, lease: 2s }}")
}

/// A fixture whose jobs live in `url`, named `node`.
fn fleet_fixture(url: &str, node: &str) -> Fixture {
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &store_line(url, node),
        ..ConfigParts::default()
    });
    fx
}

#[test]
fn a_daemon_keeps_its_jobs_in_postgres_and_status_reads_them_without_it() {
    let pg = Postgres::start();
    let url = pg.database("deliver");
    let fx = fleet_fixture(&url, "node-a");
    for n in 0..5 {
        write_random(&fx.watch.join(format!("clip-{n}.mp4")), 20_000 + n, n);
    }
    let mut daemon = fx.start();
    wait_for_outcome(&fx, 5, 0);
    daemon.terminate(Duration::from_secs(20));
    // The database holds them; sled was never opened.
    assert_eq!(
        pg.sql(
            "deliver",
            "SELECT count(*) FROM hotfolder_jobs WHERE state = 'done'"
        ),
        "5"
    );
    assert!(
        !fx.state.join("db").exists(),
        "no sled database beside a postgres store"
    );
    let rows = fx.status();
    assert_eq!(in_state(&rows, "done").len(), 5, "{rows:?}");
    // Dropped again, the same content is a duplicate (fingerprints are in
    // the database too).
    std::fs::copy(fx.done.join("clip-0.mp4"), fx.watch.join("again.mp4")).unwrap();
    let _daemon = fx.start();
    let rows = wait_for_outcome(&fx, 6, 0);
    let again = rows
        .iter()
        .find(|r| r["file"] == "again.mp4")
        .expect("a job for again.mp4");
    assert!(again["duplicate_of"].is_u64(), "{again}");
}

#[test]
fn kill_9_mid_upload_resumes_from_the_database() {
    let pg = Postgres::start();
    let (fx, sandbox, _dir) = node_to_a_slow_sandbox(&pg, "resume");
    write_random(&fx.watch.join("big.mp4"), 16 << 20, 7);
    let mut first = fx.start();
    sandbox.wait_for_offset("big.mp4", 5 << 20, Duration::from_secs(30));
    first.kill9();
    let restarted = fx.start();
    wait_for_outcome(&fx, 1, 0);
    let resumed = restarted.resume_offsets();
    assert!(
        resumed.first().is_some_and(|o| *o >= 5 << 20),
        "resumed from the server's offset, not from zero: {resumed:?}\n{}",
        restarted.log()
    );
    let complete: Vec<_> = sandbox
        .uploads()
        .into_iter()
        .filter(|u| u.complete())
        .collect();
    assert_eq!(complete.len(), 1, "one remote upload: {complete:?}");
}

#[test]
fn bad_store_settings_are_refused_clearly() {
    let pg = Postgres::start();
    pg.database("exists");
    let fx = Fixture::new();
    // `status` opens the store like `run` does, and exits.
    let run_with = |store: &str| {
        fx.write_config_parts(ConfigParts {
            top: store,
            ..ConfigParts::default()
        });
        let out = fx.hotfolder(&["status"]);
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // Not a URL: a config error at its line.
    let (code, text) = run_with("store: { type: postgres, url: \"mysql://x\" }");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("hotfolder.yaml:") && text.contains("store.url"),
        "{text}"
    );
    // A role that does not exist, with a password: refused, password unsaid.
    let (code, text) = run_with(&format!(
        "store: {{ type: postgres, url: \"postgres://nobody-here:s3cret-pw@127.0.0.1:{}/exists\" }}",
        pg.port
    ));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot connect"), "{text}");
    assert!(
        !text.contains("s3cret-pw"),
        "the password is never shown: {text}"
    );
    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, text) = run_with(&format!(
        "store: {{ type: postgres, url: \"postgres://hotfolder@127.0.0.1:{closed}/exists\" }}"
    ));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot connect"), "{text}");
    // A schema from a newer hotfolder.
    let url = pg.url("exists");
    let (code, text) = run_with(&format!("store: {{ type: postgres, url: \"{url}\" }}"));
    assert_eq!(code, Some(0), "the first start migrates: {text}");
    pg.sql(
        "exists",
        "INSERT INTO hotfolder_schema (version) VALUES (99)",
    );
    let (code, text) = run_with(&format!("store: {{ type: postgres, url: \"{url}\" }}"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("schema version 99") && text.contains("upgrade"),
        "{text}"
    );
    // Settings of the other store type.
    let (code, text) = run_with("store: { type: sled, node: a }");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("store.node"), "{text}");
}

/// The fixture's config as node `node` with its own state_dir.
fn node_config(fx: &Fixture, node: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&fx.config).expect("config");
    let text = text
        .replace("state_dir: ./state", &format!("state_dir: ./state-{node}"))
        .replace("node: node-a", &format!("node: {node}"));
    let path = fx.root.join(format!("{node}.yaml"));
    std::fs::write(&path, text).expect("write node config");
    path
}

#[test]
fn two_nodes_on_one_folder_deliver_each_file_once() {
    let pg = Postgres::start();
    let url = pg.database("two");
    let fx = fleet_fixture(&url, "node-a");
    let _a = fx.start();
    let _b = fx.start_node(&node_config(&fx, "node-b"), &[]);
    // Written elsewhere and moved in at once: both nodes see every file
    // become stable at the same moment.
    let staging = fx.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    const FILES: u64 = 200;
    for n in 0..FILES {
        write_random(&staging.join(format!("f{n:03}.mp4")), 2_000 + n, n);
    }
    std::fs::rename(&staging, fx.watch.join("batch")).unwrap();
    // Counted by name: a receipt being written shows first under a hidden
    // temporary name.
    common::wait_for(
        "every file and receipt in done/",
        Duration::from_secs(120),
        || {
            let done = Fixture::files_in(&fx.done.join("batch"));
            let receipts = done.iter().filter(|f| f.ends_with(".receipt.json")).count() as u64;
            (receipts >= FILES && done.len() as u64 >= 2 * FILES).then_some(())
        },
    );
    let done = Fixture::files_in(&fx.done.join("batch"));
    let receipts = done.iter().filter(|f| f.ends_with(".receipt.json")).count() as u64;
    assert_eq!(receipts, FILES, "one receipt each: {done:?}");
    assert!(
        done.iter().all(|f| !f.contains("-1.mp4")),
        "no second copy in done/: {done:?}"
    );
    let delivered = Fixture::files_in(&fx.outbox.join("batch"));
    assert_eq!(delivered.len() as u64, FILES, "{delivered:?}");
    assert_eq!(
        pg.sql("two", "SELECT count(*) FROM hotfolder_jobs"),
        FILES.to_string(),
        "one job per file"
    );
    let by_node = pg.sql(
        "two",
        "SELECT count(DISTINCT record->>'node') FROM hotfolder_jobs",
    );
    println!("jobs ran on {by_node} nodes");
}

#[test]
fn a_second_live_node_with_the_same_name_is_refused() {
    let pg = Postgres::start();
    let url = pg.database("names");
    let fx = fleet_fixture(&url, "node-a");
    let mut first = fx.start();
    // Another state_dir, the same node name.
    let twin = node_config(&fx, "node-a");
    let text = std::fs::read_to_string(&twin).unwrap();
    std::fs::write(
        &twin,
        text.replace("state_dir: ./state-node-a", "state_dir: ./state-twin"),
    )
    .unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["run", "-c"])
        .arg(&twin)
        .current_dir(&fx.root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("\"node-a\" is in use by a live node"),
        "{text}"
    );
    // Once the first has stopped, the name is free again.
    first.terminate(Duration::from_secs(20));
    let again = fx.start_node(&twin, &[]);
    drop(again);
}

/// One node (node-a, 2 s lease) with its jobs in database `db`, every
/// file to a tus sandbox throttled to 4 MiB/s; the folder holds the
/// sandbox's data.
fn node_to_a_slow_sandbox(pg: &Postgres, db: &str) -> (Fixture, Sandbox, tempfile::TempDir) {
    let url = pg.database(db);
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "4MiB"]);
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &store_line(&url, "node-a"),
        providers: &format!(
            "t: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB }}\n",
            sandbox.endpoint()
        ),
        rules: Some("- match: {}\n  provider: t\n"),
        ..ConfigParts::default()
    });
    (fx, sandbox, dir)
}

/// Two such nodes (node-a: the fixture's config; node-b: its own).
fn two_nodes_to_a_slow_sandbox(
    pg: &Postgres,
    db: &str,
) -> (
    Fixture,
    Sandbox,
    common::Daemon,
    common::Daemon,
    tempfile::TempDir,
) {
    let (fx, sandbox, dir) = node_to_a_slow_sandbox(pg, db);
    let a = fx.start();
    let b = fx.start_node(&node_config(&fx, "node-b"), &[]);
    (fx, sandbox, a, b, dir)
}

#[test]
fn a_dead_nodes_upload_is_taken_over_and_resumed() {
    let pg = Postgres::start();
    let (fx, sandbox, mut a, mut b, _dir) = two_nodes_to_a_slow_sandbox(&pg, "takeover");
    write_random(&fx.watch.join("big.mp4"), 20 << 20, 9);
    sandbox.wait_for_offset("big.mp4", 5 << 20, Duration::from_secs(30));
    let holder = pg.sql("takeover", "SELECT holder FROM hotfolder_jobs");
    let (dead, survivor) = if holder == "node-a" {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    dead.kill9();
    let committed = sandbox.upload_named("big.mp4").map_or(0, |u| u.offset);
    pg.wait_for_answer(
        "takeover",
        "SELECT state FROM hotfolder_jobs",
        "done",
        Duration::from_secs(60),
    );
    let log = survivor.log();
    assert!(log.contains("taking over a job"), "{log}");
    let resumed = survivor.resume_offsets();
    assert!(
        resumed
            .first()
            .is_some_and(|o| *o >= committed.saturating_sub(2 << 20)),
        "resumed near the server's offset {committed}: {resumed:?}\n{log}"
    );
    let complete: Vec<_> = sandbox
        .uploads()
        .into_iter()
        .filter(|u| u.complete())
        .collect();
    assert_eq!(complete.len(), 1, "one remote upload: {complete:?}");
    assert!(fx.done.join("big.mp4").exists());
    assert_eq!(
        Fixture::files_in(&fx.done).len(),
        2,
        "the file and its receipt"
    );
}

#[test]
fn a_frozen_node_taken_over_writes_nothing_when_it_wakes() {
    let pg = Postgres::start();
    let (fx, sandbox, a, b, _dir) = two_nodes_to_a_slow_sandbox(&pg, "frozen");
    write_random(&fx.watch.join("big.mp4"), 20 << 20, 10);
    sandbox.wait_for_offset("big.mp4", 5 << 20, Duration::from_secs(30));
    let holder = pg.sql("frozen", "SELECT holder FROM hotfolder_jobs");
    let (frozen, other) = if holder == "node-a" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    frozen.signal(libc::SIGSTOP);
    pg.wait_for_answer(
        "frozen",
        "SELECT state FROM hotfolder_jobs",
        "done",
        Duration::from_secs(60),
    );
    assert!(other.log().contains("taking over a job"), "{}", other.log());
    frozen.signal(libc::SIGCONT);
    common::wait_for("the woken node to notice", Duration::from_secs(30), || {
        frozen
            .log()
            .contains("another node took this job over")
            .then_some(())
    });
    let complete: Vec<_> = sandbox
        .uploads()
        .into_iter()
        .filter(|u| u.complete())
        .collect();
    assert_eq!(complete.len(), 1, "one remote upload: {complete:?}");
    let done = Fixture::files_in(&fx.done);
    assert_eq!(
        done,
        vec!["big.mp4".to_string(), "big.mp4.receipt.json".to_string()]
    );
    assert_eq!(pg.sql("frozen", "SELECT state FROM hotfolder_jobs"), "done");
}

#[test]
fn postgres_away_for_ten_seconds_loses_and_duplicates_nothing() {
    let pg = Postgres::start();
    let (fx, sandbox, _dir) = node_to_a_slow_sandbox(&pg, "outage");
    let mut daemon = fx.start();
    write_random(&fx.watch.join("big.mp4"), 24 << 20, 11);
    sandbox.wait_for_offset("big.mp4", 3 << 20, Duration::from_secs(30));
    pg.stop();
    // Files dropped while the database is away are taken once it is back.
    for n in 0..3 {
        write_random(
            &fx.watch.join(format!("during-{n}.mp4")),
            50_000 + n,
            20 + n,
        );
    }
    std::thread::sleep(Duration::from_secs(10)); // the outage itself, not a wait for an event
    pg.start_again();
    pg.wait_for_answer(
        "outage",
        "SELECT count(*) FROM hotfolder_jobs WHERE state = 'done'",
        "4",
        Duration::from_secs(90),
    );
    assert!(daemon.child_alive(), "the daemon recovered by itself");
    let log = daemon.log();
    assert_eq!(
        common::log_lines_with(&log, &["WARN", "the fleet database is unreachable"]),
        1,
        "said once at warn:\n{log}"
    );
    assert!(log.contains("the fleet database answers again"), "{log}");
    let uploads = sandbox.uploads();
    for name in ["big.mp4", "during-0.mp4", "during-1.mp4", "during-2.mp4"] {
        let complete = uploads
            .iter()
            .filter(|u| u.filename() == name && u.complete())
            .count();
        assert_eq!(complete, 1, "{name} delivered once: {uploads:?}");
    }
    assert_eq!(pg.sql("outage", "SELECT count(*) FROM hotfolder_jobs"), "4");
    let done = Fixture::files_in(&fx.done);
    assert_eq!(done.len(), 8, "four files and four receipts: {done:?}");
}

#[test]
fn three_nodes_deliver_a_mixed_drop_exactly_once() {
    let pg = Postgres::start();
    let url = pg.database("three");
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &[]);
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &store_line(&url, "node-a"),
        providers: &format!("t: {{ type: tus, endpoint: \"{}\" }}\n", sandbox.endpoint()),
        rules: Some(
            "- match: { glob: \"tus/**\" }\n  provider: t\n- match: {}\n  provider: archive\n",
        ),
        ..ConfigParts::default()
    });
    let _a = fx.start();
    let _b = fx.start_node(&node_config(&fx, "node-b"), &[]);
    let _c = fx.start_node(&node_config(&fx, "node-c"), &[]);
    const TO_FOLDER: u64 = 2_000;
    const TO_TUS: u64 = 300;
    let staging = fx.root.join("staging");
    std::fs::create_dir_all(staging.join("archive")).unwrap();
    std::fs::create_dir_all(staging.join("tus")).unwrap();
    for n in 0..TO_FOLDER {
        write_random(&staging.join(format!("archive/a{n:04}.mp4")), 1_000 + n, n);
    }
    for n in 0..TO_TUS {
        write_random(
            &staging.join(format!("tus/t{n:03}.mp4")),
            5_000 + n,
            10_000 + n,
        );
    }
    for sub in ["archive", "tus"] {
        std::fs::rename(staging.join(sub), fx.watch.join(sub)).unwrap();
    }
    let total = TO_FOLDER + TO_TUS;
    pg.wait_for_answer(
        "three",
        "SELECT count(*) FROM hotfolder_jobs WHERE state = 'done'",
        &total.to_string(),
        Duration::from_secs(240),
    );
    assert_eq!(
        pg.sql("three", "SELECT count(*) FROM hotfolder_jobs"),
        total.to_string()
    );
    let done = Fixture::files_in(&fx.done);
    let videos = done.iter().filter(|f| f.ends_with(".mp4")).count() as u64;
    let receipts = done.iter().filter(|f| f.ends_with(".receipt.json")).count() as u64;
    assert_eq!(
        (videos, receipts),
        (total, total),
        "each source in done/ once"
    );
    assert!(done.iter().all(|f| !f.contains("-1.mp4")), "no second copy");
    let delivered = Fixture::files_in(&fx.outbox);
    assert_eq!(delivered.len() as u64, TO_FOLDER, "each archived once");
    let uploads = sandbox.uploads();
    let complete = uploads.iter().filter(|u| u.complete()).count() as u64;
    assert_eq!(complete, TO_TUS, "each tus file uploaded once");
    let names: std::collections::BTreeSet<_> = uploads
        .iter()
        .filter(|u| u.complete())
        .map(|u| u.filename().to_string())
        .collect();
    assert_eq!(names.len() as u64, TO_TUS, "no file uploaded twice");
    let nodes = pg.sql("three", "SELECT count(DISTINCT holder) FROM hotfolder_jobs");
    println!("{total} jobs ran on {nodes} nodes");
}

#[test]
fn every_node_shows_the_fleet_jobs_their_holders_and_the_nodes() {
    let pg = Postgres::start();
    let url = pg.database("views");
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &format!(
            "{}\nhttp: {{ listen: \"{address}\" }}",
            store_line(&url, "node-a")
        ),
        ..ConfigParts::default()
    });
    let _a = fx.start();
    let b_config = node_config(&fx, "node-b");
    let text = std::fs::read_to_string(&b_config).unwrap();
    std::fs::write(&b_config, text.replace(&address, "127.0.0.1:0")).unwrap();
    let _b = fx.start_node(&b_config, &[]);
    let staging = fx.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for n in 0..40 {
        write_random(&staging.join(format!("v{n:02}.mp4")), 3_000 + n, n);
    }
    std::fs::rename(&staging, fx.watch.join("batch")).unwrap();
    pg.wait_for_answer(
        "views",
        "SELECT count(*) FROM hotfolder_jobs WHERE state = 'done'",
        "40",
        Duration::from_secs(60),
    );
    // node-a's API lists every job of the fleet, each with the node that ran it.
    let (status, body) =
        common::sandbox::http(&address, "GET", "/api/jobs?limit=100", &[]).expect("HTTP");
    assert_eq!(status, 200, "{body}");
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(jobs.len(), 40, "{body}");
    let nodes: std::collections::BTreeSet<_> =
        jobs.iter().filter_map(|j| j["node"].as_str()).collect();
    assert!(
        !nodes.is_empty() && nodes.iter().all(|n| *n == "node-a" || *n == "node-b"),
        "{nodes:?}"
    );
    // And the nodes themselves.
    let (status, body) = common::sandbox::http(&address, "GET", "/api/nodes", &[]).expect("HTTP");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let names: Vec<_> = listed.iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, vec!["node-a", "node-b"], "{body}");
    assert!(
        listed.iter().all(
            |n| n["heartbeat_seconds_ago"].as_f64().is_some_and(|s| s < 5.0)
                && n["jobs_held"].as_u64() == Some(0)
        ),
        "{body}"
    );
    // `status` shows the node beside each job, then the fleet's nodes.
    let out = fx.hotfolder(&["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap_or_default();
    assert!(header.contains(" NODE "), "{text}");
    let job_lines = text.lines().filter(|l| l.contains(".mp4")).count();
    let with_node = text
        .lines()
        .filter(|l| l.contains(".mp4") && (l.contains(" node-a ") || l.contains(" node-b ")))
        .count();
    assert_eq!((job_lines, with_node), (40, 40), "{text}");
    for node in ["node-a", "node-b"] {
        assert!(
            text.lines().any(|l| l.starts_with(node)
                && l.contains("s ago")
                && l.trim_end().ends_with(" 0")),
            "{node} listed with its heartbeat and no jobs held: {text}"
        );
    }
    // So does the page, in a real browser.
    let profile = tempfile::tempdir().unwrap();
    let dom = common::browser::browse(
        &format!("http://{address}/"),
        &["--dump-dom"],
        profile.path(),
    );
    assert!(
        dom.contains("<th id=\"node-column\">Node</th>"),
        "a node column: {dom}"
    );
    assert!(
        dom.contains("<td class=\"node\">node-a</td>")
            || dom.contains("<td class=\"node\">node-b</td>"),
        "jobs show their node: {dom}"
    );
    for node in ["node-a", "node-b"] {
        assert!(
            dom.contains(&format!("<td>{node}</td>")),
            "{node} in the page's nodes list: {dom}"
        );
    }
}

/// `hotfolder ARGS -c CONFIG`: its exit code and everything it printed.
fn hotfolder_with(fx: &Fixture, config: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = fx.hotfolder_with(config, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The fixture's config with its jobs in PostgreSQL at `url` (node-a).
fn fleet_config_beside(fx: &Fixture, url: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&fx.config).expect("config");
    let path = fx.root.join("fleet.yaml");
    std::fs::write(&path, format!("{}\n{text}", store_line(url, "node-a")))
        .expect("write the fleet config");
    path
}

#[test]
fn a_single_boxs_history_moves_into_the_fleet_and_keeps_duplicate_detection() {
    let pg = Postgres::start();
    let url = pg.database("grow");
    // One box on sled: three files delivered, one failed (a broken sidecar).
    let fx = Fixture::new();
    for n in 0..3 {
        write_random(&fx.watch.join(format!("clip-{n}.mp4")), 10_000 + n, n);
    }
    std::fs::write(fx.watch.join("broken.json"), b"{oops").unwrap();
    write_random(&fx.watch.join("broken.mp4"), 5_000, 9);
    let mut daemon = fx.start();
    let before = wait_for_outcome(&fx, 3, 1);
    let fleet = fleet_config_beside(&fx, &url);
    let state = fx.state.to_string_lossy().into_owned();
    let migrate = ["store", "migrate", "--from-sled", state.as_str()];

    // Not while the box runs: its database is locked.
    let (code, text) = hotfolder_with(&fx, &fleet, &migrate);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("another process holds it") && text.contains(&state),
        "{text}"
    );
    daemon.terminate(Duration::from_secs(20));

    // Not into a config whose store is sled: nowhere to move it to.
    let (code, text) = hotfolder_with(&fx, &fx.config, &migrate);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("store: { type: postgres"), "{text}");

    let (code, text) = hotfolder_with(&fx, &fleet, &migrate);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("4 finished jobs") && text.contains("3 delivered fingerprints"),
        "{text}"
    );
    assert!(!text.contains("oops") && !url.is_empty());
    assert_eq!(
        pg.sql("grow", "SELECT count(*) FROM hotfolder_jobs"),
        "4",
        "{text}"
    );

    // The fleet's status shows the box's history (sled is left as it was).
    let (code, json) = hotfolder_with(&fx, &fleet, &["status", "--json"]);
    assert_eq!(code, Some(0), "{json}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let files = |rows: &[serde_json::Value], state: &str| {
        let mut files: Vec<String> = in_state(rows, state)
            .iter()
            .map(|r| r["file"].as_str().unwrap_or_default().to_string())
            .collect();
        files.sort();
        files
    };
    assert_eq!(files(&rows, "done"), files(&before, "done"));
    assert_eq!(files(&rows, "failed"), vec!["broken.mp4"]);
    assert_eq!(fx.status().len(), 4, "the sled store is untouched");

    // Twice: nothing more is moved.
    let (code, text) = hotfolder_with(&fx, &fleet, &migrate);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("already moved"), "{text}");
    assert_eq!(pg.sql("grow", "SELECT count(*) FROM hotfolder_jobs"), "4");

    // A node of the fleet knows the box's deliveries: the same content
    // dropped again is filed as a duplicate of the migrated job.
    let original = rows
        .iter()
        .find(|r| r["file"] == "clip-1.mp4")
        .expect("clip-1 migrated");
    std::fs::copy(fx.done.join("clip-1.mp4"), fx.watch.join("again.mp4")).unwrap();
    let node = fx.start_node(&fleet, &[]);
    let again = wait_for("again.mp4 filed", Duration::from_secs(30), || {
        let (_, json) = hotfolder_with(&fx, &fleet, &["status", "--json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&json).ok()?;
        rows.into_iter()
            .find(|r| r["file"] == "again.mp4" && r["state"] == "done")
    });
    assert_eq!(again["duplicate_of"], original["id"], "{again}");
    drop(node);
}

#[test]
fn a_box_with_unfinished_jobs_is_not_migrated() {
    let pg = Postgres::start();
    let url = pg.database("unfinished");
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "1MiB"]);
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        providers: &format!(
            "t: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB }}\n",
            sandbox.endpoint()
        ),
        rules: Some("- match: {}\n  provider: t\n"),
        ..ConfigParts::default()
    });
    write_random(&fx.watch.join("long.mp4"), 20 << 20, 1);
    let mut daemon = fx.start();
    fx.wait_for_bytes("long.mp4", 1 << 20, Duration::from_secs(30));
    daemon.kill9();
    let fleet = fleet_config_beside(&fx, &url);
    let state = fx.state.to_string_lossy().into_owned();
    let (code, text) = hotfolder_with(
        &fx,
        &fleet,
        &["store", "migrate", "--from-sled", state.as_str()],
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("long.mp4") && text.contains("uploading") && text.contains("finish"),
        "names the unfinished job and what to do: {text}"
    );
    assert_eq!(
        pg.sql("unfinished", "SELECT count(*) FROM hotfolder_jobs"),
        "0"
    );
}

#[test]
fn a_dead_nodes_partial_file_on_the_shared_folder_is_resumed_by_the_next() {
    let pg = Postgres::start();
    let url = pg.database("partial");
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &store_line(&url, "node-a"),
        archive: "chunk_size: 256KiB",
        ..ConfigParts::default()
    });
    let size = 4 << 20;
    write_random(&fx.watch.join("long.mp4"), size, 7);
    // node-a stops dead after its fourth chunk is on the share.
    fx.run_until_failpoint("chunk::acknowledged=3*off->return", Duration::from_secs(30));
    // Its partial file is named for the fleet (the database's installation
    // id) and the job: no other node or fleet on the share has that name.
    let installation = pg.sql(
        "partial",
        "SELECT value FROM hotfolder_meta WHERE key = 'installation'",
    );
    let job = pg.sql("partial", "SELECT id FROM hotfolder_jobs");
    let partials = Fixture::files_in(&fx.outbox.join(".hotfolder-partial"));
    assert_eq!(partials, vec![format!("{installation}-{job}")]);
    // node-b takes the job over after the lease and resumes that file.
    let b = fx.start_node(&node_config(&fx, "node-b"), &[]);
    wait_for(
        "long.mp4 delivered and its job done",
        Duration::from_secs(30),
        || (pg.sql("partial", "SELECT state FROM hotfolder_jobs") == "done").then_some(()),
    );
    assert!(common::same_bytes(
        &fx.outbox.join("long.mp4"),
        &fx.done.join("long.mp4")
    ));
    // The fourth chunk was on the share but not yet recorded when node-a
    // stopped: node-b resumes after the third, the last one recorded.
    let offsets = b.resume_offsets();
    assert_eq!(offsets, vec![3 * 256 * 1024], "{}", b.log());
    assert!(
        Fixture::files_in(&fx.outbox.join(".hotfolder-partial")).is_empty(),
        "no partial left behind"
    );
    assert_eq!(
        pg.sql("partial", "SELECT holder FROM hotfolder_jobs"),
        "node-b"
    );
}

#[test]
fn a_node_frozen_before_giving_up_an_upload_leaves_the_new_holders_upload_alone() {
    let pg = Postgres::start();
    let (fx, sandbox, _dir) = node_to_a_slow_sandbox(&pg, "giveup");
    write_random(&fx.watch.join("big.mp4"), 24 << 20, 11);
    // node-a believes, after its fourth chunk, that the source changed; it
    // is frozen at the step before it gives up (deletes) the remote upload.
    let mut a = fx
        .start_with_failpoints("upload::source_changed=4*off->return;abandon::before=sleep(5000)");
    wait_for(
        "node-a to give up its upload",
        Duration::from_secs(30),
        || a.log().contains("abandoning this upload").then_some(()),
    );
    a.signal(libc::SIGSTOP);
    // node-b takes the job over after the lease and carries on with the
    // same remote upload.
    let b = fx.start_node(&node_config(&fx, "node-b"), &[]);
    wait_for("node-b to take over", Duration::from_secs(30), || {
        b.log().contains("taking over a job").then_some(())
    });
    let taken_at = sandbox.wait_for_offset("big.mp4", 5 << 20, Duration::from_secs(30));
    sandbox.wait_for_offset(
        "big.mp4",
        taken_at.offset + (2 << 20),
        Duration::from_secs(30),
    );
    // node-a wakes: it must not delete what node-b is uploading to.
    a.signal(libc::SIGCONT);
    wait_for("node-a to notice", Duration::from_secs(30), || {
        a.log()
            .contains("another node took this job over")
            .then_some(())
    });
    pg.wait_for_answer(
        "giveup",
        "SELECT state FROM hotfolder_jobs",
        "done",
        Duration::from_secs(60),
    );
    let uploads = sandbox.uploads();
    assert_eq!(
        uploads.len(),
        1,
        "one remote upload, never replaced: {uploads:?}"
    );
    assert!(uploads[0].complete(), "{uploads:?}");
    assert!(
        !b.log().contains("starting a new remote upload"),
        "{}",
        b.log()
    );
    assert!(a.child_alive(), "node-a keeps running");
    assert_eq!(
        Fixture::files_in(&fx.done),
        vec!["big.mp4".to_string(), "big.mp4.receipt.json".to_string()]
    );
}

/// The shipped fleet setup (deploy/fleet/): its init.sql makes a role with
/// the least rights a node needs, and a node runs the shipped config with
/// that role and delivers (the share and timings made local and short).
#[test]
fn the_shipped_fleet_setup_runs_with_the_least_rights() {
    let pg = Postgres::start();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/fleet");
    // Without the password, the script refuses and makes nothing.
    let (ok, text) = pg.script("postgres", &deploy.join("init.sql"), &[]);
    assert!(
        !ok && text.contains("set HOTFOLDER_NODE_PASSWORD"),
        "{text}"
    );
    // Twice: the second run finds everything in place and changes nothing.
    for _ in 0..2 {
        let (ok, text) = pg.script(
            "postgres",
            &deploy.join("init.sql"),
            &[("HOTFOLDER_NODE_PASSWORD", "s3cret-pw")],
        );
        assert!(ok, "{text}");
    }
    for (what, query) in [
        (
            "superuser",
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = 'hotfolder_node'",
        ),
        (
            "CREATE on the database",
            "SELECT has_database_privilege('hotfolder_node', 'hotfolder', 'CREATE')",
        ),
        (
            "CREATE in public",
            "SELECT has_schema_privilege('hotfolder_node', 'public', 'CREATE')",
        ),
    ] {
        assert_eq!(
            pg.sql("hotfolder", query),
            "f",
            "the node role has no {what}"
        );
    }

    let fx = Fixture::new();
    let data = fx.root.join("data");
    for dir in ["drop", "done", "failed", "outbox"] {
        std::fs::create_dir_all(data.join(dir)).unwrap();
    }
    let mut text = std::fs::read_to_string(deploy.join("hotfolder.yaml")).unwrap();
    for (from, to) in [
        ("/data/", format!("{}/", data.display())),
        ("/var/lib/hotfolder", fx.state.display().to_string()),
        ("stable_for: 30s", "stable_for: 300ms".to_string()),
        ("poll_every: 10s", "poll_every: 200ms".to_string()),
        ("format: json", "format: text".to_string()),
    ] {
        assert!(
            text.contains(from),
            "deploy/fleet/hotfolder.yaml has {from}"
        );
        text = text.replace(from, &to);
    }
    let config = fx.root.join("node-1.yaml");
    std::fs::write(&config, text).unwrap();
    let url = format!(
        "postgres://hotfolder_node:s3cret-pw@127.0.0.1:{}/hotfolder",
        pg.port
    );
    let env = [
        ("HOTFOLDER_DATABASE_URL", url.as_str()),
        ("HOTFOLDER_NODE", "node-1"),
    ];
    let node = fx.start_node(&config, &env);
    for n in 0..3 {
        write_random(&data.join(format!("drop/clip-{n}.mp4")), 5_000 + n, n);
    }
    wait_for("3 files delivered", Duration::from_secs(30), || {
        (Fixture::files_in(&data.join("outbox")).len() == 3
            && Fixture::files_in(&data.join("done")).len() == 6)
            .then_some(())
    });
    // Its tables are in its own schema, owned by the node role.
    assert_eq!(
        pg.sql(
            "hotfolder",
            "SELECT string_agg(DISTINCT schemaname || ':' || tableowner, ',') FROM pg_tables WHERE tablename LIKE 'hotfolder_%'"
        ),
        "hotfolder:hotfolder_node"
    );
    assert!(!node.log().contains("s3cret-pw"), "{}", node.log());
    // The compose file beside them is valid YAML naming both nodes.
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy.join("docker-compose.yml")).unwrap())
            .expect("deploy/fleet/docker-compose.yml parses");
    for service in ["postgres", "node-1", "node-2"] {
        assert!(!compose["services"][service].is_null(), "{service}");
    }
}

/// A failed job retried through another node, or with no daemon at all,
/// runs again on some node of the fleet: a retry gives the job a claim that
/// a running node can act on (the node that failed it holds nothing more).
#[test]
fn a_failed_job_retried_anywhere_in_the_fleet_runs_again() {
    let pg = Postgres::start();
    let (fx, mut sandbox, _dir) = node_to_a_slow_sandbox(&pg, "retried");
    sandbox.kill();
    let a = fx.start();
    let b_config = node_config(&fx, "node-b");
    let b = fx.start_node(&b_config, &[]);
    for (seed, name) in ["one.mp4", "two.mp4", "gone.mp4"].into_iter().enumerate() {
        write_random(&fx.watch.join(name), 100_000, seed as u64);
    }
    // The server is down: all fail after their attempts.
    pg.wait_for_answer(
        "retried",
        "SELECT count(*) FROM hotfolder_jobs WHERE state = 'failed'",
        "3",
        Duration::from_secs(60),
    );
    sandbox.start_again();
    let id_of = |file: &str| {
        pg.sql(
            "retried",
            &format!("SELECT id FROM hotfolder_jobs WHERE record->>'relpath' = '{file}'"),
        )
    };
    // One through node-b's daemon (whichever node failed it).
    let one = id_of("one.mp4");
    let (code, text) = hotfolder_with(&fx, &b_config, &["retry", &one]);
    assert_eq!(code, Some(0), "{text}");
    // One with no daemon behind the command: a node with no process.
    let c_config = node_config(&fx, "node-c");
    let two = id_of("two.mp4");
    let (code, text) = hotfolder_with(&fx, &c_config, &["retry", &two]);
    assert_eq!(code, Some(0), "{text}");
    pg.wait_for_answer(
        "retried",
        "SELECT count(*) FROM hotfolder_jobs WHERE state = 'done'",
        "2",
        Duration::from_secs(40),
    );
    let complete = sandbox
        .uploads()
        .into_iter()
        .filter(|u| u.complete())
        .count();
    assert_eq!(complete, 2);
    // A retry whose file is gone from failed/ says so; the job is not left
    // queued on a node that will never run it: some node files it as
    // failed again.
    std::fs::remove_file(fx.failed.join("gone.mp4")).unwrap();
    let gone = id_of("gone.mp4");
    let (code, text) = hotfolder_with(&fx, &b_config, &["retry", &gone]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no longer at"), "{text}");
    pg.wait_for_answer(
        "retried",
        &format!("SELECT state FROM hotfolder_jobs WHERE id = {gone}"),
        "failed",
        Duration::from_secs(30),
    );
    drop((a, b));
}

/// A node that stops dead after moving a file into done/ but before
/// recording it: the node that takes the job over finishes that filing from
/// the recorded intent (the file is in done/ once, with one receipt).
#[test]
fn a_half_done_filing_is_finished_by_the_node_that_takes_over() {
    let pg = Postgres::start();
    let url = pg.database("filing");
    let fx = fleet_fixture(&url, "node-a");
    write_random(&fx.watch.join("clip.mp4"), 50_000, 3);
    fx.run_until_failpoint("filing::after_move=return", Duration::from_secs(30));
    assert!(fx.done.join("clip.mp4").exists(), "moved before the stop");
    assert_eq!(
        pg.sql("filing", "SELECT state FROM hotfolder_jobs"),
        "filing"
    );
    let b = fx.start_node(&node_config(&fx, "node-b"), &[]);
    pg.wait_for_answer(
        "filing",
        "SELECT state FROM hotfolder_jobs",
        "done",
        Duration::from_secs(30),
    );
    assert!(b.log().contains("taking over a job"), "{}", b.log());
    assert_eq!(
        Fixture::files_in(&fx.done),
        vec!["clip.mp4".to_string(), "clip.mp4.receipt.json".to_string()]
    );
    assert!(Fixture::files_in(&fx.watch).is_empty());
    assert_eq!(Fixture::files_in(&fx.outbox).len(), 1);
}
