//! The api.video provider against `hotfolder sandbox`'s strict api.video
//! simulator (API-key tokens with refresh, videos tagged with the job,
//! multipart chunks of at least 5 MiB, status with received ranges),
//! driving the real daemon: three sizes delivered byte-identical with
//! their metadata, injected faults, `kill -9` mid-upload, access tokens
//! expiring mid-upload, and refused credentials.

mod common;

use std::time::{Duration, Instant};

use common::providers::{
    GENEROUS_RETRY, MIB, apivideo_provider, assert_secret_absent, fault_options, id_of, wait_done,
    wait_failed,
};
use common::sandbox::Sandbox;
use common::{ConfigParts, Fixture, sha256, write_random};
use serde_json::{Value, json};

const CHUNK: u64 = 5 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}", tags: [news, "{watch}"], public: false }"#;

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// The only live api.video video titled `title`.
fn only_video(sandbox: &Sandbox, title: &str) -> Value {
    let mut videos: Vec<Value> = sandbox
        .records_where("apivideo", "title", title)
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .collect();
    assert_eq!(
        videos.len(),
        1,
        "exactly one live video titled {title}: {videos:?}"
    );
    videos.remove(0)
}

/// A delivered file: one complete video holding its bytes, tagged with the
/// job, and a receipt naming it.
fn assert_delivered(fx: &Fixture, sandbox: &Sandbox, name: &str, size: u64, hash: &str) -> Value {
    let video = only_video(sandbox, stem(name));
    let id = id_of(&video, "video_id");
    assert_eq!(video["complete"], true, "{video}");
    assert_eq!(video["received"], size, "every byte arrived: {video}");
    assert_eq!(
        sha256(&sandbox.video_bin("apivideo", &id)),
        hash,
        "{name} arrived byte-identical"
    );
    let receipt = fx.receipt(name);
    assert_eq!(receipt["remote_id"], id.as_str(), "{receipt}");
    assert_eq!(receipt["sha256"], hash, "{receipt}");
    let job = receipt["job"].to_string();
    assert!(
        video["metadata"]
            .as_array()
            .is_some_and(|m| m.contains(&json!({"key": "hotfolder_job", "value": job}))),
        "the video is tagged with its job {job}: {video}"
    );
    assert!(fx.done.join(name).exists(), "{name} filed in done/");
    video
}

/// 1 KiB, 7 MiB and 23 MiB in 5 MiB chunks: each arrives byte-identical as
/// one video with the rule's title (`{stem}`), description, tags, public
/// flag and the job tag; each receipt names its video and its player.
#[test]
fn three_sizes_arrive_byte_identical_with_metadata() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", METADATA);
    let files = fx.write_sizes(1);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(60));
    eprintln!("three sizes to api.video in {:?}", started.elapsed());

    for (name, size, hash) in &files {
        let video = assert_delivered(&fx, &sandbox, name, *size, hash);
        assert_eq!(
            video["description"],
            format!("From drop: {name}"),
            "{video}"
        );
        assert_eq!(video["tags"], json!(["news", "drop"]), "{video}");
        assert_eq!(video["public"], false, "{video}");
        let receipt = fx.receipt(name);
        let id = id_of(&video, "video_id");
        assert!(
            receipt["url"].as_str().is_some_and(|u| u.contains(&id)),
            "the receipt carries the player URL: {receipt}"
        );
    }
    assert_eq!(sandbox.records("apivideo").len(), files.len());
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one live, complete video.
#[test]
fn faults_one_complete_video_per_file() {
    let fx = Fixture::new();
    let seed = std::env::var("APIVIDEO_SEED").unwrap_or_else(|_| "5".into());
    let options = fault_options(&seed);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &options);
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", METADATA);
    let files = fx.write_sizes(10);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(90));
    eprintln!(
        "three sizes to api.video through faults in {:?}",
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
        .records("apivideo")
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .count();
    assert_eq!(live, files.len(), "no other video was made");
}

/// `kill -9` about a third of the way in, then a restart: the job reads the
/// video's status and goes on from the received bytes on the same video;
/// the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_servers_offset() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "8MiB"]);
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", METADATA);
    let source = fx.watch.join("crash.mp4");
    write_random(&source, SIZE, 3);
    let hash = sha256(&source);

    let started = Instant::now();
    let mut daemon = fx.start();
    sandbox.wait_for_record(
        "apivideo",
        ("title", "crash"),
        ("received", SIZE * 3 / 10),
        Duration::from_secs(30),
    );
    daemon.kill9();
    let at_kill = sandbox.settled_record("apivideo", ("title", "crash"));
    let received = at_kill["received"].as_u64().unwrap_or(0);
    assert!(
        received < SIZE,
        "finished before the kill; throttle harder: {at_kill}"
    );

    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    eprintln!(
        "24 MiB to api.video with a crash in {:?}",
        started.elapsed()
    );

    assert_eq!(
        daemon.resume_offsets().first().copied(),
        Some(received),
        "resumed from the offset the server reported:\n{}",
        daemon.log()
    );
    let video = assert_delivered(&fx, &sandbox, "crash.mp4", SIZE, &hash);
    let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
    assert!(
        bytes <= SIZE + CHUNK,
        "the server received {bytes} bytes for {SIZE}: more than one chunk again"
    );
    assert_eq!(sandbox.records("apivideo").len(), 1, "no second video");
}

/// The window a crash leaves inside a chunk: the server stored the chunk,
/// but the daemon died before it persisted the acknowledgement. Here the
/// test plays the part of that last request after a `kill -9`. On restart
/// the job goes on from what the server's status confirms instead of
/// sending that chunk again (which the strict simulator, like a server that
/// wants ranges to continue the upload, would refuse).
#[test]
fn chunk_stored_but_not_recorded_before_a_crash_is_not_sent_again() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "8MiB"]);
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", METADATA);
    let source = fx.watch.join("window.mp4");
    write_random(&source, SIZE, 5);
    let hash = sha256(&source);

    let mut daemon = fx.start();
    sandbox.wait_for_record(
        "apivideo",
        ("title", "window"),
        ("received", CHUNK),
        Duration::from_secs(30),
    );
    daemon.kill9();
    let at_kill = sandbox.settled_record("apivideo", ("title", "window"));
    let received = at_kill["received"].as_u64().unwrap_or(0);
    assert!(
        received + CHUNK < SIZE,
        "too far along for this test: {at_kill}"
    );
    let checkpoint = fx.status()[0]["bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        checkpoint <= received,
        "the database holds {checkpoint}, the server {received}"
    );

    // The next chunk, stored by the server, acknowledged to nobody.
    let (status, body) = common::providers::http_with_body(
        &sandbox.addr,
        "POST",
        "/auth/api-key",
        &[("Content-Type", "application/json")],
        br#"{"apiKey": "sandbox-api-key"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).expect("token JSON");
    let bearer = format!(
        "Bearer {}",
        token["access_token"].as_str().unwrap_or_default()
    );
    let bytes = std::fs::read(&source).expect("read source");
    let chunk = &bytes[received as usize..(received + CHUNK) as usize];
    let mut multipart = b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"window.mp4\"\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
    multipart.extend_from_slice(chunk);
    multipart.extend_from_slice(b"\r\n--b0undary--\r\n");
    let range = format!("bytes {received}-{}/{SIZE}", received + CHUNK - 1);
    let id = id_of(&at_kill, "video_id");
    let (status, body) = common::providers::http_with_body(
        &sandbox.addr,
        "POST",
        &format!("/videos/{id}/source"),
        &[
            ("Authorization", &bearer),
            ("Content-Type", "multipart/form-data; boundary=b0undary"),
            ("Content-Range", &range),
        ],
        &multipart,
    );
    assert_eq!(status, 200, "the sandbox took the chunk: {body}");

    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    assert_eq!(
        daemon.resume_offsets().first().copied(),
        Some(received + CHUNK),
        "resumed after the chunk the server confirms:\n{}",
        daemon.log()
    );
    assert_delivered(&fx, &sandbox, "window.mp4", SIZE, &hash);
}

/// Access tokens that live 2 s against an upload that takes about four:
/// the provider refreshes its token and the upload goes on, on one video,
/// without sending any chunk twice.
#[test]
fn access_tokens_expiring_mid_upload_are_refreshed() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--token-ttl", "2s", "--throttle", "6MiB"],
    );
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", METADATA);
    let source = fx.watch.join("long.mp4");
    write_random(&source, SIZE, 4);
    let hash = sha256(&source);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    let took = started.elapsed();
    eprintln!("24 MiB to api.video with 2 s tokens in {took:?}");
    assert!(
        took > Duration::from_secs(3),
        "the upload outlived a token: {took:?}"
    );

    let (status, body) = sandbox.request("GET", "/_sandbox/apivideo/auth", &[]);
    assert_eq!(status, 200, "{body}");
    let grants: Value = serde_json::from_str(&body).expect("grants JSON");
    assert!(
        grants["refresh"].as_u64() >= Some(1),
        "the token was refreshed: {grants}"
    );
    let video = assert_delivered(&fx, &sandbox, "long.mp4", SIZE, &hash);
    let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
    assert!(bytes <= SIZE + CHUNK, "{bytes} bytes received for {SIZE}");
    assert_eq!(sandbox.records("apivideo").len(), 1, "no second video");
}

/// A wrong API key and a wrong delegated upload token: each job fails at
/// once with a report naming api.video and the cause, after one or two
/// requests, and neither secret shows up in the reports, status or the log.
#[test]
fn wrong_credentials_fail_at_once_without_leaking() {
    const BAD_KEY: &str = "wrong-api-key-2c81f0";
    const BAD_TOKEN: &str = "wrong-upload-token-94d1e7";
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let retry = format!("chunk_size: 5MiB, {GENEROUS_RETRY}");
    let providers = [
        apivideo_provider(
            "badkey",
            &sandbox,
            &format!("api_key: \"{BAD_KEY}\", {retry}"),
        ),
        apivideo_provider(
            "badtoken",
            &sandbox,
            &format!("upload_token: \"{BAD_TOKEN}\", {retry}"),
        ),
    ]
    .concat();
    let rules: String = ["badkey", "badtoken"]
        .iter()
        .map(|p| {
            format!("- match: {{ glob: \"{p}/**\" }}\n  provider: {p}\n  metadata: {METADATA}\n")
        })
        .collect();
    fx.write_config_parts(ConfigParts {
        providers: &providers,
        rules: Some(&rules),
        ..ConfigParts::default()
    });
    write_random(&fx.watch.join("badkey/clip.mp4"), 3 * MIB, 1);
    write_random(&fx.watch.join("badtoken/clip.mp4"), 3 * MIB, 2);

    let daemon = fx.start();
    wait_failed(&fx, 2, Duration::from_secs(30));

    for (dir, status, cause) in [
        ("badkey", 401, "API key was refused"),
        ("badtoken", 404, "upload token does not exist"),
    ] {
        let report = fx.error_report(&format!("{dir}/clip.mp4"));
        assert_eq!(report["provider"], dir, "{report}");
        assert_eq!(report["status"], status, "{report}");
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("api.video"),
            "the report names api.video: {report}"
        );
        assert!(
            reason.contains(cause),
            "the report names the cause: {report}"
        );
        assert_eq!(report["attempts"], 1, "not retried: {report}");
    }
    let stats = sandbox.stats();
    assert!(stats.requests <= 4, "a request or two per job: {stats:?}");
    assert!(sandbox.records("apivideo").is_empty());
    for secret in [BAD_KEY, BAD_TOKEN] {
        assert_secret_absent(&fx, &daemon, secret);
    }
}

/// Access tokens the server refuses as soon as they are issued (here: a
/// zero lifetime): the job authenticates again once, then fails with a
/// report saying the new token was refused too; no retry storm.
#[test]
fn tokens_refused_right_after_authentication_fail_after_one_reauthentication() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--token-ttl", "0s"]);
    let provider = apivideo_provider(
        "av",
        &sandbox,
        &format!("chunk_size: 5MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "av", METADATA);
    write_random(&fx.watch.join("clip.mp4"), 3 * MIB, 1);

    let daemon = fx.start();
    wait_failed(&fx, 1, Duration::from_secs(30));

    let report = fx.error_report("clip.mp4");
    assert_eq!(report["status"], 401, "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("api.video") && reason.contains("refused again right after"),
        "{report}"
    );
    assert_eq!(
        report["attempts"], 2,
        "one more attempt, with a new token: {report}"
    );
    let (status, body) = sandbox.request("GET", "/_sandbox/apivideo/auth", &[]);
    assert_eq!(status, 200, "{body}");
    let grants: Value = serde_json::from_str(&body).expect("grants JSON");
    assert_eq!(grants["api_key"], 2, "one re-authentication: {grants}");
    let stats = sandbox.stats();
    assert!(stats.requests <= 4, "{stats:?}");
    assert!(sandbox.records("apivideo").is_empty());
    assert_secret_absent(&fx, &daemon, "sandbox-api-key");
}
