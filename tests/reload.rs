//! Live reload (issue 15): `SIGHUP`, `POST /api/reload` and `hotfolder
//! reload` read the config file again. A config that does not load is
//! refused with its file:line:column and the daemon goes on with the one it
//! has; one that loads changes watches, rules, providers, limits and
//! webhooks without a restart, while a job in flight finishes with the
//! provider settings it started with. Keys that need a restart (the HTTP
//! address, the store) are named and left as they run.

mod common;

use std::time::Duration;

use common::sandbox::{Sandbox, http};
use common::{Fixture, free_address, in_state, read_json, succeeded, wait_for, write_random};

const MIB: u64 = 1 << 20;

/// A config: watches `drop` (and `drop2` when `second_watch`), providers
/// and rules as given, an HTTP API on `address`, and `extra` top-level lines.
fn config(address: &str, second_watch: bool, providers: &str, rules: &str, extra: &str) -> String {
    let drop2 = if second_watch {
        "  - name: drop2\n    path: ./drop2\n"
    } else {
        ""
    };
    format!(
        "state_dir: ./state\nworkers: 4\nshutdown_timeout: 10s\n\
log: {{ level: \"info,hotfolder=debug\" }}\nhttp: {{ listen: \"{address}\" }}\n{extra}\n\
defaults:\n  stable_for: 300ms\n  rescan_every: 2s\n  retry: {{ max_attempts: 3, initial_backoff: 100ms, max_backoff: 500ms }}\n\
watches:\n  - name: drop\n    path: ./drop\n{drop2}\
providers:\n{providers}\
rules:\n{rules}"
    )
}

const ARCHIVE: &str = "  archive: { type: folder, path: ./outbox }\n";
const ALL_TO_ARCHIVE: &str = "  - match: {}\n    provider: archive\n";

/// Wait until the daemon's log has said `needle` `times` times.
fn wait_for_log(daemon: &common::Daemon, needle: &str, times: usize) {
    wait_for(
        &format!("{times} × {needle:?} in the log"),
        Duration::from_secs(20),
        || (daemon.log().matches(needle).count() >= times).then_some(()),
    );
}

fn done_count(fx: &Fixture, n: usize, what: &str) {
    wait_for(what, Duration::from_secs(30), || {
        (in_state(&fx.status(), "done").len() >= n).then_some(())
    });
}

#[test]
fn sighup_takes_a_new_watch_provider_rule_limit_and_webhook_without_a_restart() {
    let address = free_address();
    let fx = Fixture::new();
    fx.write_raw_config(&config(&address, false, ARCHIVE, ALL_TO_ARCHIVE, ""));
    std::fs::create_dir_all(fx.root.join("drop2")).unwrap();
    let daemon = fx.start();
    write_random(&fx.watch.join("first.mp4"), 50_000, 1);
    done_count(&fx, 1, "first.mp4 delivered before the reload");
    let pid = daemon.pid();

    let receiver = common::webhook::Receiver::start(common::webhook::Answer::Take);
    let providers = format!("{ARCHIVE}  second: {{ type: folder, path: ./second }}\n");
    let rules =
        "  - match: { glob: \"b*\" }\n    provider: second\n  - match: {}\n    provider: archive\n";
    let extra = format!(
        "bandwidth: 5MiB/s\nnotify:\n  - {{ url: \"{}\", events: [done] }}\n",
        receiver.url()
    );
    fx.write_raw_config(&config(&address, true, &providers, rules, &extra));
    daemon.signal(libc::SIGHUP);
    wait_for_log(&daemon, "config reloaded", 1);
    let log = daemon.log();
    for said in [
        "watch drop2 added",
        "provider second added",
        "rules changed",
    ] {
        assert!(log.contains(said), "{said:?} in the reload's log:\n{log}");
    }

    write_random(&fx.watch.join("a.mp4"), 50_000, 2);
    write_random(&fx.watch.join("b.mp4"), 50_000, 3);
    write_random(&fx.root.join("drop2/c.mp4"), 50_000, 4);
    done_count(&fx, 4, "the three files after the reload delivered");
    assert_eq!(
        Fixture::files_in(&fx.outbox),
        vec!["a.mp4", "c.mp4", "first.mp4"]
    );
    assert_eq!(Fixture::files_in(&fx.root.join("second")), vec!["b.mp4"]);
    let (_, metrics) = http(&address, "GET", "/metrics", &[]).expect("metrics");
    assert!(
        metrics.contains(&format!(
            "hotfolder_bandwidth_limit_bytes_per_second{{scope=\"all\",name=\"\"}} {}",
            5 * MIB
        )),
        "{metrics}"
    );
    let events = receiver.wait_for_events(3, Duration::from_secs(20));
    let mut files: Vec<String> = events
        .iter()
        .map(|e| e["file"].as_str().unwrap_or_default().to_string())
        .collect();
    files.sort();
    assert_eq!(files, vec!["a.mp4", "b.mp4", "c.mp4"], "{events:?}");
    assert_eq!(daemon.pid(), pid, "the same process all along");
}

#[test]
fn a_bad_config_is_refused_with_its_position_and_the_running_one_stays() {
    let address = free_address();
    let fx = Fixture::new();
    let good = config(&address, false, ARCHIVE, ALL_TO_ARCHIVE, "");
    fx.write_raw_config(&good);
    let daemon = fx.start();

    // Not YAML, then YAML whose rule names no provider: both refused with
    // where the mistake is, through the API and the command line.
    let broken_yaml = good.replace("workers: 4", "workers: [4");
    let unknown_provider = good.replace("provider: archive", "provider: archiv");
    for (text, position) in [
        (&broken_yaml, "hotfolder.yaml:2:"),
        (&unknown_provider, "hotfolder.yaml:18:5"),
    ] {
        fx.write_raw_config(text);
        let (status, body) = http(&address, "POST", "/api/reload", &[]).expect("answer");
        assert_eq!(status, 422, "{body}");
        assert!(body.contains(position), "{position} in {body}");
        let out = fx.hotfolder(&["reload"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(position), "{position} in {stderr}");
        assert!(stderr.contains("not reloaded"), "{stderr}");
    }
    // One that loads but that the daemon refuses, as a start would: no watch.
    let (head, _) = good.split_once("watches:\n").expect("watches");
    let (_, tail) = good.split_once("providers:\n").expect("providers");
    fx.write_raw_config(&format!("{head}watches: []\nproviders:\n{tail}"));
    let (status, body) = http(&address, "POST", "/api/reload", &[]).expect("answer");
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("hotfolder.yaml:11:1: watches: no watch configured"),
        "{body}"
    );
    let out = fx.hotfolder(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no watch configured") && stderr.contains("not reloaded"),
        "{stderr}"
    );
    fx.write_raw_config(&good);
    wait_for_log(&daemon, "config not reloaded", 4);
    assert!(
        daemon.log().contains("hotfolder.yaml:18:5"),
        "the refusal is logged with its position"
    );
    // Still running on the config it had.
    write_random(&fx.watch.join("still.mp4"), 40_000, 5);
    done_count(&fx, 1, "still.mp4 delivered on the running config");
    assert_eq!(Fixture::files_in(&fx.outbox), vec!["still.mp4"]);

    // A good one: the provider's folder changes; the HTTP address needs a
    // restart, which the answer says, and the API stays where it is.
    let moved = config(
        &free_address(),
        false,
        "  archive: { type: folder, path: ./outbox2 }\n",
        ALL_TO_ARCHIVE,
        "",
    );
    fx.write_raw_config(&moved);
    let said = succeeded(&fx.hotfolder(&["reload"]));
    assert!(said.contains("provider archive changed"), "{said}");
    assert!(
        said.contains("http"),
        "the restart-only key is named: {said}"
    );
    write_random(&fx.watch.join("moved.mp4"), 40_000, 6);
    done_count(&fx, 2, "moved.mp4 delivered to the new folder");
    assert_eq!(
        Fixture::files_in(&fx.root.join("outbox2")),
        vec!["moved.mp4"]
    );
    let (status, _) = http(&address, "GET", "/healthz", &[]).expect("the API where it was");
    assert_eq!(status, 200);
}

#[test]
fn a_job_in_flight_keeps_the_provider_settings_it_started_with() {
    let address = free_address();
    let fx = Fixture::new();
    let first = Sandbox::start(&fx.root.join("sandbox-a"), &["--throttle", "2MiB"]);
    let second = Sandbox::start(&fx.root.join("sandbox-b"), &[]);
    let slow = |endpoint: String| {
        format!("  slow: {{ type: tus, endpoint: \"{endpoint}\", chunk_size: 1MiB }}\n")
    };
    let rules = "  - match: {}\n    provider: slow\n";
    fx.write_raw_config(&config(&address, false, &slow(first.endpoint()), rules, ""));
    let daemon = fx.start();
    write_random(&fx.watch.join("long.mp4"), 8 * MIB, 7);
    fx.wait_for_bytes("long.mp4", MIB, Duration::from_secs(30));

    fx.write_raw_config(&config(
        &address,
        false,
        &slow(second.endpoint()),
        rules,
        "",
    ));
    let (status, body) = http(&address, "POST", "/api/reload", &[]).expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("provider slow changed"), "{body}");
    write_random(&fx.watch.join("after.mp4"), 100_000, 8);
    done_count(&fx, 2, "both files delivered");

    let long = read_json(&fx.done.join("long.mp4.receipt.json"));
    let after = read_json(&fx.done.join("after.mp4.receipt.json"));
    assert_eq!(first.uploads_named("long.mp4").len(), 1, "{long}");
    assert!(second.uploads_named("long.mp4").is_empty(), "{long}");
    assert_eq!(second.uploads_named("after.mp4").len(), 1, "{after}");
    assert!(first.uploads_named("after.mp4").is_empty(), "{after}");
    assert!(
        !daemon.log().contains("starting a new remote upload"),
        "long.mp4 was not restarted elsewhere"
    );
}

#[test]
fn a_reload_that_leaves_a_watch_alone_leaves_it_running() {
    let address = free_address();
    let fx = Fixture::new();
    fx.write_raw_config(&config(&address, false, ARCHIVE, ALL_TO_ARCHIVE, ""));
    // Left in place, said once and counted once.
    std::fs::write(fx.watch.join("empty.mp4"), b"").unwrap();
    let daemon = fx.start();
    wait_for_log(&daemon, "not taken", 1);
    let skipped = || {
        let (_, metrics) = http(&address, "GET", "/metrics", &[]).expect("metrics");
        metrics
            .lines()
            .find(|l| {
                l.starts_with("hotfolder_files_skipped_total{watch=\"drop\",reason=\"empty\"}")
            })
            .map(str::to_string)
    };
    let before = skipped();
    assert!(
        before.as_deref().is_some_and(|l| l.ends_with(" 1")),
        "{before:?}"
    );

    // The provider changes and another watch is added; this watch stays.
    std::fs::create_dir_all(fx.root.join("drop2")).unwrap();
    fx.write_raw_config(&config(
        &address,
        true,
        "  archive: { type: folder, path: ./elsewhere }\n",
        ALL_TO_ARCHIVE,
        "",
    ));
    let (status, body) = http(&address, "POST", "/api/reload", &[]).expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("watch drop2 added"), "{body}");
    write_random(&fx.watch.join("after.mp4"), 30_000, 9);
    done_count(&fx, 1, "after.mp4 delivered");
    assert_eq!(
        Fixture::files_in(&fx.root.join("elsewhere")),
        vec!["after.mp4"]
    );
    assert_eq!(
        skipped(),
        before,
        "the watch did not look at its folder afresh"
    );
    assert_eq!(daemon.log().matches("not taken").count(), 1);

    // The watch itself changes: it starts again (and says so once more).
    fx.write_raw_config(
        &config(
            &address,
            true,
            "  archive: { type: folder, path: ./elsewhere }\n",
            ALL_TO_ARCHIVE,
            "",
        )
        .replace("path: ./drop\n", "path: ./drop\n    stable_for: 200ms\n"),
    );
    let (status, body) = http(&address, "POST", "/api/reload", &[]).expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("watch drop changed"), "{body}");
    wait_for_log(&daemon, "not taken", 2);
}

#[test]
fn jobs_that_had_not_started_do_not_use_what_a_reload_removed() {
    let address = free_address();
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "1MiB"]);
    let providers = format!(
        "{ARCHIVE}  slow: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB, max_concurrent: 1 }}\n  held: {{ type: folder, path: ./held }}\n",
        sandbox.endpoint()
    );
    let rules = "  - match: { glob: \"slow*\" }\n    provider: slow\n  - match: { glob: \"held*\" }\n    provider: held\n  - match: {}\n    provider: archive\n";
    fx.write_raw_config(&config(&address, false, &providers, rules, ""));
    let daemon = fx.start();
    succeeded(&fx.hotfolder(&["pause", "--provider", "held"]));
    write_random(&fx.watch.join("held.mp4"), 20_000, 10);
    write_random(&fx.watch.join("slow-1.mp4"), 3 * MIB, 11);
    fx.wait_for_bytes("slow-1.mp4", 1, Duration::from_secs(30));
    // slow-2 waits for slow's only slot; held.mp4 waits for a resume.
    write_random(&fx.watch.join("slow-2.mp4"), 20_000, 12);
    wait_for("slow-2 and held queued", Duration::from_secs(20), || {
        let rows = fx.status();
        let queued = |f: &str| {
            rows.iter()
                .any(|r| r["file"] == f && r["state"] == "queued")
        };
        (queued("slow-2.mp4") && queued("held.mp4")).then_some(())
    });

    // Both providers go; their rules too.
    fx.write_raw_config(&config(&address, false, &format!(
        "{ARCHIVE}  slow: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB, max_concurrent: 1 }}\n",
        sandbox.endpoint()
    ).replace("  slow:", "  slower:"), ALL_TO_ARCHIVE, ""));
    let (status, body) = http(&address, "POST", "/api/reload", &[]).expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("provider held was paused and is gone: resumed"),
        "{body}"
    );
    let (_, pauses) = http(&address, "GET", "/api/pauses", &[]).expect("pauses");
    assert_eq!(pauses.trim(), "[]");

    // The upload under way finishes where it started; the two that had not
    // started fail, saying their provider is gone.
    let rows = common::wait_for_outcome(&fx, 1, 2);
    let reason = |file: &str| {
        rows.iter()
            .find(|r| r["file"] == file)
            .and_then(|r| r["last_error"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    for (file, provider) in [("slow-2.mp4", "slow"), ("held.mp4", "held")] {
        assert!(
            reason(file).contains(&format!(
                "provider \"{provider}\" is no longer in the config"
            )),
            "{file}: {}",
            reason(file)
        );
    }
    assert_eq!(sandbox.uploads_named("slow-1.mp4").len(), 1);
    assert!(sandbox.uploads_named("slow-2.mp4").is_empty());
    assert!(!fx.root.join("held").exists() || Fixture::files_in(&fx.root.join("held")).is_empty());
    drop(daemon);
}

#[test]
fn the_command_reaches_a_daemon_whose_file_uses_its_services_variables() {
    let address = free_address();
    let fx = Fixture::new();
    // Only the daemon's environment has OUT_DIR (as with EnvironmentFile=).
    let text = config(
        &address,
        false,
        "  archive: { type: folder, path: \"${OUT_DIR}\" }\n",
        ALL_TO_ARCHIVE,
        "",
    );
    fx.write_raw_config(&text);
    let _daemon = fx.start_node(&fx.config, &[("OUT_DIR", "./outbox")]);
    fx.write_raw_config(&text.replace("workers: 4", "workers: 3"));
    let said = succeeded(&fx.hotfolder(&["reload"]));
    assert!(said.contains("workers 4 → 3"), "{said}");

    // Another file than the daemon's: said, not silently ignored.
    let other = fx.root.join("other.yaml");
    std::fs::write(&other, text.replace("workers: 4", "workers: 2")).unwrap();
    let out = fx.hotfolder_with(&other, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the daemon runs on"), "{stderr}");
}
