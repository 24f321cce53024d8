//! Webhooks (issue 15) against a local receiver that takes, refuses (500)
//! or never answers on command: every event arrives at least once with the
//! same event id across redeliveries, signatures verify, nothing is lost
//! across a `kill -9`, a dead receiver does not hold up filing, and the
//! `slack` format is a chat's `{"text": ...}`.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;

use std::time::Duration;

use common::sandbox::http;
use common::webhook::{Answer, Received, Receiver};
use common::{Fixture, in_state, wait_for, write_random};
use hmac::{Hmac, Mac};

const SECRET: &str = "hook-secret-7f3a";

fn verify(received: &Received) {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&received.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        received.headers.get("x-hotfolder-signature"),
        Some(&expected),
        "the signature verifies"
    );
}

fn fixture(hooks: &str, top: &str) -> Fixture {
    let fx = Fixture::with_config("", "", top);
    let text = std::fs::read_to_string(&fx.config).expect("config");
    std::fs::write(&fx.config, format!("notify:\n{hooks}\n{text}")).expect("config");
    fx
}

/// Only `.mp4` files are routed: with `unmatched: fail`, anything else fails.
fn route_only_mp4(fx: &Fixture) {
    let text = std::fs::read_to_string(&fx.config).expect("config");
    std::fs::write(
        &fx.config,
        text.replace("- match: {}", "- match: { glob: \"*.mp4\" }"),
    )
    .expect("config");
}

fn hook(receiver: &Receiver, extra: &str) -> String {
    format!(
        "  - {{ url: \"{}\", secret: \"{SECRET}\", headers: {{ X-Team: studio-a }}{extra} }}",
        receiver.url()
    )
}

#[test]
fn done_and_failed_arrive_signed_with_the_receipts_facts() {
    let receiver = Receiver::start(Answer::Take);
    let fx = fixture(&hook(&receiver, ""), "unmatched: fail");
    // Only .mp4 files are routed; the .mov fails as unmatched.
    route_only_mp4(&fx);
    let daemon = fx.start();
    write_random(&fx.watch.join("good.mp4"), 200_000, 1);
    write_random(&fx.watch.join("odd.mov"), 1000, 2);
    wait_for("two events taken", Duration::from_secs(30), || {
        (receiver.taken().len() == 2).then_some(())
    });
    let mut by_event: BTreeMap<String, Received> = BTreeMap::new();
    for r in receiver.taken() {
        verify(&r);
        assert_eq!(
            r.headers.get("x-team").map(String::as_str),
            Some("studio-a")
        );
        by_event.insert(r.json()["event"].as_str().expect("event").to_string(), r);
    }
    let done = by_event["done"].json();
    let row = fx
        .status()
        .into_iter()
        .find(|r| r["file"] == "good.mp4")
        .expect("row");
    assert_eq!(done["file"], "good.mp4");
    assert_eq!(done["provider"], "archive");
    assert_eq!(done["job"], row["id"]);
    assert_eq!(done["bytes"], 200_000);
    assert_eq!(
        done["sha256"].as_str(),
        Some(common::sha256(&fx.done.join("good.mp4")).as_str())
    );
    assert!(
        done["remote_id"]
            .as_str()
            .is_some_and(|r| r.ends_with("good.mp4")),
        "{done}"
    );
    assert_eq!(
        by_event["done"]
            .headers
            .get("x-hotfolder-event-id")
            .map(String::as_str),
        done["event_id"].as_str()
    );
    let failed = by_event["failed"].json();
    assert_eq!(failed["file"], "odd.mov");
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no rule")),
        "{failed}"
    );
    assert!(
        failed["retry_with"]
            .as_str()
            .is_some_and(|r| r.contains("hotfolder retry")),
        "{failed}"
    );
    drop(daemon);
}

#[test]
fn a_refusing_receiver_gets_the_same_event_again_until_it_takes_it() {
    let receiver = Receiver::start(Answer::Refuse);
    let address = common::free_address();
    let fx = fixture(
        &hook(&receiver, ", events: [done]"),
        &format!("http: {{ listen: \"{address}\" }}"),
    );
    let daemon = fx.start();
    write_random(&fx.watch.join("a.mp4"), 10_000, 3);
    wait_for("three refused tries", Duration::from_secs(30), || {
        (receiver.got().len() >= 3).then_some(())
    });
    // Filing did not wait for the receiver.
    assert_eq!(in_state(&fx.status(), "done").len(), 1);
    let (_, metrics) = http(&address, "GET", "/metrics", &[]).expect("metrics");
    assert!(
        metrics.contains("hotfolder_webhooks_waiting 1"),
        "{metrics}"
    );
    let status = fx.hotfolder(&["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("webhook") && shown.contains("answered HTTP 500"),
        "{shown}"
    );
    assert!(!shown.contains("/hook"), "no URL in status: {shown}");
    receiver.set(Answer::Take);
    wait_for("the event taken", Duration::from_secs(30), || {
        (receiver.taken().len() == 1).then_some(())
    });
    let ids: Vec<String> = receiver
        .got()
        .iter()
        .map(|r| r.json()["event_id"].as_str().expect("id").to_string())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one event id: {ids:?}");
    drop(daemon);
}

#[test]
fn an_event_waiting_at_a_kill_9_is_delivered_after_the_restart() {
    // Nothing listens at first: the receiver's port is reserved, then freed.
    let address = common::free_address();
    let url = format!("http://{address}/hook");
    let fx = fixture(
        &format!("  - {{ url: \"{url}\", secret: \"{SECRET}\" }}"),
        "",
    );
    let mut daemon = fx.start();
    write_random(&fx.watch.join("k.mp4"), 10_000, 4);
    wait_for(
        "k.mp4 done and its delivery tried",
        Duration::from_secs(30),
        || {
            (in_state(&fx.status(), "done").len() == 1
                && daemon.log().contains("webhook not delivered"))
            .then_some(())
        },
    );
    daemon.kill9();
    let receiver = Receiver::on(TcpListener::bind(&address).expect("rebind"), Answer::Take);
    let daemon = fx.start();
    wait_for(
        "the done event after the restart",
        Duration::from_secs(30),
        || (receiver.taken().len() == 1).then_some(()),
    );
    let event = receiver.taken()[0].json();
    assert_eq!(
        (event["event"].as_str(), event["file"].as_str()),
        (Some("done"), Some("k.mp4"))
    );
    verify(&receiver.taken()[0]);
    drop(daemon);
}

#[test]
fn a_receiver_that_never_answers_does_not_hold_up_filing() {
    const FILES: usize = 12;
    let receiver = Receiver::start(Answer::Hang);
    let fx = fixture(&hook(&receiver, ""), "");
    let daemon = fx.start();
    let staged = fx.root.join("staged");
    for n in 0..FILES {
        write_random(&staged.join(format!("f{n:02}.mp4")), 5000, n as u64);
    }
    std::fs::rename(&staged, fx.watch.join("batch")).expect("drop");
    // Each delivery waits up to its timeout (10 s) with the receiver holding
    // every connection; the jobs are filed meanwhile.
    wait_for("every file done", Duration::from_secs(9), || {
        (in_state(&fx.status(), "done").len() == FILES).then_some(())
    });
    assert!(receiver.taken().is_empty(), "nothing was taken yet");
    drop(daemon);
}

#[test]
fn the_slack_format_is_a_chat_line() {
    let receiver = Receiver::start(Answer::Take);
    let fx = fixture(
        &format!(
            "  - {{ url: \"{}\", format: slack, events: [done] }}",
            receiver.url()
        ),
        "",
    );
    let daemon = fx.start();
    write_random(&fx.watch.join("clip one.mp4"), 1000, 5);
    wait_for("one message", Duration::from_secs(30), || {
        (receiver.taken().len() == 1).then_some(())
    });
    let body = receiver.taken()[0].json();
    let text = body["text"].as_str().expect("text");
    assert!(
        text.starts_with("hotfolder: done: drop/clip one.mp4 delivered to archive"),
        "{text}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only text: {body}"
    );
    assert!(
        !receiver.taken()[0]
            .headers
            .contains_key("x-hotfolder-signature")
    );
    drop(daemon);
}

#[test]
fn a_bad_webhook_is_refused_with_its_key() {
    let fx = fixture("  - { url: \"ftp://example.com/x\" }", "");
    let out = fx.hotfolder(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("notify[0].url") && said.contains("not an http"),
        "{said}"
    );
    let fx = fixture(
        "  - { url: \"http://127.0.0.1:9/x\", events: [finished] }",
        "",
    );
    let said = String::from_utf8_lossy(&fx.hotfolder(&["check"]).stderr).into_owned();
    assert!(said.contains("\"finished\" is not an event"), "{said}");
    let fx = fixture(
        "  - { url: \"http://127.0.0.1:9/x\", headers: { \"Bad Name\": x } }",
        "",
    );
    let said = String::from_utf8_lossy(&fx.hotfolder(&["check"]).stderr).into_owned();
    assert!(said.contains("not a valid HTTP header"), "{said}");
    let fx = fixture(
        "  - { url: \"http://127.0.0.1:9/x\" }\n  - { url: \"http://127.0.0.1:9/x\", format: slack }",
        "",
    );
    let said = String::from_utf8_lossy(&fx.hotfolder(&["check"]).stderr).into_owned();
    assert!(
        said.contains("the same webhook URL appears twice"),
        "{said}"
    );
}

#[test]
fn a_redirect_is_not_followed_and_not_counted_as_taken() {
    let receiver = Receiver::start(Answer::Redirect);
    let fx = fixture(&hook(&receiver, ", events: [done]"), "");
    let daemon = fx.start();
    write_random(&fx.watch.join("r.mp4"), 1000, 8);
    wait_for("two redirected tries", Duration::from_secs(30), || {
        (receiver.got().len() >= 2).then_some(())
    });
    assert!(
        receiver.got().iter().all(|r| !r.body.is_empty()),
        "every try was the POST itself, none a GET to the new place"
    );
    let shown = String::from_utf8_lossy(&fx.hotfolder(&["status"]).stdout).into_owned();
    assert!(
        shown.contains("a redirect, which is not followed"),
        "{shown}"
    );
    drop(daemon);
}

#[test]
fn a_job_retried_by_hand_raises_events_with_new_ids() {
    let receiver = Receiver::start(Answer::Take);
    let fx = fixture(&hook(&receiver, ", events: [failed]"), "unmatched: fail");
    route_only_mp4(&fx);
    let daemon = fx.start();
    write_random(&fx.watch.join("twice.mov"), 1000, 9);
    wait_for("the first failure told", Duration::from_secs(30), || {
        (receiver.taken().len() == 1).then_some(())
    });
    let id = fx.status()[0]["id"].as_u64().expect("id").to_string();
    let out = fx.hotfolder(&["retry", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the second failure told", Duration::from_secs(30), || {
        (receiver.taken().len() == 2).then_some(())
    });
    let ids: Vec<String> = receiver
        .taken()
        .iter()
        .map(|r| r.json()["event_id"].as_str().expect("id").to_string())
        .collect();
    assert_ne!(ids[0], ids[1], "a new failure is a new event");
    drop(daemon);
}

#[test]
fn each_retried_attempt_and_the_final_failure_are_told() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = common::sandbox::Sandbox::start(dir.path(), &["--fail-rate", "1"]);
    let receiver = Receiver::start(Answer::Take);
    let fx = Fixture::with_parts(common::ConfigParts {
        providers: &format!("t: {{ type: tus, endpoint: \"{}\" }}\n", sandbox.endpoint()),
        rules: Some("- match: {}\n  provider: t\n"),
        ..common::ConfigParts::default()
    });
    let text = std::fs::read_to_string(&fx.config).expect("config");
    std::fs::write(
        &fx.config,
        format!(
            "notify:\n  - {{ url: \"{}\", events: [retried, failed] }}\n{text}",
            receiver.url()
        ),
    )
    .expect("config");
    let daemon = fx.start();
    write_random(&fx.watch.join("flaky.mp4"), 1000, 6);
    wait_for("2 retried and 1 failed", Duration::from_secs(60), || {
        let events: Vec<String> = receiver
            .taken()
            .iter()
            .map(|r| r.json()["event"].as_str().unwrap_or("").to_string())
            .collect();
        (events.len() == 3 && events.iter().filter(|e| *e == "retried").count() == 2)
            .then_some(events)
    });
    let bodies: Vec<serde_json::Value> = receiver.taken().iter().map(Received::json).collect();
    let ids: std::collections::BTreeSet<&str> = bodies
        .iter()
        .filter_map(|b| b["event_id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        3,
        "each attempt's event has its own id: {bodies:?}"
    );
    assert!(
        bodies
            .iter()
            .all(|b| b["status"] == 500 || b["reason"].as_str().is_some()),
        "{bodies:?}"
    );
    drop(daemon);
}

#[test]
fn a_fleet_node_sends_its_events_through_the_databases_outbox() {
    let pg = common::postgres::Postgres::start();
    let url = pg.database("hooks");
    let receiver = Receiver::start(Answer::Refuse);
    let fx = fixture(
        &hook(&receiver, ", events: [done]"),
        &format!("store: {{ type: postgres, url: \"{url}\", node: node-a, lease: 2s }}"),
    );
    let daemon = fx.start();
    write_random(&fx.watch.join("fleet.mp4"), 5000, 7);
    wait_for(
        "a refused try recorded in the database",
        Duration::from_secs(30),
        || {
            let row = pg.sql(
            "hooks",
            "SELECT delivery->>'attempts' || ' ' || (delivery->>'last_error') FROM hotfolder_outbox",
        );
            row.starts_with('1').then_some(row)
        },
    );
    receiver.set(Answer::Take);
    wait_for(
        "the event taken and gone from the outbox",
        Duration::from_secs(30),
        || {
            (receiver.taken().len() == 1
                && pg.sql("hooks", "SELECT count(*) FROM hotfolder_outbox") == "0")
                .then_some(())
        },
    );
    verify(&receiver.taken()[0]);
    drop(daemon);
}

/// A node that lost a job (another holds it under a newer epoch) adds no
/// event for it: the outbox write is fenced like the job's own writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_lost_the_job_adds_no_event() {
    use hotfolder::config::NotifyEvent;
    use hotfolder::state::{
        FileSignature, Job, JobStore, Notification, PgStore, Store, StoreError,
    };
    let pg = common::postgres::Postgres::start();
    let url = pg.database("fence");
    let store = Store::Postgres(PgStore::open(&url).await.expect("open the fleet store"));
    let signature = FileSignature {
        size: 1,
        mtime_ns: 1,
        dev: 1,
        ino: 1,
    };
    let mut job = Job::new(
        1,
        "drop",
        std::path::Path::new("a.mp4"),
        std::path::Path::new("/x/a.mp4"),
        signature,
        "archive",
    );
    store.put(&mut job).await.expect("the job");
    // Another node took it over: its epoch moved on.
    pg.sql("fence", "UPDATE hotfolder_jobs SET epoch = 2 WHERE id = 1");
    let event = |key: &str| Notification {
        key: key.to_string(),
        event_id: key.to_string(),
        event: NotifyEvent::Retried,
        webhook: "w".into(),
        host: "http://127.0.0.1".into(),
        document: serde_json::json!({}),
        attempts: 0,
        next_at: jiff::Timestamp::now(),
        last_error: None,
    };
    job.epoch = 1;
    let stale = store.outbox_add(&event("stale"), &job).await;
    assert!(matches!(stale, Err(StoreError::Fenced(1))), "{stale:?}");
    job.epoch = 2;
    store
        .outbox_add(&event("current"), &job)
        .await
        .expect("the holder adds it");
    let keys: Vec<String> = store
        .outbox(10)
        .await
        .expect("outbox")
        .into_iter()
        .map(|n| n.key)
        .collect();
    assert_eq!(keys, vec!["current".to_string()]);
}
