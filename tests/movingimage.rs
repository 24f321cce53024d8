//! The movingimage provider against `hotfolder sandbox`'s strict
//! VideoManager Pro simulator (OpenID Connect tokens with refresh, videos
//! created via `Location`, expiring upload URLs, numbered chunks in order,
//! quota code 1101), driving the real daemon: three sizes delivered
//! byte-identical with their metadata, injected faults, `kill -9`
//! mid-upload, tokens and upload URLs expiring mid-upload, refused
//! credentials, and a full quota.

mod common;

use std::time::{Duration, Instant};

use common::providers::{
    GENEROUS_RETRY, MIB, assert_secret_absent, fault_options, id_of, movingimage_provider,
    wait_done, wait_failed,
};
use common::sandbox::Sandbox;
use common::{Fixture, sha256, write_random};
use serde_json::{Value, json};

const CHUNK: u64 = 2 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}", tags: [news, "{watch}"], public: true }"#;

/// The only live movingimage video of file `name`.
fn only_video(sandbox: &Sandbox, name: &str) -> Value {
    let mut videos: Vec<Value> = sandbox
        .records_where("movingimage", "file_name", name)
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .collect();
    assert_eq!(
        videos.len(),
        1,
        "exactly one live video of {name}: {videos:?}"
    );
    videos.remove(0)
}

/// A delivered file: one complete video holding its bytes, every chunk in
/// place, and a receipt naming it.
fn assert_delivered(fx: &Fixture, sandbox: &Sandbox, name: &str, size: u64, hash: &str) -> Value {
    let video = only_video(sandbox, name);
    let id = id_of(&video, "id");
    assert_eq!(video["complete"], true, "{video}");
    assert_eq!(video["received"], size, "every byte arrived: {video}");
    assert_eq!(video["chunks"], video["total_chunks"], "{video}");
    assert_eq!(
        sha256(&sandbox.video_bin("movingimage", &id)),
        hash,
        "{name} arrived byte-identical"
    );
    let receipt = fx.receipt(name);
    assert_eq!(receipt["remote_id"], id.as_str(), "{receipt}");
    assert_eq!(receipt["sha256"], hash, "{receipt}");
    assert!(fx.done.join(name).exists(), "{name} filed in done/");
    video
}

fn grants(sandbox: &Sandbox) -> Value {
    let (status, body) = sandbox.request("GET", "/_sandbox/movingimage/auth", &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("grants JSON")
}

/// 1 KiB, 7 MiB and 23 MiB in 2 MiB chunks: each arrives byte-identical as
/// one video with the rule's title (`{stem}`), description, keywords and
/// autoPublish; each receipt names its video. One login serves them all.
#[test]
fn three_sizes_arrive_byte_identical_with_metadata() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    let files = fx.write_sizes(1);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(60));
    eprintln!("three sizes to movingimage in {:?}", started.elapsed());

    for (name, size, hash) in &files {
        let video = assert_delivered(&fx, &sandbox, name, *size, hash);
        let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
        assert_eq!(video["title"], stem, "title from {{stem}}: {video}");
        assert_eq!(
            video["description"],
            format!("From drop: {name}"),
            "{video}"
        );
        assert_eq!(video["keywords"], json!(["news", "drop"]), "{video}");
        assert_eq!(video["auto_publish"], true, "{video}");
        assert_eq!(video["upload_urls"], 1, "{video}");
    }
    assert_eq!(sandbox.records("movingimage").len(), files.len());
    assert_eq!(
        grants(&sandbox)["password"],
        1,
        "one login for three uploads"
    );
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one live, complete video.
#[test]
fn faults_one_complete_video_per_file() {
    let fx = Fixture::new();
    let seed = std::env::var("MOVINGIMAGE_SEED").unwrap_or_else(|_| "5".into());
    let options = fault_options(&seed);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &options);
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    let files = fx.write_sizes(10);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(90));
    eprintln!(
        "three sizes to movingimage through faults in {:?}",
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
        .records("movingimage")
        .into_iter()
        .filter(|v| v["deleted"] != true)
        .count();
    assert_eq!(live, files.len(), "no other video was made");
}

/// `kill -9` about a third of the way in, then a restart: with no offset
/// query in this protocol the job goes on from its last acknowledged chunk
/// on the same video; the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_next_unacknowledged_chunk() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "8MiB"]);
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    let source = fx.watch.join("crash.mp4");
    write_random(&source, SIZE, 3);
    let hash = sha256(&source);

    let started = Instant::now();
    let mut daemon = fx.start();
    sandbox.wait_for_record(
        "movingimage",
        ("file_name", "crash.mp4"),
        ("received", SIZE * 3 / 10),
        Duration::from_secs(30),
    );
    daemon.kill9();
    let at_kill = sandbox.settled_record("movingimage", ("file_name", "crash.mp4"));
    let received = at_kill["received"].as_u64().unwrap_or(0);
    assert!(
        received < SIZE,
        "finished before the kill; throttle harder: {at_kill}"
    );
    // Stopped: status reads the database, which holds the last acknowledged chunk.
    let checkpoint = fx.status()[0]["bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        checkpoint > 0 && checkpoint.is_multiple_of(CHUNK) && checkpoint <= received,
        "checkpoint {checkpoint} (server: {received})"
    );

    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    eprintln!(
        "24 MiB to movingimage with a crash in {:?}",
        started.elapsed()
    );

    assert_eq!(
        daemon.resume_offsets().first().copied(),
        Some(checkpoint),
        "resumed from the last acknowledged chunk:\n{}",
        daemon.log()
    );
    let video = assert_delivered(&fx, &sandbox, "crash.mp4", SIZE, &hash);
    let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
    assert!(
        bytes <= SIZE + CHUNK,
        "the server received {bytes} bytes for {SIZE}: more than one chunk again"
    );
    assert_eq!(sandbox.records("movingimage").len(), 1, "no second video");
}

/// Access tokens and upload URLs that live 2 s against an upload that
/// takes about four: the provider refreshes its token and fetches new
/// upload URLs, and the upload goes on with the next chunk on one video.
#[test]
fn tokens_and_upload_urls_expiring_mid_upload_are_renewed() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--token-ttl", "2s", "--throttle", "6MiB"],
    );
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    let source = fx.watch.join("long.mp4");
    write_random(&source, SIZE, 4);
    let hash = sha256(&source);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    let took = started.elapsed();
    eprintln!("24 MiB to movingimage with 2 s tokens and URLs in {took:?}");
    assert!(
        took > Duration::from_secs(3),
        "the upload outlived a token: {took:?}"
    );

    let video = assert_delivered(&fx, &sandbox, "long.mp4", SIZE, &hash);
    assert!(
        video["upload_urls"].as_u64() > Some(1),
        "the upload URL was renewed: {video}"
    );
    let grants = grants(&sandbox);
    assert!(
        grants["refresh"].as_u64() >= Some(1),
        "the access token was refreshed: {grants}"
    );
    let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
    assert!(bytes <= SIZE + CHUNK, "{bytes} bytes received for {SIZE}");
    assert_eq!(sandbox.records("movingimage").len(), 1, "no second video");
}

/// A wrong password: the job fails at once with a report naming movingimage
/// and the refused login, after one request, and the password shows up
/// nowhere.
#[test]
fn a_wrong_password_fails_at_once_without_leaking() {
    const BAD_PASSWORD: &str = "wrong-password-3d9e77";
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("password: \"{BAD_PASSWORD}\", chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    write_random(&fx.watch.join("clip.mp4"), 3 * MIB, 1);

    let daemon = fx.start();
    wait_failed(&fx, 1, Duration::from_secs(30));

    let report = fx.error_report("clip.mp4");
    assert_eq!(report["provider"], "mi", "{report}");
    assert_eq!(report["status"], 401, "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("movingimage"),
        "the report names movingimage: {report}"
    );
    assert!(
        reason.contains("password was refused"),
        "the report names the cause: {report}"
    );
    assert_eq!(report["attempts"], 1, "not retried: {report}");
    let stats = sandbox.stats();
    assert!(
        stats.requests <= 2,
        "one login, at most one more: {stats:?}"
    );
    assert!(sandbox.records("movingimage").is_empty());
    assert_secret_absent(&fx, &daemon, BAD_PASSWORD);
}

/// A storage quota smaller than the file: the chunk past it answers code
/// 1101 and the job fails at once, its report saying the quota is reached.
#[test]
fn a_full_quota_fails_the_job_at_once() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--mi-quota", "5MiB"]);
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    write_random(&fx.watch.join("big.mp4"), 8 * MIB, 2);

    let _daemon = fx.start();
    wait_failed(&fx, 1, Duration::from_secs(30));

    let report = fx.error_report("big.mp4");
    assert_eq!(report["provider"], "mi", "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("1101") && reason.contains("quota"),
        "the report names the quota: {report}"
    );
    assert_eq!(report["attempts"], 1, "not retried: {report}");
    let video = only_video(&sandbox, "big.mp4");
    assert_eq!(
        video["chunks"], 2,
        "stopped at the chunk past the quota: {video}"
    );
    assert_eq!(
        sandbox.stats().requests,
        6,
        "login, create, URL, three chunks"
    );
}

/// Access tokens the server refuses as soon as they are issued (here: a
/// zero lifetime): the job logs in again once, then fails with a report
/// saying the new token was refused too; no retry storm.
#[test]
fn tokens_refused_right_after_login_fail_after_one_reauthentication() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--token-ttl", "0s"]);
    let provider = movingimage_provider(
        "mi",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "mi", METADATA);
    write_random(&fx.watch.join("clip.mp4"), 3 * MIB, 1);

    let daemon = fx.start();
    wait_failed(&fx, 1, Duration::from_secs(30));

    let report = fx.error_report("clip.mp4");
    assert_eq!(report["status"], 401, "{report}");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("movingimage") && reason.contains("refused again right after"),
        "{report}"
    );
    assert_eq!(
        report["attempts"], 2,
        "one more attempt, with a new token: {report}"
    );
    let grants = grants(&sandbox);
    assert_eq!(grants["password"], 2, "one new login: {grants}");
    let stats = sandbox.stats();
    assert!(stats.requests <= 4, "{stats:?}");
    assert!(sandbox.records("movingimage").is_empty());
    assert_secret_absent(&fx, &daemon, "sandbox-password");
}
