//! The OK.ru provider against `hotfolder sandbox`'s strict OK.ru simulator
//! (signed `fb.do`, `Content-Range` chunks, status GET, `video.update`),
//! driving the real daemon: three sizes delivered byte-identical and
//! finalised, injected faults, `kill -9` mid-upload, an upload URL that
//! expires mid-upload, and refused credentials.

mod common;

use std::time::Duration;

use common::providers::{
    BadCredentials, MIB, ProviderCase, assert_receipt, id_of, okru_provider, wait_done,
};
use common::sandbox::Sandbox;
use common::{Fixture, same_bytes, sha256};
use serde_json::Value;

const CHUNK: u64 = 2 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}", tags: [news, "{watch}"], public: true }"#;

/// OK.ru at the sandbox, its videos found by file name.
const OKRU: ProviderCase = ProviderCase {
    simulator: "okru",
    label: "OK.ru",
    name: "ok",
    entry: okru_provider,
    metadata: METADATA,
    chunk: CHUNK,
    record_key: "file_name",
    by_stem: false,
    title_key: "title",
    deletes: false,
    delivered: assert_delivered,
};

/// A delivered file: one finalised video holding its bytes, and a receipt
/// naming it.
fn assert_delivered(fx: &Fixture, sandbox: &Sandbox, name: &str, size: u64, hash: &str) -> Value {
    let video = OKRU.only_video(sandbox, name);
    let id = id_of(&video, "video_id");
    assert_eq!(video["file_size"], size, "{video}");
    assert_eq!(video["received"], size, "every byte arrived: {video}");
    assert_eq!(
        video["updated"], true,
        "finalised with video.update: {video}"
    );
    assert_eq!(
        sha256(&sandbox.video_bin("okru", &id)),
        hash,
        "{name} arrived byte-identical"
    );
    let receipt = assert_receipt(fx, name, &id, hash);
    assert_eq!(receipt["provider"], "ok", "{receipt}");
    video
}

/// 1 KiB, 7 MiB and 23 MiB: each arrives byte-identical as one video,
/// finalised with the rule's title (`{stem}`), description, tags and
/// privacy; each receipt names its video.
#[test]
fn three_sizes_arrive_byte_identical_and_finalised() {
    OKRU.three_sizes(|_, _, video| {
        assert_eq!(video["tags"], "news,drop", "{video}");
        assert_eq!(
            video["privacy"], "PUBLIC",
            "public: true is PUBLIC: {video}"
        );
    });
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one finalised video.
#[test]
fn faults_one_finalised_video_per_file() {
    OKRU.faults(MIB);
}

/// `kill -9` about a third of the way in, then a restart: the job asks the
/// upload URL's status and goes on from the server's offset on the same
/// video; the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_servers_offset() {
    let (fx, _, _) =
        OKRU.kill_9_resumes(|_, received| (received, "the offset the server reported"));
    assert_eq!(fx.receipt("crash.mp4")["replaced"], serde_json::json!([]));
}

/// Upload URLs that live 2 s against an upload that needs longer: the
/// expired URL is refused with 403, the job gets a new upload URL (and so
/// a new video, OK.ru has no other way) and the receipt names the one it
/// replaced. Once the job has its new URL the sandbox restarts without the
/// short lifetime, so the new upload can finish.
#[test]
fn expired_upload_url_is_replaced_and_named_in_the_receipt() {
    const SIZE: u64 = 16 * MIB;
    let (fx, mut sandbox) = OKRU.setup_with(&["--token-ttl", "2s", "--throttle", "4MiB"], "", MIB);
    ProviderCase::drop_file(&fx, "expiring.mp4", SIZE, 4);

    let daemon = fx.start();
    common::wait_for("a second upload URL", Duration::from_secs(30), || {
        (sandbox
            .records_where("okru", "file_name", "expiring.mp4")
            .len()
            >= 2)
            .then_some(())
    });
    sandbox.restart_with(&["--throttle", "16MiB"]);
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));

    let videos = sandbox.records_where("okru", "file_name", "expiring.mp4");
    let (done, replaced): (Vec<&Value>, Vec<&Value>) =
        videos.iter().partition(|v| v["updated"] == true);
    assert_eq!(done.len(), 1, "one finalised video: {videos:?}");
    let first = &replaced[0];
    assert!(
        first["received"].as_u64().unwrap_or(0) > 0 && first["received"].as_u64() < Some(SIZE),
        "the first URL expired mid-upload: {first}"
    );
    let id = id_of(done[0], "video_id");
    assert_eq!(done[0]["received"], SIZE, "{}", done[0]);
    assert!(same_bytes(
        &sandbox.video_bin("okru", &id),
        &fx.done.join("expiring.mp4")
    ));
    let receipt = fx.receipt("expiring.mp4");
    assert_eq!(receipt["remote_id"], id.as_str(), "{receipt}");
    let named = receipt["replaced"].as_array().cloned().unwrap_or_default();
    for old in &replaced {
        let old = id_of(old, "video_id");
        assert!(
            named.iter().any(|r| r.as_str() == Some(old.as_str())),
            "the receipt names the replaced video {old}: {receipt}"
        );
    }
    assert!(
        daemon.log().contains("starting a new remote upload"),
        "{}",
        daemon.log()
    );
}

/// Upload URLs that always expire before an upload can finish: each 403
/// replaces the video, but not forever. After ten replacements the job
/// fails with a report that says why, instead of filling the account with
/// half-uploaded videos.
#[test]
fn endless_url_expiry_fails_the_job_after_a_bounded_number_of_videos() {
    let (fx, sandbox) = OKRU.setup_with(&["--token-ttl", "300ms", "--throttle", "2MiB"], "", MIB);
    ProviderCase::drop_file(&fx, "never.mp4", 4 * MIB, 9);

    let daemon = fx.start();
    let report = common::wait_for("the job to fail", Duration::from_secs(60), || {
        let path = fx.failed.join("never.mp4.error.json");
        path.exists().then(|| common::read_json(&path))
    });
    let reason = report["reason"].as_str().unwrap_or_default().to_string();
    // Ten replaced uploads end it; a create interrupted on the way (its
    // possible orphan named in the same list) can add to the count.
    let counted: usize = reason
        .split("invalidated ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        (10..=12).contains(&counted) && reason.contains("remote uploads of this file"),
        "{report}"
    );
    let videos = sandbox.records_where("okru", "file_name", "never.mp4");
    // Ten replaced and the last one; a create whose connection closed
    // before it was answered may have made no video, and counts (as a
    // possible orphan) all the same.
    let interrupted = common::log_lines_with(&daemon.log(), &["an interrupted create call"]);
    assert!(
        videos.len() == 11 || (videos.len() == 11 - interrupted && interrupted > 0),
        "ten replaced and the last one ({interrupted} interrupted creates): {videos:?}"
    );
    assert!(
        videos.iter().all(|v| v["updated"] != true),
        "none was finalised"
    );
    assert!(
        fx.failed.join("never.mp4").exists(),
        "the source is kept in failed/"
    );
    drop(daemon);
}

/// A wrong access token and a wrong secret key: each job fails at once
/// with a report naming the provider and the cause; one API call each,
/// and neither secret shows up in the reports, status or the log.
#[test]
fn wrong_credentials_fail_at_once_without_leaking() {
    const BAD_TOKEN: &str = "wrong-access-token-7f3a9c";
    const BAD_SECRET: &str = "wrong-secret-key-51be2d";
    OKRU.wrong_credentials(
        &[
            BadCredentials {
                provider: "badtoken",
                settings: format!("access_token: \"{BAD_TOKEN}\""),
                status: None,
                causes: &["102", "access token is expired or invalid"],
            },
            BadCredentials {
                provider: "badsecret",
                settings: format!("application_secret_key: \"{BAD_SECRET}\""),
                status: None,
                causes: &["104", "signature"],
            },
        ],
        MIB,
        4,
        &[
            BAD_TOKEN,
            BAD_SECRET,
            "sandbox-secret-key",
            "sandbox-access-token",
        ],
    );
}
