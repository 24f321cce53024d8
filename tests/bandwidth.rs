//! Bandwidth limits (issue 15): a rate for all uploads, or for one
//! provider, holds the measured rate of an upload to a sandbox within 15%
//! of the limit; a weekly timetable switches at its boundary, live (the
//! clock is started just before the boundary, so nobody waits for hours).

mod common;

use std::time::{Duration, Instant};

use common::sandbox::{Sandbox, http};
use common::{ConfigParts, Fixture, free_address, in_state, read_json, wait_for, write_random};

const MIB: u64 = 1 << 20;

fn limit_in_metrics(address: &str, scope: &str, name: &str) -> Option<f64> {
    let (_, metrics) = http(address, "GET", "/metrics", &[]).ok()?;
    let prefix =
        format!(r#"hotfolder_bandwidth_limit_bytes_per_second{{scope="{scope}",name="{name}"}} "#);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn within_15_percent(rate: f64, limit: f64) {
    let ratio = rate / limit;
    eprintln!(
        "measured {:.2} MiB/s against a limit of {:.2} MiB/s ({ratio:.2}x)",
        rate / MIB as f64,
        limit / MIB as f64
    );
    assert!(
        (0.85..=1.15).contains(&ratio),
        "measured {rate:.0} B/s against a limit of {limit:.0} B/s"
    );
}

fn tus_fixture(sandbox: &Sandbox, top: &str, provider_extra: &str) -> Fixture {
    Fixture::with_parts(ConfigParts {
        top,
        providers: &format!(
            "t: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB{provider_extra} }}\n",
            sandbox.endpoint()
        ),
        rules: Some("- match: {}\n  provider: t\n"),
        ..ConfigParts::default()
    })
}

#[test]
fn a_limit_on_all_uploads_holds_the_rate_a_sandbox_sees() {
    const SIZE: u64 = 12 * MIB;
    const LIMIT: u64 = 3 * MIB;
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = Sandbox::start(dir.path(), &[]);
    let address = free_address();
    let fx = tus_fixture(
        &sandbox,
        &format!("bandwidth: 3MiB/s\nhttp: {{ listen: \"{address}\" }}"),
        "",
    );
    let daemon = fx.start();
    assert_eq!(limit_in_metrics(&address, "all", ""), Some(LIMIT as f64));
    write_random(&fx.watch.join("limited.mp4"), SIZE, 1);
    wait_for("limited.mp4 done", Duration::from_secs(60), || {
        (in_state(&fx.status(), "done").len() == 1).then_some(())
    });
    drop(daemon);
    let receipt = read_json(&fx.done.join("limited.mp4.receipt.json"));
    let started: jiff::Timestamp = receipt["started_at"]
        .as_str()
        .expect("start")
        .parse()
        .expect("time");
    let finished: jiff::Timestamp = receipt["finished_at"]
        .as_str()
        .expect("end")
        .parse()
        .expect("time");
    let seconds = (finished - started)
        .total(jiff::Unit::Second)
        .expect("seconds");
    within_15_percent(SIZE as f64 / seconds, LIMIT as f64);
    let upload = sandbox.upload_named("limited.mp4").expect("upload");
    assert_eq!(upload.offset, SIZE);
}

#[test]
fn a_providers_limit_holds_its_one_shot_upload() {
    const SIZE: u64 = 8 * MIB;
    const LIMIT: u64 = 4 * MIB;
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = Sandbox::start(dir.path(), &[]);
    let fx = tus_fixture(&sandbox, "", ", bandwidth: 4MiB/s");
    let file = fx.root.join("one.mp4");
    write_random(&file, SIZE, 2);
    // Timed as the sandbox sees the bytes arrive, from the first chunk
    // committed to the last: the command's start (slow on a loaded
    // machine) is not the limit's doing.
    let (out, bytes, seconds) = std::thread::scope(|scope| {
        let upload = scope
            .spawn(|| fx.hotfolder(&["upload", "--provider", "t", file.to_str().expect("path")]));
        let deadline = Duration::from_secs(60);
        let first = sandbox.wait_for_offset("one.mp4", 1, deadline).offset;
        let started = Instant::now();
        sandbox.wait_for_offset("one.mp4", SIZE, deadline);
        let seconds = started.elapsed().as_secs_f64();
        (upload.join().expect("upload thread"), SIZE - first, seconds)
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    within_15_percent(bytes as f64 / seconds, LIMIT as f64);
}

#[test]
fn a_timetable_changes_the_limit_at_its_boundary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = Sandbox::start(dir.path(), &[]);
    let address = free_address();
    let fx = tus_fixture(
        &sandbox,
        &format!(
            "bandwidth: \"Mon-Fri 08:00 1MiB/s, Mon-Fri 19:00 off\"\nhttp: {{ listen: \"{address}\" }}"
        ),
        "",
    );
    // Monday 2026-12-07, three seconds before 08:00: Friday's `off` holds.
    let daemon = fx.start_node(
        &fx.config,
        &[("HOTFOLDER_CLOCK_START", "2026-12-07T07:59:57")],
    );
    assert_eq!(
        limit_in_metrics(&address, "all", ""),
        Some(0.0),
        "off before 08:00"
    );
    let switched = Instant::now();
    wait_for("the 08:00 limit", Duration::from_secs(20), || {
        (limit_in_metrics(&address, "all", "") == Some(MIB as f64)).then_some(())
    });
    let waited = switched.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "switched at the boundary, not at once ({waited:?})"
    );
    // The line is written just after the limit is swapped in.
    wait_for("both limits logged", Duration::from_secs(10), || {
        let log = daemon.log();
        (log.contains("rate=off (no limit)") && log.contains("rate=1MiB/s")).then_some(())
    });
}

#[test]
fn a_bad_timetable_is_refused_with_its_place_in_the_file() {
    let fx = Fixture::new();
    let text = std::fs::read_to_string(&fx.config).expect("config");
    std::fs::write(
        &fx.config,
        format!("bandwidth: \"Mon-Fri 08:00 10MiB/s, Mon-Fry 19:00 off\"\n{text}"),
    )
    .expect("config");
    let out = fx.hotfolder(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("hotfolder.yaml:1:") && said.contains("\"Fry\" is not a day"),
        "{said}"
    );
}
