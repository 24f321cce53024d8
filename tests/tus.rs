//! The tus provider against `hotfolder sandbox`, the strict tus simulator,
//! driving the real binary: deliveries through injected faults, `kill -9`
//! mid-upload, a source changed mid-upload, an upload gone on the server,
//! misconfiguration (no server, wrong path, refused credentials), and the
//! one-shot `hotfolder upload` across a server restart.

mod common;

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sandbox::{Sandbox, tus_provider};
use common::{ConfigParts, Daemon, Fixture, read_json, same_bytes, sha256, wait_for, write_random};

const MIB: u64 = 1 << 20;

/// Poll status until `count` jobs are done; panics at once when a job
/// fails, which none of the callers expects.
fn wait_settled(
    fx: &Fixture,
    daemon: &Daemon,
    count: usize,
    deadline: Duration,
) -> Vec<serde_json::Value> {
    wait_for(&format!("{count} jobs settled"), deadline, || {
        let rows = fx.status();
        let failed = common::in_state(&rows, "failed");
        assert!(
            failed.is_empty(),
            "unexpected failure: {failed:?}\nlog:\n{}",
            daemon.log()
        );
        (common::in_state(&rows, "done").len() == count).then_some(rows)
    })
}

/// Several files, most of them several chunks long, through 500s, dropped
/// connections and 429s: every file arrives byte-identical, as exactly one
/// live remote upload, with a receipt naming it. `TUS_SEED=N` replays the
/// run with other fault dice.
#[test]
fn faults_every_file_arrives_once_byte_identical() {
    let seed = std::env::var("TUS_SEED").unwrap_or_else(|_| "17".into());
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &[
            "--fail-rate",
            "0.15",
            "--reset-rate",
            "0.1",
            "--rate-limit-every",
            "7",
            "--seed",
            &seed,
        ],
    );
    let retry = "retry: { max_attempts: 40, initial_backoff: 20ms, max_backoff: 200ms }";
    let providers = format!(
        "{}{}",
        tus_provider(
            "t1",
            &sandbox.endpoint(),
            &format!("chunk_size: 1MiB, {retry}")
        ),
        tus_provider(
            "t3",
            &sandbox.endpoint(),
            &format!("chunk_size: 3MiB, {retry}")
        ),
    );
    fx.write_config_parts(ConfigParts {
        providers: &providers,
        rules: Some(
            "- match: { glob: \"small/**\" }\n  provider: t1\n  metadata: { title: \"{stem}\" }\n\
             - match: {}\n  provider: t3\n  metadata: { title: \"{stem}\" }",
        ),
        ..ConfigParts::default()
    });
    let files: [(&str, u64); 6] = [
        ("small/a.mp4", 1024),
        ("small/b.mp4", 700 * 1024),
        ("small/c.mp4", 5 * MIB + 123),
        ("d.mov", 9 * MIB),
        ("e.mxf", 13 * MIB + 7),
        ("f.mkv", 20 * MIB - 1),
    ];
    let mut hashes = Vec::new();
    for (i, (name, size)) in files.iter().enumerate() {
        let path = fx.watch.join(name);
        write_random(&path, *size, 100 + i as u64);
        hashes.push(sha256(&path));
    }

    let started = Instant::now();
    let daemon = fx.start();
    wait_settled(&fx, &daemon, files.len(), Duration::from_secs(60));
    let stats = sandbox.stats();
    eprintln!(
        "6 files through faults in {:?}: {stats:?}",
        started.elapsed()
    );
    assert!(
        stats.failures > 0 && stats.resets > 0 && stats.rate_limited > 0,
        "the faults were injected: {stats:?}"
    );
    for ((name, size), hash) in files.iter().zip(&hashes) {
        let base = name.rsplit('/').next().unwrap_or(name);
        let live: Vec<_> = sandbox
            .uploads_named(base)
            .into_iter()
            .filter(|u| !u.terminated)
            .collect();
        assert_eq!(live.len(), 1, "exactly one live upload of {name}: {live:?}");
        let upload = &live[0];
        assert!(upload.complete(), "{upload:?}");
        assert_eq!(upload.length, *size);
        assert_eq!(
            &sha256(&sandbox.bin(&upload.id)),
            hash,
            "{name} arrived byte-identical"
        );
        let receipt = read_json(&fx.done.join(format!("{name}.receipt.json")));
        assert_eq!(receipt["sha256"], hash.as_str(), "{receipt}");
        assert_eq!(receipt["remote_id"], upload.id.as_str(), "{receipt}");
        assert!(fx.done.join(name).exists(), "{name} filed in done/");
    }
}

/// `kill -9` at about 30% and again at about 70% of a large upload: each
/// restart resumes from the server's offset on the same remote upload, and
/// the server receives at most one chunk again per crash.
#[test]
fn kill_9_twice_resumes_the_same_upload() {
    const SIZE: u64 = 200 * MIB;
    const CHUNK: u64 = 4 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "40MiB"]);
    fx.write_tus_config(
        &sandbox.endpoint(),
        "chunk_size: 4MiB, retry: { max_attempts: 20, initial_backoff: 50ms, max_backoff: 500ms }",
    );
    let source = fx.watch.join("big.mp4");
    write_random(&source, SIZE, 7);

    let started = Instant::now();
    let mut daemon = fx.start();
    let mut logs = Vec::new();
    for percent in [30, 70] {
        // By bytes received, which move mid-request, and half a chunk past
        // a chunk boundary: the kill lands inside a chunk, whose received
        // part is lost with the connection.
        let target = SIZE * percent / 100 + CHUNK / 2;
        let seen = sandbox.wait_for_upload(
            "big.mp4",
            &format!("{percent}% received"),
            Duration::from_secs(60),
            |u| u.bytes_received >= target,
        );
        daemon.kill9();
        assert!(
            seen.offset < SIZE,
            "finished before the kill at {percent}%; throttle harder"
        );
        logs.push(daemon.log());
        daemon = fx.start();
    }
    let rows = wait_settled(&fx, &daemon, 1, Duration::from_secs(60));
    logs.push(daemon.log());
    eprintln!("200 MiB with two crashes in {:?}", started.elapsed());

    let uploads = sandbox.uploads_named("big.mp4");
    assert_eq!(uploads.len(), 1, "exactly one remote upload: {uploads:?}");
    let upload = &uploads[0];
    assert!(upload.complete(), "{upload:?}");
    assert!(
        same_bytes(&sandbox.bin(&upload.id), &fx.done.join("big.mp4")),
        "the server holds the file's bytes"
    );
    assert!(
        upload.bytes_received <= SIZE + 2 * CHUNK,
        "the server received {} bytes for a {SIZE}-byte file: more than one chunk again per crash",
        upload.bytes_received
    );
    for log in &logs[1..] {
        assert!(
            log.lines().any(|l| l.contains(" resuming ")
                && common::field(l, "offset").is_some_and(|o| o != "0")),
            "a restart resumed from a non-zero offset:\n{log}"
        );
        assert!(!log.contains("starting a new remote upload"), "{log}");
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    let receipt = read_json(&fx.done.join("big.mp4.receipt.json"));
    assert_eq!(receipt["remote_id"], upload.id.as_str(), "{receipt}");
    assert_eq!(receipt["replaced"], serde_json::json!([]), "{receipt}");
}

/// The source grows while it uploads: that upload is terminated on the
/// server, the file is taken again once stable, and the one complete upload
/// holds the new content.
#[test]
fn source_changed_mid_upload_terminates_and_uploads_the_new_file() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "12MiB"]);
    fx.write_tus_config(
        &sandbox.endpoint(),
        "chunk_size: 2MiB, retry: { max_attempts: 10, initial_backoff: 50ms, max_backoff: 500ms }",
    );
    let source = fx.watch.join("growing.mp4");
    write_random(&source, 24 * MIB, 3);

    let daemon = fx.start();
    let first = sandbox.wait_for_offset("growing.mp4", 4 * MIB, Duration::from_secs(30));
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&source)
        .expect("open for append");
    file.write_all(&vec![0x5a; MIB as usize]).expect("append");
    file.sync_all().expect("sync");
    drop(file);
    let new_hash = sha256(&source);

    let rows = wait_settled(&fx, &daemon, 1, Duration::from_secs(60));
    assert_eq!(rows.len(), 2, "the changed file is a new job: {rows:?}");
    assert_eq!(common::in_state(&rows, "superseded").len(), 1, "{rows:?}");

    let uploads = sandbox.uploads_named("growing.mp4");
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    let old = uploads
        .iter()
        .find(|u| u.id == first.id)
        .expect("the first upload");
    assert!(old.terminated, "the abandoned upload was deleted: {old:?}");
    let complete: Vec<_> = uploads.iter().filter(|u| u.complete()).collect();
    assert_eq!(complete.len(), 1, "{uploads:?}");
    assert_eq!(complete[0].length, 25 * MIB);
    assert_eq!(
        sha256(&sandbox.bin(&complete[0].id)),
        new_hash,
        "the new content arrived"
    );
    let receipt = read_json(&fx.done.join("growing.mp4.receipt.json"));
    assert_eq!(receipt["sha256"], new_hash.as_str(), "{receipt}");
    assert_eq!(receipt["remote_id"], complete[0].id.as_str(), "{receipt}");
}

/// A stored upload URL answers 404 after a restart (deleted on the server
/// while the daemon was down): a new upload is made, completes, and the
/// receipt names the old one.
#[test]
fn upload_gone_after_restart_is_replaced_and_named() {
    const SIZE: u64 = 48 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "16MiB"]);
    fx.write_tus_config(
        &sandbox.endpoint(),
        "chunk_size: 4MiB, retry: { max_attempts: 10, initial_backoff: 50ms, max_backoff: 500ms }",
    );
    let source = fx.watch.join("gone.mp4");
    write_random(&source, SIZE, 11);
    let hash = sha256(&source);

    let mut daemon = fx.start();
    let old = sandbox.wait_for_offset("gone.mp4", SIZE / 4, Duration::from_secs(30));
    daemon.kill9();
    assert_eq!(sandbox.terminate(&old.id), 204, "DELETE of the upload");
    let daemon = fx.start();
    wait_settled(&fx, &daemon, 1, Duration::from_secs(60));
    assert!(
        daemon.log().contains("starting a new remote upload"),
        "{}",
        daemon.log()
    );

    let uploads = sandbox.uploads_named("gone.mp4");
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    let live: Vec<_> = uploads.iter().filter(|u| !u.terminated).collect();
    assert_eq!(live.len(), 1, "{uploads:?}");
    assert!(live[0].complete(), "{:?}", live[0]);
    assert_ne!(live[0].id, old.id);
    assert_eq!(sha256(&sandbox.bin(&live[0].id)), hash);
    let receipt = read_json(&fx.done.join("gone.mp4.receipt.json"));
    assert_eq!(receipt["remote_id"], live[0].id.as_str(), "{receipt}");
    let replaced = receipt["replaced"].as_array().expect("replaced list");
    assert!(
        replaced
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains(&old.id))),
        "the receipt names the replaced upload {}: {receipt}",
        old.id
    );
}

/// No server, a path the server does not serve, and refused credentials:
/// each job fails after a bounded number of tries with a report naming the
/// cause, and the credential never shows up in reports, status or the log.
#[test]
fn misconfigured_endpoints_fail_clearly_without_a_retry_storm() {
    const SECRET: &str = "s3cret-wrong-token-value";
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--tus-token", "the-right-token"],
    );
    let retry =
        "chunk_size: 1MiB, retry: { max_attempts: 3, initial_backoff: 50ms, max_backoff: 200ms }";
    let providers = [
        tus_provider("nolisten", "http://127.0.0.1:1/files/", retry),
        tus_provider(
            "nopath",
            &format!("http://{}/nope/files/", sandbox.addr),
            retry,
        ),
        tus_provider("noauth", &sandbox.endpoint(), retry),
        tus_provider(
            "badauth",
            &sandbox.endpoint(),
            &format!("{retry}, headers: {{ Authorization: \"Bearer {SECRET}\" }}"),
        ),
    ]
    .concat();
    let rules: String = ["nolisten", "nopath", "noauth", "badauth"]
        .iter()
        .map(|p| format!("- match: {{ glob: \"{p}/**\" }}\n  provider: {p}\n"))
        .collect();
    fx.write_config_parts(ConfigParts {
        providers: &providers,
        rules: Some(&rules),
        ..ConfigParts::default()
    });
    for (i, dir) in ["nolisten", "nopath", "noauth", "badauth"]
        .iter()
        .enumerate()
    {
        write_random(&fx.watch.join(dir).join("clip.mp4"), 3 * MIB, i as u64);
    }

    let daemon = fx.start();
    let rows = wait_for("four jobs failed", Duration::from_secs(30), || {
        let rows = fx.status();
        (common::in_state(&rows, "failed").len() == 4).then_some(rows)
    });

    let report = |dir: &str| read_json(&fx.failed.join(dir).join("clip.mp4.error.json"));
    let nolisten = report("nolisten");
    assert!(
        nolisten["reason"]
            .as_str()
            .unwrap_or("")
            .contains("could not connect to 127.0.0.1:1"),
        "{nolisten}"
    );
    assert_eq!(
        nolisten["attempts"], 3,
        "retried up to max_attempts: {nolisten}"
    );
    let nopath = report("nopath");
    assert_eq!(nopath["status"], 404, "{nopath}");
    let reason = nopath["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("404") && reason.contains("endpoint"),
        "{nopath}"
    );
    assert_eq!(nopath["attempts"], 1, "a 404 is not retried: {nopath}");
    for dir in ["noauth", "badauth"] {
        let r = report(dir);
        assert_eq!(r["status"], 401, "{r}");
        let reason = r["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("401") && reason.contains("credentials"),
            "{r}"
        );
        assert_eq!(r["attempts"], 1, "a 401 is not retried: {r}");
    }
    // A discovery and a creation per provider at most: no retry storm.
    let stats = sandbox.stats();
    assert!(stats.requests <= 6, "{stats:?}");
    assert!(sandbox.uploads().is_empty(), "{:?}", sandbox.uploads());

    let mut everything = daemon.log();
    for dir in ["nolisten", "nopath", "noauth", "badauth"] {
        everything.push_str(
            &fs::read_to_string(fx.failed.join(dir).join("clip.mp4.error.json"))
                .unwrap_or_default(),
        );
    }
    everything.push_str(&serde_json::to_string(&rows).unwrap_or_default());
    assert!(
        !everything.contains(SECRET),
        "the credential leaked:\n{everything}"
    );
}

/// `hotfolder upload` of three files while the server restarts once in the
/// middle: every file completes byte-identical, each on the upload it
/// started (resumed, not restarted), and the command exits 0.
#[test]
fn one_shot_upload_survives_a_server_restart() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let mut sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "24MiB"]);
    fx.write_tus_config(
        &sandbox.endpoint(),
        "chunk_size: 2MiB, retry: { max_attempts: 20, initial_backoff: 100ms, max_backoff: 1s }",
    );
    let names = ["one.mp4", "two.mp4", "three.mp4"];
    let clips = fx.root.join("clips");
    for (i, name) in names.iter().enumerate() {
        write_random(&clips.join(name), SIZE, 40 + i as u64);
    }
    let stdout = fx.root.join("upload.stdout");
    let stderr = fx.root.join("upload.stderr");
    let mut upload = KillOnDrop(
        Command::new(common::bin())
            .arg("upload")
            .arg("-c")
            .arg(&fx.config)
            .args(["--provider", "t"])
            .args(names.iter().map(|n| clips.join(n)))
            .current_dir(&fx.root)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn hotfolder upload"),
    );

    let started = Instant::now();
    wait_for(
        "40% of the bytes committed",
        Duration::from_secs(30),
        || {
            let committed: u64 = sandbox.uploads().iter().map(|u| u.offset).sum();
            (committed >= 3 * SIZE * 4 / 10).then_some(())
        },
    );
    sandbox.kill();
    sandbox.start_again();
    let status = wait_for("hotfolder upload to exit", Duration::from_secs(60), || {
        upload.0.try_wait().expect("try_wait")
    });
    eprintln!(
        "3 x 24 MiB with a server restart in {:?}",
        started.elapsed()
    );
    let stdout = fs::read_to_string(&stdout).unwrap_or_default();
    let log = fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        status.success(),
        "exit {status:?}\nstdout:\n{stdout}\nstderr:\n{log}"
    );
    assert!(log.contains("% of"), "progress lines on stderr:\n{log}");
    for name in names {
        let uploads = sandbox.uploads_named(name);
        assert_eq!(
            uploads.len(),
            1,
            "one upload of {name}, resumed: {uploads:?}"
        );
        assert!(uploads[0].complete(), "{:?}", uploads[0]);
        assert!(
            same_bytes(&sandbox.bin(&uploads[0].id), &clips.join(name)),
            "{name} byte-identical"
        );
        assert!(stdout.contains(&format!("{name}: uploaded")), "{stdout}");
    }
}

/// A child process killed (SIGKILL) and reaped when the test ends, so a
/// failing test leaves no upload running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The partial uploads of a parallel delivery (none from other jobs here).
fn partials(sandbox: &Sandbox) -> Vec<common::sandbox::TusUpload> {
    sandbox
        .uploads()
        .into_iter()
        .filter(|u| u.concat.as_deref() == Some("partial"))
        .collect()
}

/// `parallel: 4` against a server offering `concatenation`: four partial
/// uploads filled side by side (several bodies at once on the server),
/// each byte sent once, then one final upload that joins them in order,
/// carries the file's metadata, holds its bytes and is the receipt's.
#[test]
fn parallel_parts_are_sent_side_by_side_and_joined_in_order() {
    const SIZE: u64 = 38 * MIB; // 10 chunks of 4 MiB: lanes of 3, 3, 2 and 2
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "64MiB"]);
    fx.write_tus_config(&sandbox.endpoint(), "chunk_size: 4MiB, parallel: 4");
    write_random(&fx.watch.join("wide.mp4"), SIZE, 31);
    let daemon = fx.start();
    wait_settled(&fx, &daemon, 1, Duration::from_secs(60));

    let parts = partials(&sandbox);
    assert_eq!(parts.len(), 4, "{parts:?}");
    assert!(parts.iter().all(|p| p.complete()), "{parts:?}");
    let received: u64 = parts.iter().map(|p| p.bytes_received).sum();
    assert_eq!(received, SIZE, "no byte sent twice: {parts:?}");
    let finals = sandbox.uploads_named("wide.mp4");
    assert_eq!(finals.len(), 1, "one final upload: {finals:?}");
    let joined = &finals[0];
    assert_eq!(joined.concat.as_deref(), Some("final"), "{joined:?}");
    assert!(joined.complete(), "{joined:?}");
    let by_length: Vec<u64> = joined
        .parts
        .iter()
        .map(|id| parts.iter().find(|p| p.id == *id).map_or(0, |p| p.length))
        .collect();
    assert_eq!(
        by_length,
        [12 * MIB, 12 * MIB, 8 * MIB, 6 * MIB],
        "in file order"
    );
    assert!(
        same_bytes(&sandbox.bin(&joined.id), &fx.done.join("wide.mp4")),
        "the joined upload holds the file's bytes"
    );
    let peak = sandbox.stats().bodies_in_flight_peak;
    assert!(peak >= 2, "parts went one at a time (peak {peak})");
    let receipt = read_json(&fx.done.join("wide.mp4.receipt.json"));
    assert_eq!(receipt["remote_id"], joined.id.as_str(), "{receipt}");
}

/// `kill -9` while the four parts are in flight, then a restart: each part
/// goes on from the offset its server reports (HEAD on the partial upload),
/// so at most the chunk each had in flight is sent again; the same partial
/// uploads are joined, once.
#[test]
fn kill_9_mid_parallel_parts_resumes_each_part_where_its_server_stands() {
    const SIZE: u64 = 96 * MIB;
    const CHUNK: u64 = 4 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "32MiB"]);
    fx.write_tus_config(
        &sandbox.endpoint(),
        "chunk_size: 4MiB, parallel: 4, retry: { max_attempts: 20, initial_backoff: 50ms, max_backoff: 500ms }",
    );
    write_random(&fx.watch.join("wide.mp4"), SIZE, 32);
    let mut daemon = fx.start();
    // Half a chunk past 40% of the bytes: every lane is inside a chunk.
    wait_for("40% of the parts received", Duration::from_secs(60), || {
        let parts = partials(&sandbox);
        let received: u64 = parts.iter().map(|p| p.bytes_received).sum();
        (parts.len() == 4 && received >= SIZE * 4 / 10 + CHUNK / 2).then_some(())
    });
    daemon.kill9();
    let first_log = daemon.log();
    assert!(
        sandbox.uploads_named("wide.mp4").is_empty(),
        "joined before the kill; throttle harder"
    );

    let daemon = fx.start();
    wait_settled(&fx, &daemon, 1, Duration::from_secs(90));
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("resuming the parallel parts")
                && common::field(l, "acked").is_some_and(|a| a != "0")),
        "the restart resumed the parts where they stood:\n{log}"
    );
    assert!(!log.contains("starting a new remote upload"), "{log}");
    let parts = partials(&sandbox);
    assert_eq!(parts.len(), 4, "the same four partial uploads: {parts:?}");
    let received: u64 = parts.iter().map(|p| p.bytes_received).sum();
    assert!(
        received <= SIZE + 4 * CHUNK,
        "the server received {received} bytes for {SIZE}: more than the chunks in flight again\n{first_log}"
    );
    let finals = sandbox.uploads_named("wide.mp4");
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert!(same_bytes(
        &sandbox.bin(&finals[0].id),
        &fx.done.join("wide.mp4")
    ));
}

/// A crash after every part is acknowledged, just before the request that
/// joins them: the restart joins the same parts once, and the receipt names
/// the join a crash inside it could have left (no lookup exists for it).
#[test]
fn crash_before_the_join_joins_the_same_parts_once() {
    const SIZE: u64 = 20 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    fx.write_tus_config(&sandbox.endpoint(), "chunk_size: 4MiB, parallel: 3");
    write_random(&fx.watch.join("join.mp4"), SIZE, 33);
    let log = fx.run_until_failpoint("lanes::before_join=return", Duration::from_secs(60));
    assert!(log.contains("failpoint lanes::before_join"), "{log}");
    assert!(sandbox.uploads_named("join.mp4").is_empty());

    let daemon = fx.start();
    wait_settled(&fx, &daemon, 1, Duration::from_secs(60));
    let parts = partials(&sandbox);
    assert_eq!(parts.len(), 3, "{parts:?}");
    let received: u64 = parts.iter().map(|p| p.bytes_received).sum();
    assert_eq!(received, SIZE, "no part sent again: {parts:?}");
    let finals = sandbox.uploads_named("join.mp4");
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert!(same_bytes(
        &sandbox.bin(&finals[0].id),
        &fx.done.join("join.mp4")
    ));
    let receipt = read_json(&fx.done.join("join.mp4.receipt.json"));
    assert!(
        receipt["replaced"].to_string().contains("joined upload"),
        "{receipt}"
    );
}

/// A partial upload deleted on the server mid-upload (as one that expires
/// before the join would be): that part alone is sent again, on a new
/// partial upload (PROTOCOLS §5: "resend that part"); the other parts keep
/// their uploads and are joined with it in file order; the receipt names
/// the lost part by id, never by URL.
#[test]
fn a_part_gone_mid_upload_is_sent_again_alone() {
    const SIZE: u64 = 32 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "32MiB"]);
    fx.write_tus_config(
        &sandbox.endpoint(),
        "chunk_size: 4MiB, parallel: 4, retry: { max_attempts: 20, initial_backoff: 50ms, max_backoff: 500ms }",
    );
    write_random(&fx.watch.join("gone.mp4"), SIZE, 34);
    let daemon = fx.start();
    let first = wait_for("a part half sent", Duration::from_secs(60), || {
        partials(&sandbox)
            .into_iter()
            .find(|p| p.bytes_received >= 2 * MIB && !p.complete())
    });
    let others: Vec<String> = partials(&sandbox)
        .into_iter()
        .filter(|p| p.id != first.id)
        .map(|p| p.id)
        .collect();
    assert_eq!(sandbox.terminate(&first.id), 204);
    wait_settled(&fx, &daemon, 1, Duration::from_secs(90));

    let finals = sandbox.uploads_named("gone.mp4");
    assert_eq!(finals.len(), 1, "{finals:?}");
    let joined = &finals[0];
    assert!(same_bytes(
        &sandbox.bin(&joined.id),
        &fx.done.join("gone.mp4")
    ));
    assert_eq!(
        partials(&sandbox).len(),
        5,
        "one new part: {:?}",
        partials(&sandbox)
    );
    assert!(!joined.parts.contains(&first.id), "{joined:?}");
    for id in &others {
        assert!(
            joined.parts.contains(id),
            "{id} kept its upload: {joined:?}"
        );
    }
    assert!(
        daemon.log().contains("sending that part again"),
        "{}",
        daemon.log()
    );
    let receipt = read_json(&fx.done.join("gone.mp4.receipt.json"));
    let replaced = receipt["replaced"].to_string();
    assert!(
        replaced.contains(&format!("parallel part {}", first.id)),
        "{receipt}"
    );
    assert!(
        !replaced.contains("http"),
        "no part URL in the receipt: {receipt}"
    );
}
