//! The OK.ru provider against `hotfolder sandbox`'s strict OK.ru simulator
//! (signed `fb.do`, `Content-Range` chunks, status GET, `video.update`),
//! driving the real daemon: three sizes delivered byte-identical and
//! finalised, injected faults, `kill -9` mid-upload, an upload URL that
//! expires mid-upload, and refused credentials.

mod common;

use std::time::{Duration, Instant};

use common::providers::{
    GENEROUS_RETRY, MIB, assert_secret_absent, fault_options, id_of, okru_provider, wait_done,
    wait_failed,
};
use common::sandbox::Sandbox;
use common::{ConfigParts, Fixture, same_bytes, sha256, write_random};
use serde_json::Value;

const CHUNK: u64 = 2 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}", tags: [news, "{watch}"], public: true }"#;

/// The only OK.ru video made for `name`.
fn only_video(sandbox: &Sandbox, name: &str) -> Value {
    let mut videos = sandbox.records_where("okru", "file_name", name);
    assert_eq!(
        videos.len(),
        1,
        "exactly one OK.ru video for {name}: {videos:?}"
    );
    videos.remove(0)
}

/// A delivered file: one finalised video holding its bytes, and a receipt
/// naming it.
fn assert_delivered(fx: &Fixture, sandbox: &Sandbox, name: &str, size: u64, hash: &str) -> Value {
    let video = only_video(sandbox, name);
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
    let receipt = fx.receipt(name);
    assert_eq!(receipt["remote_id"], id.as_str(), "{receipt}");
    assert_eq!(receipt["sha256"], hash, "{receipt}");
    assert_eq!(receipt["provider"], "ok", "{receipt}");
    assert!(fx.done.join(name).exists(), "{name} filed in done/");
    video
}

/// 1 KiB, 7 MiB and 23 MiB: each arrives byte-identical as one video,
/// finalised with the rule's title (`{stem}`), description, tags and
/// privacy; each receipt names its video.
#[test]
fn three_sizes_arrive_byte_identical_and_finalised() {
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let provider = okru_provider(
        "ok",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "ok", METADATA);
    let files = fx.write_sizes(1);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(60));
    eprintln!("three sizes to OK.ru in {:?}", started.elapsed());

    for (name, size, hash) in &files {
        let video = assert_delivered(&fx, &sandbox, name, *size, hash);
        let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
        assert_eq!(video["title"], stem, "title from {{stem}}: {video}");
        assert_eq!(
            video["description"],
            format!("From drop: {name}"),
            "{video}"
        );
        assert_eq!(video["tags"], "news,drop", "{video}");
        assert_eq!(
            video["privacy"], "PUBLIC",
            "public: true is PUBLIC: {video}"
        );
    }
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one finalised video.
#[test]
fn faults_one_finalised_video_per_file() {
    let fx = Fixture::new();
    let seed = std::env::var("OKRU_SEED").unwrap_or_else(|_| "5".into());
    let options = fault_options(&seed);
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &options);
    let provider = okru_provider(
        "ok",
        &sandbox,
        &format!("chunk_size: 1MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "ok", METADATA);
    let files = fx.write_sizes(10);

    let started = Instant::now();
    let daemon = fx.start();
    wait_done(&fx, &daemon, files.len(), Duration::from_secs(90));
    eprintln!(
        "three sizes to OK.ru through faults in {:?}",
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
    assert_eq!(
        sandbox.records("okru").len(),
        files.len(),
        "no other video was made"
    );
}

/// `kill -9` about a third of the way in, then a restart: the job asks the
/// upload URL's status and goes on from the server's offset on the same
/// video; the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_servers_offset() {
    const SIZE: u64 = 24 * MIB;
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "8MiB"]);
    let provider = okru_provider(
        "ok",
        &sandbox,
        &format!("chunk_size: 2MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "ok", METADATA);
    let source = fx.watch.join("crash.mp4");
    write_random(&source, SIZE, 3);
    let hash = sha256(&source);

    let started = Instant::now();
    let mut daemon = fx.start();
    sandbox.wait_for_record(
        "okru",
        ("file_name", "crash.mp4"),
        ("received", SIZE * 3 / 10),
        Duration::from_secs(30),
    );
    daemon.kill9();
    let at_kill = sandbox.settled_record("okru", ("file_name", "crash.mp4"));
    let received = at_kill["received"].as_u64().unwrap_or(0);
    assert!(
        received < SIZE,
        "finished before the kill; throttle harder: {at_kill}"
    );

    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    eprintln!("24 MiB to OK.ru with a crash in {:?}", started.elapsed());

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
    let fx = Fixture::new();
    let mut sandbox = Sandbox::start(
        &fx.root.join("sandbox"),
        &["--token-ttl", "2s", "--throttle", "4MiB"],
    );
    let provider = okru_provider(
        "ok",
        &sandbox,
        &format!("chunk_size: 1MiB, {GENEROUS_RETRY}"),
    );
    fx.write_provider_config(&provider, "ok", METADATA);
    let source = fx.watch.join("expiring.mp4");
    write_random(&source, SIZE, 4);

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

/// A wrong access token and a wrong secret key: each job fails at once
/// with a report naming the provider and the cause; one API call each,
/// and neither secret shows up in the reports, status or the log.
#[test]
fn wrong_credentials_fail_at_once_without_leaking() {
    const BAD_TOKEN: &str = "wrong-access-token-7f3a9c";
    const BAD_SECRET: &str = "wrong-secret-key-51be2d";
    let fx = Fixture::new();
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
    let retry = format!("chunk_size: 1MiB, {GENEROUS_RETRY}");
    let providers = [
        okru_provider(
            "badtoken",
            &sandbox,
            &format!("access_token: \"{BAD_TOKEN}\", {retry}"),
        ),
        okru_provider(
            "badsecret",
            &sandbox,
            &format!("application_secret_key: \"{BAD_SECRET}\", {retry}"),
        ),
    ]
    .concat();
    let rules: String = ["badtoken", "badsecret"]
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
    write_random(&fx.watch.join("badtoken/clip.mp4"), 3 * MIB, 1);
    write_random(&fx.watch.join("badsecret/clip.mp4"), 3 * MIB, 2);

    let daemon = fx.start();
    wait_failed(&fx, 2, Duration::from_secs(30));

    for (dir, code, cause) in [
        ("badtoken", "102", "access token is expired or invalid"),
        ("badsecret", "104", "signature"),
    ] {
        let report = fx.error_report(&format!("{dir}/clip.mp4"));
        assert_eq!(report["provider"], dir, "{report}");
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("OK.ru"), "the report names OK.ru: {report}");
        assert!(reason.contains(code) && reason.contains(cause), "{report}");
        assert_eq!(report["attempts"], 1, "not retried: {report}");
    }
    let stats = sandbox.stats();
    assert!(
        stats.requests <= 4,
        "one call per job, at most one more: {stats:?}"
    );
    assert!(sandbox.records("okru").is_empty());
    for secret in [
        BAD_TOKEN,
        BAD_SECRET,
        "sandbox-secret-key",
        "sandbox-access-token",
    ] {
        assert_secret_absent(&fx, &daemon, secret);
    }
}
