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
    BadCredentials, MIB, ProviderCase, assert_receipt, gcore_provider, id_of, wait_done,
};
use common::sandbox::{Sandbox, TusUpload};
use common::{Fixture, sha256, write_random};
use serde_json::Value;

const CHUNK: u64 = 2 * MIB;
const METADATA: &str = r#"{ title: "{stem}", description: "From {watch}: {name}" }"#;

/// Gcore at the sandbox, its videos found by name (`{stem}`).
const GCORE: ProviderCase = ProviderCase {
    simulator: "gcore",
    label: "Gcore",
    name: "gc",
    entry: gcore_provider,
    metadata: METADATA,
    chunk: CHUNK,
    record_key: "name",
    by_stem: true,
    title_key: "name",
    deletes: true,
    delivered: |fx, sandbox, name, size, hash| assert_delivered(fx, sandbox, name, size, hash).0,
};

/// The only live Gcore video of file `name` (named from its stem), and the
/// tus upload carrying it.
fn only_video(sandbox: &Sandbox, name: &str) -> (Value, TusUpload) {
    let video = GCORE.only_video(sandbox, name);
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
    let (video, upload) = only_video(sandbox, name);
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
    assert_receipt(fx, name, &id, hash);
    (video, upload)
}

/// 1 KiB, 7 MiB and 23 MiB: each arrives byte-identical as one video named
/// from `{stem}` with the rule's description, its bytes on the tus leg with
/// the video's id and client; each receipt names its video.
#[test]
fn three_sizes_arrive_byte_identical_with_their_names() {
    GCORE.three_sizes(|_, _, _| {});
}

/// Through 500s, dropped connections and 429s: every file arrives, as
/// exactly one live video with one complete tus upload.
#[test]
fn faults_one_complete_video_per_file() {
    GCORE.faults(MIB);
}

/// `kill -9` about a third of the way in, then a restart: the job asks the
/// tus server its offset (HEAD, no token needed) and goes on on the same
/// upload of the same video; the server receives at most one chunk again.
#[test]
fn kill_9_resumes_from_the_servers_offset() {
    const SIZE: u64 = 24 * MIB;
    let (fx, sandbox) = GCORE.setup(&["--throttle", "8MiB"]);
    let hash = ProviderCase::drop_file(&fx, "crash.mp4", SIZE, 3).hash;

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
    let (fx, sandbox) = GCORE.setup(&["--token-ttl", "1s", "--throttle", "8MiB"]);
    let hash = ProviderCase::drop_file(&fx, "long.mp4", SIZE, 4).hash;

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
    GCORE.wrong_credentials(
        &[BadCredentials {
            provider: "gc",
            settings: format!("api_key: \"{BAD_KEY}\""),
            status: Some(401),
            causes: &["API key was refused"],
        }],
        MIB,
        2,
        &[BAD_KEY],
    );
}

/// `wait_until: ready` through `hotfolder upload`: the command returns only
/// once the video's status reached `ready`, and says where it plays.
#[test]
fn wait_until_ready_waits_for_ready() {
    let (fx, sandbox) = GCORE.setup_with(&[], "wait_until: ready", CHUNK);
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

    let (video, upload) = only_video(&sandbox, "ready.mp4");
    assert_eq!(video["status"], "ready", "{video}");
    assert!(upload.complete(), "{upload:?}");
    assert_eq!(sha256(&sandbox.bin(&upload.id)), hash);
    let id = id_of(&video, "id");
    assert!(
        stdout.contains("ready.mp4: uploaded") && stdout.contains(&id),
        "the command names where the video plays:\n{stdout}"
    );
}
