//! The api.video provider against `hotfolder sandbox`'s strict api.video
//! simulator (API-key tokens with refresh, videos tagged with the job,
//! multipart chunks of at least 5 MiB, status with received ranges),
//! driving the real daemon: three sizes delivered byte-identical with
//! their metadata, injected faults, `kill -9` mid-upload, access tokens
//! expiring mid-upload, and refused credentials.

mod common;

use std::time::Duration;

use common::providers::{
    BadCredentials, MIB, ProviderCase, apivideo_provider, assert_receipt, id_of, wait_done,
};
use common::sandbox::Sandbox;
use common::{Fixture, sha256};
use serde_json::{Value, json};

const CHUNK: u64 = 5 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}", tags: [news, "{watch}"], public: false }"#;

/// api.video at the sandbox, its videos found by title (`{stem}`).
const APIVIDEO: ProviderCase = ProviderCase {
    simulator: "apivideo",
    label: "api.video",
    name: "av",
    entry: apivideo_provider,
    metadata: METADATA,
    chunk: CHUNK,
    record_key: "title",
    by_stem: true,
    title_key: "title",
    deletes: true,
    delivered: assert_delivered,
};

/// A delivered file: one complete video holding its bytes, tagged with the
/// job, and a receipt naming it.
fn assert_delivered(fx: &Fixture, sandbox: &Sandbox, name: &str, size: u64, hash: &str) -> Value {
    let video = APIVIDEO.only_video(sandbox, name);
    let id = id_of(&video, "video_id");
    assert_eq!(video["complete"], true, "{video}");
    assert_eq!(video["received"], size, "every byte arrived: {video}");
    assert_eq!(
        sha256(&sandbox.video_bin("apivideo", &id)),
        hash,
        "{name} arrived byte-identical"
    );
    let receipt = assert_receipt(fx, name, &id, hash);
    let job = receipt["job"].to_string();
    assert!(
        video["metadata"]
            .as_array()
            .is_some_and(|m| m.iter().any(|entry| {
                entry["key"] == "hotfolder_job"
                    && entry["value"]
                        .as_str()
                        .is_some_and(|tag| tag.ends_with(&format!("-{job}")))
            })),
        "the video is tagged with this installation and its job {job}: {video}"
    );
    video
}

/// 1 KiB, 7 MiB and 23 MiB in 5 MiB chunks: each arrives byte-identical as
/// one video with the rule's title (`{stem}`), description, tags, public
/// flag and the job tag; each receipt names its video and its player.
#[test]
fn three_sizes_arrive_byte_identical_with_metadata() {
    APIVIDEO.three_sizes(|fx, name, video| {
        assert_eq!(video["tags"], json!(["news", "drop"]), "{video}");
        assert_eq!(video["public"], false, "{video}");
        let receipt = fx.receipt(name);
        let id = id_of(video, "video_id");
        assert!(
            receipt["url"].as_str().is_some_and(|u| u.contains(&id)),
            "the receipt carries the player URL: {receipt}"
        );
    });
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one live, complete video.
#[test]
fn faults_one_complete_video_per_file() {
    APIVIDEO.faults(CHUNK);
}

/// `kill -9` about a third of the way in, then a restart: the job reads the
/// video's status and goes on from the received bytes on the same video;
/// the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_servers_offset() {
    APIVIDEO.kill_9_resumes(|_, received| (received, "the offset the server reported"));
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
    let (fx, sandbox) = APIVIDEO.setup(&["--throttle", "8MiB"]);
    let source = fx.watch.join("window.mp4");
    let hash = ProviderCase::drop_file(&fx, "window.mp4", SIZE, 5).hash;

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
    let checkpoint = fx.status()[0]["bytes_acknowledged"]
        .as_u64()
        .unwrap_or(u64::MAX);
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
    APIVIDEO.tokens_expiring_mid_upload();
}

/// A wrong API key and a wrong delegated upload token: each job fails at
/// once with a report naming api.video and the cause, after one or two
/// requests, and neither secret shows up in the reports, status or the log.
#[test]
fn wrong_credentials_fail_at_once_without_leaking() {
    const BAD_KEY: &str = "wrong-api-key-2c81f0";
    const BAD_TOKEN: &str = "wrong-upload-token-94d1e7";
    APIVIDEO.wrong_credentials(
        &[
            BadCredentials {
                provider: "badkey",
                settings: format!("api_key: \"{BAD_KEY}\""),
                status: Some(401),
                causes: &["API key was refused"],
            },
            BadCredentials {
                provider: "badtoken",
                settings: format!("upload_token: \"{BAD_TOKEN}\""),
                status: Some(404),
                causes: &["upload token does not exist"],
            },
        ],
        CHUNK,
        4,
        &[BAD_KEY, BAD_TOKEN],
    );
}

/// Access tokens the server refuses as soon as they are issued (here: a
/// zero lifetime): the job authenticates again once, then fails with a
/// report saying the new token was refused too; no retry storm.
#[test]
fn tokens_refused_right_after_authentication_fail_after_one_reauthentication() {
    APIVIDEO.tokens_refused_right_after_authentication("api_key", "sandbox-api-key");
}

/// `parallel: 4` with numbered parts: parts travel side by side (the
/// sandbox saw several bodies at once), the last part only after every
/// other is stored (the simulator refuses it earlier), no byte is sent
/// twice, and the video holds the file's bytes.
#[test]
fn parallel_parts_arrive_side_by_side_and_the_last_one_after_the_rest() {
    const SIZE: u64 = 33 * MIB; // six whole parts and a short last one
    let (fx, sandbox) = APIVIDEO.setup_with(
        &["--throttle", "64MiB"],
        "upload_mode: parts, parallel: 4",
        CHUNK,
    );
    let source = ProviderCase::drop_file(&fx, "wide.mp4", SIZE, 21);
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));

    let video = assert_delivered(&fx, &sandbox, source.name, SIZE, &source.hash);
    assert_eq!(video["parts"], 7, "{video}");
    assert_eq!(video["bytes_received"], SIZE, "no part sent twice: {video}");
    let peak = sandbox.stats().bodies_in_flight_peak;
    assert!(
        peak >= 2,
        "parts were sent one at a time (peak {peak} bodies at once)"
    );
    assert!(
        !daemon.log().contains("before parts"),
        "the last part never went early:\n{}",
        daemon.log()
    );
}

/// `kill -9` while four parts are in flight, then a restart: the parts
/// acknowledged before the crash are not sent again (each lane resends at
/// most the part it had in flight), on the same video.
#[test]
fn kill_9_mid_parallel_parts_resends_only_the_parts_in_flight() {
    const SIZE: u64 = 48 * MIB;
    let (fx, sandbox) = APIVIDEO.setup_with(
        &["--throttle", "12MiB"],
        "upload_mode: parts, parallel: 4",
        CHUNK,
    );
    let source = ProviderCase::drop_file(&fx, "wide.mp4", SIZE, 22);
    let key = APIVIDEO.key_of(source.name);
    let mut daemon = fx.start();
    // Past the first four parts, which land together: by then some
    // acknowledgements are persisted, and other parts are in flight.
    sandbox.wait_for_record("apivideo", key, ("parts", 6), Duration::from_secs(60));
    daemon.kill9();
    let at_kill = sandbox.settled_record("apivideo", key);
    assert_ne!(
        at_kill["complete"], true,
        "finished before the kill: {at_kill}"
    );

    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(90));
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("resuming the parallel parts")
                && common::field(l, "acked").is_some_and(|a| a != "0")),
        "the restart resumed the lanes where they stood:\n{log}"
    );
    let video = assert_delivered(&fx, &sandbox, source.name, SIZE, &source.hash);
    let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
    assert!(
        bytes <= SIZE + 4 * CHUNK,
        "the server received {bytes} bytes for {SIZE}: more than the parts in flight again"
    );
    assert_eq!(sandbox.records("apivideo").len(), 1, "no second video");
}
