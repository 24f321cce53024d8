//! The movingimage provider against `hotfolder sandbox`'s strict
//! VideoManager Pro simulator (OpenID Connect tokens with refresh, videos
//! created via `Location`, expiring upload URLs, numbered chunks in order,
//! quota code 1101), driving the real daemon: three sizes delivered
//! byte-identical with their metadata, injected faults, `kill -9`
//! mid-upload, tokens and upload URLs expiring mid-upload, refused
//! credentials, and a full quota.

mod common;

use std::time::Duration;

use common::providers::{
    BadCredentials, MIB, ProviderCase, assert_receipt, id_of, movingimage_provider, wait_failed,
};
use common::sandbox::Sandbox;
use common::{Fixture, sha256, write_random};
use serde_json::{Value, json};

const CHUNK: u64 = 2 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}", tags: [news, "{watch}"], public: true }"#;

/// movingimage at the sandbox, its videos found by file name.
const MOVINGIMAGE: ProviderCase = ProviderCase {
    simulator: "movingimage",
    label: "movingimage",
    name: "mi",
    entry: movingimage_provider,
    metadata: METADATA,
    chunk: CHUNK,
    record_key: "file_name",
    by_stem: false,
    title_key: "title",
    deletes: true,
    delivered: assert_delivered,
};

/// A delivered file: one complete video holding its bytes, every chunk in
/// place, and a receipt naming it.
fn assert_delivered(fx: &Fixture, sandbox: &Sandbox, name: &str, size: u64, hash: &str) -> Value {
    let video = MOVINGIMAGE.only_video(sandbox, name);
    let id = id_of(&video, "id");
    assert_eq!(video["complete"], true, "{video}");
    assert_eq!(video["received"], size, "every byte arrived: {video}");
    assert_eq!(video["chunks"], video["total_chunks"], "{video}");
    assert_eq!(
        sha256(&sandbox.video_bin("movingimage", &id)),
        hash,
        "{name} arrived byte-identical"
    );
    assert_receipt(fx, name, &id, hash);
    video
}

/// 1 KiB, 7 MiB and 23 MiB in 2 MiB chunks: each arrives byte-identical as
/// one video with the rule's title (`{stem}`), description, keywords and
/// autoPublish; each receipt names its video. One login serves them all.
#[test]
fn three_sizes_arrive_byte_identical_with_metadata() {
    let (_, sandbox) = MOVINGIMAGE.three_sizes(|_, _, video| {
        assert_eq!(video["keywords"], json!(["news", "drop"]), "{video}");
        assert_eq!(video["auto_publish"], true, "{video}");
        assert_eq!(video["upload_urls"], 1, "{video}");
    });
    assert_eq!(
        sandbox.grants("movingimage")["password"],
        1,
        "one login for three uploads"
    );
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one live, complete video.
#[test]
fn faults_one_complete_video_per_file() {
    MOVINGIMAGE.faults(CHUNK);
}

/// `kill -9` about a third of the way in, then a restart: with no offset
/// query in this protocol the job goes on from its last acknowledged chunk
/// on the same video; the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_next_unacknowledged_chunk() {
    MOVINGIMAGE.kill_9_resumes(|fx, received| {
        // Stopped: status reads the database, which holds the last acknowledged chunk.
        let checkpoint = fx.status()[0]["bytes_acknowledged"]
            .as_u64()
            .unwrap_or(u64::MAX);
        assert!(
            checkpoint > 0 && checkpoint.is_multiple_of(CHUNK) && checkpoint <= received,
            "checkpoint {checkpoint} (server: {received})"
        );
        (checkpoint, "the last acknowledged chunk")
    });
}

/// Access tokens and upload URLs that live 2 s against an upload that
/// takes about four: the provider refreshes its token and fetches new
/// upload URLs, and the upload goes on with the next chunk on one video.
#[test]
fn tokens_and_upload_urls_expiring_mid_upload_are_renewed() {
    let (_, video) = MOVINGIMAGE.tokens_expiring_mid_upload();
    assert!(
        video["upload_urls"].as_u64() > Some(1),
        "the upload URL was renewed: {video}"
    );
}

/// A wrong password: the job fails at once with a report naming movingimage
/// and the refused login, after one request, and the password shows up
/// nowhere.
#[test]
fn a_wrong_password_fails_at_once_without_leaking() {
    const BAD_PASSWORD: &str = "wrong-password-3d9e77";
    MOVINGIMAGE.wrong_credentials(
        &[BadCredentials {
            provider: "mi",
            settings: format!("password: \"{BAD_PASSWORD}\""),
            status: Some(401),
            causes: &["password was refused"],
        }],
        CHUNK,
        2,
        &[BAD_PASSWORD],
    );
}

/// A storage quota smaller than the file: the chunk past it answers code
/// 1101 and the job fails at once, its report saying the quota is reached.
#[test]
fn a_full_quota_fails_the_job_at_once() {
    let (fx, sandbox) = MOVINGIMAGE.setup(&["--mi-quota", "5MiB"]);
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
    let videos = sandbox.records_where("movingimage", "file_name", "big.mp4");
    assert_eq!(videos.len(), 1, "{videos:?}");
    let video = &videos[0];
    assert_eq!(
        video["chunks"], 2,
        "stopped at the chunk past the quota: {video}"
    );
    assert_eq!(
        video["deleted"], true,
        "the failed upload was given up: {video}"
    );
    assert_eq!(
        sandbox.stats().requests,
        7,
        "login, create, URL, three chunks, and the delete of the abandoned video"
    );
}

/// Access tokens the server refuses as soon as they are issued (here: a
/// zero lifetime): the job logs in again once, then fails with a report
/// saying the new token was refused too; no retry storm.
#[test]
fn tokens_refused_right_after_login_fail_after_one_reauthentication() {
    MOVINGIMAGE.tokens_refused_right_after_authentication("password", "sandbox-password");
}
