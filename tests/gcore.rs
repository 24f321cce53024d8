//! The Gcore provider against `hotfolder sandbox`'s strict Gcore simulator
//! (API key, video creation, upload parameters naming a tus server and a
//! token, the tus leg insisting on token/video_id/client_id, status moving
//! empty → pending → viewable → ready), driving the real binary: three
//! sizes delivered byte-identical, injected faults, `kill -9` mid-upload,
//! an upload token that expires while the upload runs, refused
//! credentials, and `wait_until: ready` through `hotfolder upload`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::providers::{
    GENEROUS_RETRY, MIB, assert_secret_absent, fault_options, gcore_provider, id_of, wait_done,
    wait_failed,
};
use common::sandbox::{Sandbox, TusUpload};
use common::{Fixture, sha256, write_random};
use serde_json::Value;

const CHUNK: u64 = 2 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}" }"#;

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// The only live Gcore video named `title`, and the tus upload carrying it.
fn only_video(sandbox: &Sandbox, title: &str) -> (Value, TusUpload) {
    let mut videos: Vec<Value> = sandbox
        .records_where("gcore", "name", title)
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .collect();
    assert_eq!(
        videos.len(),
        1,
        "exactly one live Gcore video named {title}: {videos:?}"
    );
    let video = videos.remove(0);
    let upload_id = video["upload"].as_str().unwrap_or_default().to_string();
    let upload = sandbox
        .uploads()
        .into_iter()
        .find(|u| u.id == upload_id)
        .unwrap_or_else(|| panic!("the tus upload {upload_id:?} of {video}"));
    (video, upload)
}

/// A delivered file: one live video whose tus upload holds its bytes, with
/// the metadata Gcore requires, no other live upload of it, and a receipt
/// naming the video.
fn assert_delivered(
    fx: &Fixture,
    sandbox: &Sandbox,
    name: &str,
    size: u64,
    hash: &str,
) -> (Value, TusUpload) {
    let (video, upload) = only_video(sandbox, stem(name));
    let id = id_of(&video, "id");
    assert!(upload.complete(), "{upload:?}");
    assert_eq!(upload.length, size, "{upload:?}");
    assert_eq!(upload.metadata.get("video_id"), Some(&id), "{upload:?}");
    assert_eq!(
        upload.metadata.get("client_id").map(String::as_str),
        Some("4242"),
        "{upload:?}"
    );
    assert_eq!(upload.filename(), name, "{upload:?}");
    let live: Vec<TusUpload> = sandbox
        .uploads_named(name)
        .into_iter()
        .filter(|u| !u.terminated)
        .collect();
    assert_eq!(live.len(), 1, "one live tus upload of {name}: {live:?}");
    assert_eq!(
        sha256(&sandbox.bin(&upload.id)),
        hash,
        "{name} arrived byte-identical"
    );
    let receipt = fx.receipt(name);
    assert_eq!(receipt["remote_id"], id.as_str(), "{receipt}");
    assert_eq!(receipt["sha256"], hash, "{receipt}");
    assert!(fx.done.join(name).exists(), "{name} filed in done/");
    (video, upload)
}

/// 1 KiB, 7 MiB and 23 MiB: each arrives byte-identical as one video named
/// from `{stem}` with the rule's description, its bytes on the tus leg with
/// the video's id and client; each receipt names its video.
#[test]
fn three_sizes_arrive_byte_identical_with_their_names() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", METADATA);
    let files = fx.write_sizes(1);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(60));
    eprintln!("three sizes to Gcore in {:?}", started.elapsed());

    for (name, size, hash) in &files {
        let (video, _) = assert_delivered(&fx, &sandbox, name, *size, hash);
        assert_eq!(
            video["description"],
            format!("From drop: {name}"),
            "{video}"
        );
    }
    assert_eq!(
        sandbox.records("gcore").len(),
        files.len(),
        "no other video was made"
    );
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one live video with one complete tus upload.
#[test]
fn faults_one_complete_video_per_file() {
    let fx = Fixture::new();
    let seed = std::env::var("GCORE_SEED").unwrap_or_else(|_| "5".into());
    let options = fault_options(&seed);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &options);
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("chunk_size: 1MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", METADATA);
    let files = fx.write_sizes(10);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(90));
    eprintln!(
        "three sizes to Gcore through faults in {:?}",
        started.elapsed()
    );

    let stats = sandbox.stats();
    assert!(
        stats.failures > 0 && stats.resets > 0 && stats.rate_limited > 0,
        "the faults were injected: {stats:?}"
    );
    for (name, size, hash) in &files {
        assert_delivered(&fx, &sandbox, name, *size, hash);
    }
    let live = sandbox
        .records("gcore")
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .count();
    assert_eq!(live, files.len(), "no other live video");
}

/// `kill -9` about a third of the way in, then a restart: the job asks the
/// tus server its offset (HEAD, no token needed) and goes on on the same
/// upload of the same video; the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_servers_offset() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "8MiB"]);
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", METADATA);
    let source = fx.watch.join("crash.mp4");
    write_random(&source, SIZE, 3);
    let hash = sha256(&source);

    let started = Instant::now();
    let mut daemon = fx.start();
    let seen = sandbox.wait_for_offset("crash.mp4", SIZE * 3 / 10, Duration::from_secs(30));
    daemon.kill9();
    let at_kill = sandbox.settled_record("tus", ("id", &seen.id));
    let offset = at_kill["offset"].as_u64().unwrap_or(0);
    assert!(
        offset < SIZE,
        "finished before the kill; throttle harder: {at_kill}"
    );

    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    eprintln!("24 MiB to Gcore with a crash in {:?}", started.elapsed());

    assert_eq!(
        daemon.resume_offsets().first().copied(),
        Some(offset),
        "resumed from the offset the server reported:\n{}",
        daemon.log()
    );
    let (_, upload) = assert_delivered(&fx, &sandbox, "crash.mp4", SIZE, &hash);
    assert_eq!(upload.id, seen.id, "the same tus upload");
    assert!(
        upload.bytes_received <= SIZE + CHUNK,
        "the server received {} bytes for {SIZE}: more than one chunk again",
        upload.bytes_received
    );
    assert_eq!(sandbox.records("gcore").len(), 1, "no second video");
}

/// Upload tokens that live 1 s against an upload that takes about three:
/// the token is only needed to start the tus session, so the upload runs
/// on past its expiry on the same upload and video.
#[test]
fn an_upload_token_expiring_after_the_start_does_not_break_the_upload() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--token-ttl", "1s", "--throttle", "8MiB"],
    );
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", METADATA);
    let source = fx.watch.join("long.mp4");
    write_random(&source, SIZE, 4);
    let hash = sha256(&source);

    let daemon = fx.start();
    let first = sandbox.wait_for_offset("long.mp4", 1, Duration::from_secs(30));
    let started = Instant::now();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    let took = started.elapsed();
    eprintln!("24 MiB to Gcore with a 1 s token in {took:?}");
    assert!(
        took > Duration::from_secs(2),
        "the upload outlived its token: {took:?}"
    );

    let (_, upload) = assert_delivered(&fx, &sandbox, "long.mp4", SIZE, &hash);
    assert_eq!(
        upload.id, first.id,
        "the upload started with the token finished"
    );
    assert!(upload.bytes_received <= SIZE + CHUNK, "{upload:?}");
    assert_eq!(sandbox.records("gcore").len(), 1, "no second video");
    assert!(!daemon.log().contains("token invalid"), "{}", daemon.log());
}

/// A wrong API key: the job fails at once with a report naming Gcore and
/// the refused key, after one request, and the key shows up nowhere.
#[test]
fn a_wrong_api_key_fails_at_once_without_leaking() {
    const BAD_KEY: &str = "wrong-gcore-key-e04c1b";
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("api_key: \"{BAD_KEY}\", chunk_size: 1MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", METADATA);
    write_random(&fx.watch.join("clip.mp4"), 3 * MIB, 1);

    let daemon = fx.start();
    wait_failed(&fx, 1, Duration::from_secs(30));

    let report = fx.error_report("clip.mp4");
    assert_eq!(report["provider"], "gc", "{report}");
    assert_eq!(report["status"], 401, "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Gcore"), "the report names Gcore: {report}");
    assert!(
        reason.contains("API key was refused"),
        "the report names the cause: {report}"
    );
    assert_eq!(report["attempts"], 1, "not retried: {report}");
    let stats = sandbox.stats();
    assert!(
        stats.requests <= 2,
        "one request, at most one more: {stats:?}"
    );
    assert!(sandbox.records("gcore").is_empty());
    assert_secret_absent(&fx, &daemon, BAD_KEY);
}

/// `wait_until: ready` through `hotfolder upload`: the command returns only
/// once the video's status reached `ready`, and says where it plays.
#[test]
fn wait_until_ready_waits_for_ready() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = gcore_provider(
        "gc",
        &sandbox,
        &format!("chunk_size: 2MiB, wait_until: ready, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "gc", METADATA);
    let clip = fx.root.join("clips/ready.mp4");
    write_random(&clip, 3 * MIB, 6);
    let hash = sha256(&clip);

    let started = Instant::now();
    let out = std::process::Command::new(common::bin())
        .args(["upload", "-c"])
        .arg(&fx.config)
        .args(["--provider", "gc"])
        .arg(&clip)
        .current_dir(&fx.root)
        .stdin(Stdio::null())
        .output()
        .expect("run hotfolder upload");
    eprintln!(
        "hotfolder upload with wait_until: ready in {:?}",
        started.elapsed()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    let (video, upload) = only_video(&sandbox, "ready");
    assert_eq!(video["status"], "ready", "{video}");
    assert!(upload.complete(), "{upload:?}");
    assert_eq!(sha256(&sandbox.bin(&upload.id)), hash);
    let id = id_of(&video, "id");
    assert!(
        stdout.contains("ready.mp4: uploaded") && stdout.contains(&id),
        "the command names where the video plays:\n{stdout}"
    );
}
