//! The PostgreSQL job store (issue 13, first steps): a private server
//! started by the test (tests/common/postgres.rs), a database per test. A
//! daemon keeps its jobs there, `status` reads them with no daemon running,
//! a kill -9 resumes from the database, and bad store settings are refused
//! with clear words that never show a password.

mod common;

use std::time::Duration;

use common::postgres::Postgres;
use common::sandbox::Sandbox;
use common::{ConfigParts, Fixture, in_state, wait_for_outcome, write_random};

/// A fixture whose jobs live in `url`, named `node`.
fn fleet_fixture(url: &str, node: &str) -> Fixture {
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &format!("store: {{ type: postgres, url: \"{url}\", node: {node} }}"),
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
    let url = pg.database("resume");
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start(dir.path(), &["--throttle", "4MiB"]);
    let fx = Fixture::new();
    fx.write_config_parts(ConfigParts {
        top: &format!("store: {{ type: postgres, url: \"{url}\", node: node-a }}"),
        providers: &format!(
            "t: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB }}\n",
            sandbox.endpoint()
        ),
        rules: Some("- match: {}\n  provider: t\n"),
        ..ConfigParts::default()
    });
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
