//! The HTTP status API of a running daemon: every route's status codes and
//! JSON shape, bearer auth on and off, the metrics text read back by a
//! Prometheus text-format parser, and a planted secret that no answer shows.

mod common;

use std::time::Duration;

use common::sandbox::http;
use common::{Fixture, free_address, in_state, wait_for, write_random};

const TOKEN: &str = "api-secret-token-4b1d9e";

fn start(token: bool) -> (Fixture, common::Daemon, String) {
    let address = free_address();
    let http_block = if token {
        format!("http: {{ listen: \"{address}\", token: \"{TOKEN}\" }}")
    } else {
        format!("http: {{ listen: \"{address}\" }}")
    };
    let fx = Fixture::with_config("", "", &http_block);
    let daemon = fx.start();
    (fx, daemon, address)
}

fn get(address: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let header = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header
        .iter()
        .map(|h| ("Authorization", h.as_str()))
        .collect();
    http(address, "GET", path, &headers).expect("HTTP answer")
}

fn post(address: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let header = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header
        .iter()
        .map(|h| ("Authorization", h.as_str()))
        .collect();
    http(address, "POST", path, &headers).expect("HTTP answer")
}

#[test]
fn routes_answer_with_auth_on() {
    let (fx, daemon, address) = start(true);
    write_random(&fx.watch.join("a.mp4"), 300_000, 1);
    std::fs::write(fx.watch.join("b.json"), b"{not json").unwrap();
    write_random(&fx.watch.join("b.mp4"), 200_000, 2);
    wait_for("one done and one failed", Duration::from_secs(30), || {
        let rows = fx.status();
        (in_state(&rows, "done").len() == 1 && in_state(&rows, "failed").len() == 1).then_some(())
    });

    // /healthz needs no token; everything else does.
    assert_eq!(get(&address, "/healthz", None).0, 200);
    for path in ["/metrics", "/api/jobs", "/api/jobs/1"] {
        assert_eq!(get(&address, path, None).0, 401, "{path} without a token");
        assert_eq!(
            get(&address, path, Some("wrong")).0,
            401,
            "{path} with a wrong token"
        );
    }
    assert_eq!(post(&address, "/api/jobs/1/retry", None).0, 401);

    let (status, body) = get(&address, "/api/jobs", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON list");
    assert_eq!(jobs.len(), 2, "{body}");
    for job in &jobs {
        for key in [
            "id",
            "watch",
            "file",
            "provider",
            "state",
            "bytes_acknowledged",
            "bytes_sent",
            "size",
            "attempts",
            "last_error",
        ] {
            assert!(job.get(key).is_some(), "job has {key}: {job}");
        }
    }
    let (status, body) = get(&address, "/api/jobs?state=failed", Some(TOKEN));
    assert_eq!(status, 200);
    let failed: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(failed.len(), 1, "{body}");
    assert!(
        failed[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("b.json"),
        "{body}"
    );
    let failed_id = failed[0]["id"].as_u64().unwrap();
    let done_id = jobs.iter().find(|j| j["state"] == "done").unwrap()["id"]
        .as_u64()
        .unwrap();

    let (status, body) = get(&address, &format!("/api/jobs/{done_id}"), Some(TOKEN));
    assert_eq!(status, 200);
    let one: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["id"], done_id);
    assert_eq!(one["state"], "done");
    assert_eq!(get(&address, "/api/jobs/999", Some(TOKEN)).0, 404);
    assert_eq!(get(&address, "/api/jobs/notanumber", Some(TOKEN)).0, 400);

    // Retry: a done job is refused; the failed one is queued once its sidecar is fixed.
    let (status, body) = post(&address, &format!("/api/jobs/{done_id}/retry"), Some(TOKEN));
    assert_eq!(status, 409, "{body}");
    std::fs::write(fx.failed.join("b.json"), br#"{"title": "fixed"}"#).unwrap();
    let (status, body) = post(
        &address,
        &format!("/api/jobs/{failed_id}/retry"),
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{body}");
    wait_for("the retried job delivered", Duration::from_secs(30), || {
        let (_, body) = get(&address, &format!("/api/jobs/{failed_id}"), Some(TOKEN));
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .filter(|j| j["state"] == "done")
    });

    // Metrics: parsed as Prometheus text; the families the spec names are there.
    let (status, text) = get(&address, "/metrics", Some(TOKEN));
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        value("hotfolder_jobs", Some(("state", "done"))),
        2.0,
        "{text}"
    );
    assert_eq!(
        value("hotfolder_files_detected_total", Some(("watch", "drop"))),
        2.0,
        "{text}"
    );
    assert_eq!(
        value("hotfolder_uploads_total", Some(("result", "delivered"))),
        2.0,
        "{text}"
    );
    assert_eq!(
        value(
            "hotfolder_bytes_uploaded_total",
            Some(("provider", "archive"))
        ),
        500_000.0,
        "{text}"
    );
    assert!(
        value("hotfolder_source_bytes_read_total", None) >= 500_000.0,
        "{text}"
    );
    assert_eq!(value("hotfolder_uploads_in_flight", None), 0.0, "{text}");
    assert!(text.contains("hotfolder_queue_depth"), "{text}");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "hotfolder_upload_duration_seconds"
                && matches!(s.value, prometheus_parse::Value::Histogram(_))),
        "{text}"
    );
    // Uploads of a fraction of a second add their fractions.
    let sum = text
        .lines()
        .find(|l| l.starts_with("hotfolder_upload_duration_seconds_sum{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(sum.is_some_and(|s| s > 0.0), "{text}");

    // The token never appears in any answer or log line.
    for (_, body) in [
        get(&address, "/api/jobs", Some(TOKEN)),
        get(&address, "/metrics", Some(TOKEN)),
    ] {
        assert!(!body.contains(TOKEN));
    }
    assert!(!daemon.log().contains(TOKEN), "the log shows the token");
    let check = fx.hotfolder(&["check"]);
    assert!(!String::from_utf8_lossy(&check.stdout).contains(TOKEN));
    for args in [&["status"][..], &["status", "--json"][..]] {
        let out = fx.hotfolder(args);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(TOKEN),
            "status {args:?}"
        );
    }
    // Receipts and error reports written so far.
    for dir in [&fx.done, &fx.failed] {
        for name in Fixture::files_in(dir) {
            if name.ends_with(".json") {
                let text = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
                assert!(!text.contains(TOKEN), "{name} shows the token");
            }
        }
    }
}

#[test]
fn routes_answer_without_auth_when_no_token_is_set() {
    let (fx, _daemon, address) = start(false);
    write_random(&fx.watch.join("a.mp4"), 10_000, 3);
    wait_for("the file done", Duration::from_secs(30), || {
        (in_state(&fx.status(), "done").len() == 1).then_some(())
    });
    assert_eq!(get(&address, "/healthz", None).0, 200);
    assert_eq!(get(&address, "/api/jobs", None).0, 200);
    assert_eq!(get(&address, "/metrics", None).0, 200);
    assert_eq!(get(&address, "/api/jobs/1", None).0, 200);
    assert_eq!(get(&address, "/nowhere", None).0, 404);
}

/// Every family `/metrics` can ever show is there from the first scrape,
/// with its HELP and TYPE, before anything has happened; every count is a
/// counter and every level a gauge.
#[test]
fn metrics_declare_every_family_at_start() {
    let (_fx, _daemon, address) = start(false);
    let (status, text) = get(&address, "/metrics", None);
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let typed: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let helped: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let counters = [
        "hotfolder_uploads_total",
        "hotfolder_bytes_uploaded_total",
        "hotfolder_retries_total",
        "hotfolder_source_bytes_read_total",
        "hotfolder_files_detected_total",
        "hotfolder_files_vanished_total",
        "hotfolder_files_skipped_total",
        "hotfolder_scans_total",
        "hotfolder_store_outages_total",
        "hotfolder_store_durable_writes_total",
        "hotfolder_store_flushes_total",
        "hotfolder_webhook_deliveries_total",
        "hotfolder_webhook_failed_tries_total",
    ];
    let gauges = [
        "hotfolder_jobs",
        "hotfolder_queue_depth",
        "hotfolder_job_tasks",
        "hotfolder_uploads_in_flight",
        "hotfolder_store_up",
        "hotfolder_paused",
        "hotfolder_webhooks_waiting",
        "hotfolder_webhooks_failing",
        "hotfolder_bandwidth_limit_bytes_per_second",
    ];
    for (names, kind) in [(&counters[..], "counter"), (&gauges[..], "gauge")] {
        for name in names {
            assert_eq!(typed.get(name), Some(&kind), "TYPE of {name}:\n{text}");
            assert!(helped.contains(name), "HELP of {name}:\n{text}");
        }
    }
    assert_eq!(
        typed.get("hotfolder_upload_duration_seconds"),
        Some(&"histogram"),
        "{text}"
    );
    for (name, kind) in &typed {
        assert_eq!(
            name.ends_with("_total"),
            *kind == "counter",
            "{name} is a {kind}:\n{text}"
        );
    }
}
