//! The OK.ru, api.video, Gcore and movingimage simulators of `hotfolder
//! sandbox` as test peers, for tests/{okru,apivideo,gcore,movingimage}.rs:
//! provider entries pointing at a sandbox, a fixture whose every file goes
//! to one such provider, the simulators' records (`/_sandbox/<name>`) and
//! received bytes, and the waits and checks those tests share.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::sandbox::Sandbox;
use super::{ConfigParts, Daemon, Fixture, in_state, read_json, sha256, wait_for, write_random};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// The three files every provider must carry byte-identical: one request,
/// a few chunks, many chunks.
pub const SIZES: [(&str, u64); 3] = [
    ("tiny clip.mp4", 1024),
    ("medium.mov", 7 * MIB),
    ("large.mkv", 23 * MIB),
];

/// Retries for runs with injected faults: many attempts, short backoffs
/// (a 429's `Retry-After: 1` still wins over them).
pub const GENEROUS_RETRY: &str =
    "retry: { max_attempts: 40, initial_backoff: 20ms, max_backoff: 200ms }";

/// Sandbox options injecting 500s, dropped connections and 429s with a fixed seed.
pub fn fault_options(seed: &str) -> Vec<String> {
    [
        "--fail-rate",
        "0.15",
        "--reset-rate",
        "0.1",
        "--rate-limit-every",
        "7",
        "--seed",
        seed,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `settings` as more keys of a flow mapping (leading comma), or nothing.
fn more(settings: &str) -> String {
    if settings.trim().is_empty() {
        String::new()
    } else {
        format!(", {settings}")
    }
}

/// A `providers:` entry (one line) for OK.ru at the sandbox; `settings`
/// may override the credentials (later keys are not allowed twice, so the
/// credentials are given here only when `settings` does not name them).
pub fn okru_provider(name: &str, sandbox: &Sandbox, settings: &str) -> String {
    let mut keys = vec![format!("base_url: \"http://{}\"", sandbox.addr)];
    for (key, value) in [
        ("application_key", "sandbox-app-key"),
        ("application_secret_key", "sandbox-secret-key"),
        ("access_token", "sandbox-access-token"),
    ] {
        if !settings.contains(&format!("{key}:")) {
            keys.push(format!("{key}: \"{value}\""));
        }
    }
    format!(
        "{name}: {{ type: okru, {}{} }}\n",
        keys.join(", "),
        more(settings)
    )
}

/// A `providers:` entry for api.video at the sandbox (API key unless
/// `settings` names `api_key` or `upload_token`).
pub fn apivideo_provider(name: &str, sandbox: &Sandbox, settings: &str) -> String {
    let credentials = if settings.contains("api_key:") || settings.contains("upload_token:") {
        String::new()
    } else {
        ", api_key: \"sandbox-api-key\"".to_string()
    };
    format!(
        "{name}: {{ type: apivideo, base_url: \"http://{}\"{credentials}{} }}\n",
        sandbox.addr,
        more(settings)
    )
}

/// A `providers:` entry for Gcore at the sandbox (the sandbox's key unless
/// `settings` names `api_key`).
pub fn gcore_provider(name: &str, sandbox: &Sandbox, settings: &str) -> String {
    let key = if settings.contains("api_key:") {
        String::new()
    } else {
        ", api_key: \"sandbox-gcore-key\"".to_string()
    };
    format!(
        "{name}: {{ type: gcore, base_url: \"http://{}\"{key}{} }}\n",
        sandbox.addr,
        more(settings)
    )
}

/// A `providers:` entry for movingimage at the sandbox (the sandbox's
/// user and password unless `settings` names `password`).
pub fn movingimage_provider(name: &str, sandbox: &Sandbox, settings: &str) -> String {
    let credentials = if settings.contains("password:") {
        ", username: \"sandbox-user\"".to_string()
    } else {
        ", username: \"sandbox-user\", password: \"sandbox-password\"".to_string()
    };
    format!(
        "{name}: {{ type: movingimage, base_url: \"http://{addr}/v1/vms\", \
         auth_url: \"http://{addr}/auth/realms/platform/protocol/openid-connect/token\", \
         video_manager_id: \"1234\"{credentials}{} }}\n",
        more(settings),
        addr = sandbox.addr,
    )
}

impl Fixture {
    /// A fixture whose files all go to provider `name`, described by the
    /// `providers` entries, with the rule's `metadata` (a flow mapping).
    pub fn with_provider(providers: &str, name: &str, metadata: &str) -> Self {
        let fixture = Fixture::new();
        fixture.write_provider_config(providers, name, metadata);
        fixture
    }

    /// Rewrite the config so every file goes to provider `name`.
    pub fn write_provider_config(&self, providers: &str, name: &str, metadata: &str) {
        let rule = format!("- match: {{}}\n  provider: {name}\n  metadata: {metadata}");
        self.write_config_parts(ConfigParts {
            providers,
            rules: Some(&rule),
            ..ConfigParts::default()
        });
    }

    /// Write the three [`SIZES`] files into the watch folder; answers
    /// `(name, size, sha256)` for each.
    pub fn write_sizes(&self, seed: u64) -> Vec<(String, u64, String)> {
        SIZES
            .iter()
            .enumerate()
            .map(|(i, (name, size))| {
                let path = self.watch.join(name);
                write_random(&path, *size, seed + i as u64);
                (name.to_string(), *size, sha256(&path))
            })
            .collect()
    }

    /// The receipt of a file filed in done/.
    pub fn receipt(&self, name: &str) -> Value {
        read_json(&self.done.join(format!("{name}.receipt.json")))
    }

    /// The error report of a file filed in failed/.
    pub fn error_report(&self, name: &str) -> Value {
        read_json(&self.failed.join(format!("{name}.error.json")))
    }
}

impl Sandbox {
    /// Kill it and start it again on the same address and data folder with
    /// other options (e.g. without `--token-ttl`).
    pub fn restart_with(&mut self, options: &[&str]) {
        self.set_options(options);
        self.restart();
    }

    /// What one simulator holds (`okru`, `apivideo`, `gcore`, `movingimage`).
    pub fn records(&self, simulator: &str) -> Vec<Value> {
        let path = format!("/_sandbox/{simulator}");
        let (status, body) = self.request("GET", &path, &[]);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The records whose `key` is the string `value`.
    pub fn records_where(&self, simulator: &str, key: &str, value: &str) -> Vec<Value> {
        self.records(simulator)
            .into_iter()
            .filter(|r| r[key] == value)
            .collect()
    }

    /// Where a simulator keeps a remote video's bytes.
    pub fn video_bin(&self, simulator: &str, id: &str) -> PathBuf {
        self.data.join(simulator).join(format!("{id}.bin"))
    }

    /// Poll until a record with `key` = `value` has `field` ≥ `at_least`; answers it.
    pub fn wait_for_record(
        &self,
        simulator: &str,
        (key, value): (&str, &str),
        (field, at_least): (&str, u64),
        deadline: Duration,
    ) -> Value {
        wait_for(
            &format!("{simulator} {key}={value} with {field} >= {at_least}"),
            deadline,
            || {
                self.records_where(simulator, key, value)
                    .into_iter()
                    .find(|r| {
                        r["deleted"] != true && r[field].as_u64().is_some_and(|n| n >= at_least)
                    })
            },
        )
    }
}

impl Sandbox {
    /// The one record with `key` = `value` once its `bytes_received` has
    /// stopped growing for a while: after a `kill -9` the sandbox still
    /// reads what the dead client left in the socket buffers, and may even
    /// complete a chunk from them.
    pub fn settled_record(&self, simulator: &str, (key, value): (&str, &str)) -> Value {
        const QUIET: Duration = Duration::from_millis(300);
        let mut last: Option<(u64, std::time::Instant)> = None;
        wait_for(
            &format!("{simulator} {key}={value} to stop receiving"),
            Duration::from_secs(30),
            || {
                let mut records = self.records_where(simulator, key, value);
                assert_eq!(
                    records.len(),
                    1,
                    "one record with {key}={value}: {records:?}"
                );
                let record = records.remove(0);
                let bytes = record["bytes_received"].as_u64().unwrap_or(0);
                match last {
                    Some((seen, since)) if seen == bytes => {
                        (since.elapsed() >= QUIET).then_some(record)
                    }
                    _ => {
                        last = Some((bytes, std::time::Instant::now()));
                        None
                    }
                }
            },
        )
    }
}

/// A record's id as text (numeric ids included).
pub fn id_of(record: &Value, key: &str) -> String {
    match &record[key] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("record without {key}: {other} in {record}"),
    }
}

/// A delivered file's receipt: it names video `id` and the file's sha256,
/// and the file is filed in done/. Answers the receipt for more checks.
pub fn assert_receipt(fx: &Fixture, name: &str, id: &str, hash: &str) -> Value {
    let receipt = fx.receipt(name);
    assert_eq!(receipt["remote_id"], id, "{receipt}");
    assert_eq!(receipt["sha256"], hash, "{receipt}");
    assert!(fx.done.join(name).exists(), "{name} filed in done/");
    receipt
}

/// Poll status until `count` jobs are done; panics at once when one fails.
pub fn wait_done(fx: &Fixture, daemon: &Daemon, count: usize, deadline: Duration) -> Vec<Value> {
    wait_for(&format!("{count} jobs done"), deadline, || {
        let rows = fx.status();
        let failed = in_state(&rows, "failed");
        assert!(
            failed.is_empty(),
            "unexpected failure: {failed:?}\nlog:\n{}",
            daemon.log()
        );
        (in_state(&rows, "done").len() == count).then_some(rows)
    })
}

/// Poll status until `count` jobs have failed.
pub fn wait_failed(fx: &Fixture, count: usize, deadline: Duration) -> Vec<Value> {
    wait_for(&format!("{count} jobs failed"), deadline, || {
        let rows = fx.status();
        (in_state(&rows, "failed").len() == count).then_some(rows)
    })
}

/// Panic when `secret` shows up in the daemon log, the status output or
/// any receipt or error report under the fixture's done/ and failed/.
pub fn assert_secret_absent(fx: &Fixture, daemon: &Daemon, secret: &str) {
    let mut everything = daemon.log();
    everything.push_str(&serde_json::to_string(&fx.status()).unwrap_or_default());
    for dir in [&fx.done, &fx.failed] {
        for file in Fixture::files_in(dir) {
            if file.ends_with(".json") {
                everything.push_str(&std::fs::read_to_string(dir.join(&file)).unwrap_or_default());
            }
        }
    }
    assert!(
        !everything.contains(secret),
        "the secret {secret:?} leaked:\n{everything}"
    );
}

/// One HTTP/1.1 request with a body over a fresh connection; answers the
/// status and the body (for answers the sandbox sends with a length).
pub fn http_with_body(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the sandbox");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send head");
    stream.write_all(body).expect("send body");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The name without its extension (`{stem}` in metadata templates).
pub fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

impl Sandbox {
    /// What a simulator's token endpoint handed out (`/_sandbox/<simulator>/auth`).
    pub fn grants(&self, simulator: &str) -> Value {
        let path = format!("/_sandbox/{simulator}/auth");
        let (status, body) = self.request("GET", &path, &[]);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

/// One provider as tests/{okru,apivideo,gcore,movingimage}.rs drive it: the
/// test shapes they share (three sizes, faults, `kill -9`, expiring and
/// refused tokens, wrong credentials) are methods here, and each file
/// keeps short `#[test]`s that call them with what is its own.
pub struct ProviderCase {
    /// The simulator: `/_sandbox/<simulator>`, `<SIMULATOR>_SEED`.
    pub simulator: &'static str,
    /// How reports and log lines name the provider (`OK.ru`, `api.video`).
    pub label: &'static str,
    /// The provider's name in the config.
    pub name: &'static str,
    /// The `providers:` entry at a sandbox, e.g. [`okru_provider`].
    pub entry: fn(&str, &Sandbox, &str) -> String,
    /// The rule's metadata (a flow mapping).
    pub metadata: &'static str,
    /// The chunk size the tests use unless they say otherwise.
    pub chunk: u64,
    /// The record key finding a file's video: its file name, or its title
    /// (`{stem}`) when [`Self::by_stem`].
    pub record_key: &'static str,
    pub by_stem: bool,
    /// The record key holding the title from `{stem}`.
    pub title_key: &'static str,
    /// Whether the simulator keeps deleted videos as records (so "no other
    /// video" counts the live ones).
    pub deletes: bool,
    /// The provider's checks of a delivered file (fixture, sandbox, name,
    /// size, sha256); answers the video's record.
    pub delivered: fn(&Fixture, &Sandbox, &str, u64, &str) -> Value,
}

/// One provider entry with wrong credentials, for
/// [`ProviderCase::wrong_credentials`].
pub struct BadCredentials<'a> {
    /// The provider's name, and (with more than one) the folder its file is dropped in.
    pub provider: &'a str,
    /// The settings overriding the credentials.
    pub settings: String,
    /// The HTTP status the report must carry, if the provider answers with one.
    pub status: Option<u16>,
    /// What the report's reason must contain (code, cause).
    pub causes: &'a [&'a str],
}

/// A dropped file: its size and sha256.
pub struct Source {
    pub name: &'static str,
    pub size: u64,
    pub hash: String,
}

impl ProviderCase {
    /// `chunk_size` and [`GENEROUS_RETRY`] after `extra` settings.
    pub fn settings(&self, extra: &str, chunk: u64) -> String {
        let chunk = format!("chunk_size: {}MiB, {GENEROUS_RETRY}", chunk / MIB);
        if extra.is_empty() {
            chunk
        } else {
            format!("{extra}, {chunk}")
        }
    }

    /// A fixture and a sandbox started with `options`; every file goes to
    /// this provider with `extra` settings in chunks of `chunk`.
    pub fn setup_with(&self, options: &[&str], extra: &str, chunk: u64) -> (Fixture, Sandbox) {
        let fx = Fixture::new();
        let sandbox = Sandbox::start(&fx.root.join("sandbox"), options);
        let provider = (self.entry)(self.name, &sandbox, &self.settings(extra, chunk));
        fx.write_provider_config(&provider, self.name, self.metadata);
        (fx, sandbox)
    }

    /// [`Self::setup_with`] with no extra settings and the usual chunk.
    pub fn setup(&self, options: &[&str]) -> (Fixture, Sandbox) {
        self.setup_with(options, "", self.chunk)
    }

    /// Drop `name` (`size` random bytes from `seed`) into the watch folder.
    pub fn drop_file(fx: &Fixture, name: &'static str, size: u64, seed: u64) -> Source {
        let path = fx.watch.join(name);
        write_random(&path, size, seed);
        Source {
            name,
            size,
            hash: sha256(&path),
        }
    }

    /// How a file's video is found: `(record_key, file name or stem)`.
    pub fn key_of<'n>(&self, name: &'n str) -> (&'static str, &'n str) {
        (
            self.record_key,
            if self.by_stem { stem(name) } else { name },
        )
    }

    /// The one video of file `name` (found by [`Self::key_of`]; with
    /// [`Self::deletes`], the one live video).
    pub fn only_video(&self, sandbox: &Sandbox, name: &str) -> Value {
        let (key, value) = self.key_of(name);
        let mut videos: Vec<Value> = sandbox
            .records_where(self.simulator, key, value)
            .into_iter()
            .filter(|v| !self.deletes || v["deleted"] != true)
            .collect();
        let live = if self.deletes { "live " } else { "" };
        assert_eq!(
            videos.len(),
            1,
            "exactly one {live}{} video with {key}={value}: {videos:?}",
            self.label
        );
        videos.remove(0)
    }

    /// The simulator's records; with [`Self::deletes`], the live ones only.
    pub fn live_records(&self, sandbox: &Sandbox) -> usize {
        sandbox
            .records(self.simulator)
            .into_iter()
            .filter(|v| !self.deletes || v["deleted"] != true)
            .count()
    }

    /// 1 KiB, 7 MiB and 23 MiB: each arrives byte-identical as one video
    /// (the provider's delivered checks) titled from `{stem}`, described
    /// `From drop: <name>`, and no other video is made; `each` adds the
    /// provider's own checks of a file's video. Answers the fixture and
    /// the sandbox for more checks.
    pub fn three_sizes(&self, each: impl Fn(&Fixture, &str, &Value)) -> (Fixture, Sandbox) {
        let (fx, sandbox) = self.setup(&[]);
        let files = fx.write_sizes(1);

        let started = Instant::now();
        let daemon = fx.start();
        wait_done(&fx, &daemon, files.len(), Duration::from_secs(60));
        eprintln!("three sizes to {} in {:?}", self.label, started.elapsed());

        for (name, size, hash) in &files {
            let video = (self.delivered)(&fx, &sandbox, name, *size, hash);
            assert_eq!(
                video[self.title_key],
                stem(name),
                "title from {{stem}}: {video}"
            );
            assert_eq!(
                video["description"],
                format!("From drop: {name}"),
                "{video}"
            );
            each(&fx, name, &video);
        }
        assert_eq!(
            sandbox.records(self.simulator).len(),
            files.len(),
            "no other video was made"
        );
        (fx, sandbox)
    }

    /// Through 500s, dropped connections and 429s (seed from
    /// `<SIMULATOR>_SEED`, else 5) in chunks of `chunk`: the faults were
    /// injected, every file arrives, and as exactly one (live) video.
    pub fn faults(&self, chunk: u64) {
        let var = format!("{}_SEED", self.simulator.to_uppercase());
        let seed = std::env::var(var).unwrap_or_else(|_| "5".into());
        let options = fault_options(&seed);
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let (fx, sandbox) = self.setup_with(&options, "", chunk);
        let files = fx.write_sizes(10);

        let started = Instant::now();
        let daemon = fx.start();
        wait_done(&fx, &daemon, files.len(), Duration::from_secs(90));
        eprintln!(
            "three sizes to {} through faults in {:?}",
            self.label,
            started.elapsed()
        );

        let stats = sandbox.stats();
        assert!(
            stats.failures > 0 && stats.resets > 0 && stats.rate_limited > 0,
            "the faults were injected: {stats:?}"
        );
        for (name, size, hash) in &files {
            (self.delivered)(&fx, &sandbox, name, *size, hash);
        }
        assert_eq!(
            self.live_records(&sandbox),
            files.len(),
            "no other video was made"
        );
    }

    /// 24 MiB at 8 MiB/s, `kill -9` once the server holds about a third,
    /// then a restart: once the server has stopped receiving, `resume_at`
    /// gets its byte count and answers the offset the job must go on from
    /// and why; the file arrives on the one video, and the server received
    /// at most one chunk again. Answers the fixture, sandbox and video.
    pub fn kill_9_resumes(
        &self,
        resume_at: impl FnOnce(&Fixture, u64) -> (u64, &'static str),
    ) -> (Fixture, Sandbox, Value) {
        const SIZE: u64 = 24 * MIB;
        let (fx, sandbox) = self.setup(&["--throttle", "8MiB"]);
        let source = Self::drop_file(&fx, "crash.mp4", SIZE, 3);
        let key = self.key_of(source.name);

        let started = Instant::now();
        let mut daemon = fx.start();
        sandbox.wait_for_record(
            self.simulator,
            key,
            ("received", SIZE * 3 / 10),
            Duration::from_secs(30),
        );
        daemon.kill9();
        let at_kill = sandbox.settled_record(self.simulator, key);
        let received = at_kill["received"].as_u64().unwrap_or(0);
        assert!(
            received < SIZE,
            "finished before the kill; throttle harder: {at_kill}"
        );
        let (offset, why) = resume_at(&fx, received);

        let daemon = fx.start();
        wait_done(&fx, &daemon, 1, Duration::from_secs(60));
        eprintln!(
            "24 MiB to {} with a crash in {:?}",
            self.label,
            started.elapsed()
        );

        assert_eq!(
            daemon.resume_offsets().first().copied(),
            Some(offset),
            "resumed from {why}:\n{}",
            daemon.log()
        );
        let video = (self.delivered)(&fx, &sandbox, source.name, SIZE, &source.hash);
        let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
        assert!(
            bytes <= SIZE + self.chunk,
            "the server received {bytes} bytes for {SIZE}: more than one chunk again"
        );
        assert_eq!(sandbox.records(self.simulator).len(), 1, "no second video");
        (fx, sandbox, video)
    }

    /// Access tokens (and whatever else the sandbox's `--token-ttl` covers)
    /// that live 2 s against a 24 MiB upload at 6 MiB/s: the token is
    /// refreshed and the file arrives on one video without a chunk sent
    /// twice. Answers the sandbox and the video for more checks.
    pub fn tokens_expiring_mid_upload(&self) -> (Sandbox, Value) {
        const SIZE: u64 = 24 * MIB;
        let (fx, sandbox) = self.setup(&["--token-ttl", "2s", "--throttle", "6MiB"]);
        let source = Self::drop_file(&fx, "long.mp4", SIZE, 4);

        let started = Instant::now();
        let daemon = fx.start();
        wait_done(&fx, &daemon, 1, Duration::from_secs(60));
        let took = started.elapsed();
        eprintln!("24 MiB to {} with 2 s tokens in {took:?}", self.label);
        assert!(
            took > Duration::from_secs(3),
            "the upload outlived a token: {took:?}"
        );

        let video = (self.delivered)(&fx, &sandbox, source.name, SIZE, &source.hash);
        // Renewed by its refresh token; on a loaded machine a request sent
        // just inside the token's life can arrive after it, be refused, and
        // the client then logs in again (the refused token is dropped with
        // its refresh token), which renews it just as well.
        let grants = sandbox.grants(self.simulator);
        assert!(
            grants["refresh"].as_u64() >= Some(1) || grants["password"].as_u64() >= Some(2),
            "the access token was renewed: {grants}"
        );
        let bytes = video["bytes_received"].as_u64().unwrap_or(u64::MAX);
        assert!(
            bytes <= SIZE + self.chunk,
            "{bytes} bytes received for {SIZE}"
        );
        assert_eq!(sandbox.records(self.simulator).len(), 1, "no second video");
        (sandbox, video)
    }

    /// Access tokens refused as soon as they are issued (a zero lifetime):
    /// the job authenticates again once (the `grant` count reaches 2), then
    /// fails with a 401 report saying the new token was refused too; no
    /// retry storm, no video, and `secret` shows up nowhere.
    pub fn tokens_refused_right_after_authentication(&self, grant: &str, secret: &str) {
        let (fx, sandbox) = self.setup(&["--token-ttl", "0s"]);
        write_random(&fx.watch.join("clip.mp4"), 3 * MIB, 1);

        let daemon = fx.start();
        wait_failed(&fx, 1, Duration::from_secs(30));

        let report = fx.error_report("clip.mp4");
        assert_eq!(report["status"], 401, "{report}");
        let reason = report["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(self.label) && reason.contains("refused again right after"),
            "{report}"
        );
        assert_eq!(
            report["attempts"], 2,
            "one more attempt, with a new token: {report}"
        );
        let grants = sandbox.grants(self.simulator);
        assert_eq!(grants[grant], 2, "one re-authentication: {grants}");
        let stats = sandbox.stats();
        assert!(stats.requests <= 4, "{stats:?}");
        assert!(sandbox.records(self.simulator).is_empty());
        assert_secret_absent(&fx, &daemon, secret);
    }

    /// Each of `bad` as its own provider (in chunks of `chunk`), a 3 MiB
    /// clip for each (`clip.mp4` for one, `<provider>/clip.mp4` routed by
    /// folder for more): each job fails at once, not retried, with a report
    /// naming its provider, [`Self::label`], the status and the causes;
    /// at most `max_requests` requests in all, no video, and none of
    /// `secrets` shows up in the reports, status or the log.
    pub fn wrong_credentials(
        &self,
        bad: &[BadCredentials<'_>],
        chunk: u64,
        max_requests: u64,
        secrets: &[&str],
    ) {
        let fx = Fixture::new();
        let sandbox = Sandbox::start(&fx.root.join("sandbox"), &[]);
        let one = bad.len() == 1;
        let file = |p: &str| {
            if one {
                "clip.mp4".to_string()
            } else {
                format!("{p}/clip.mp4")
            }
        };
        let providers: String = bad
            .iter()
            .map(|b| (self.entry)(b.provider, &sandbox, &self.settings(&b.settings, chunk)))
            .collect();
        let rules: String = bad
            .iter()
            .map(|b| {
                let p = b.provider;
                let matcher = if one {
                    "{}".to_string()
                } else {
                    format!("{{ glob: \"{p}/**\" }}")
                };
                format!(
                    "- match: {matcher}\n  provider: {p}\n  metadata: {}\n",
                    self.metadata
                )
            })
            .collect();
        fx.write_config_parts(ConfigParts {
            providers: &providers,
            rules: Some(&rules),
            ..ConfigParts::default()
        });
        for (i, b) in bad.iter().enumerate() {
            write_random(&fx.watch.join(file(b.provider)), 3 * MIB, i as u64 + 1);
        }

        let daemon = fx.start();
        wait_failed(&fx, bad.len(), Duration::from_secs(30));

        for b in bad {
            let report = fx.error_report(&file(b.provider));
            assert_eq!(report["provider"], b.provider, "{report}");
            if let Some(status) = b.status {
                assert_eq!(report["status"], status, "{report}");
            }
            let reason = report["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains(self.label),
                "the report names {}: {report}",
                self.label
            );
            for cause in b.causes {
                assert!(
                    reason.contains(cause),
                    "the report names the cause {cause:?}: {report}"
                );
            }
            assert_eq!(report["attempts"], 1, "not retried: {report}");
        }
        let stats = sandbox.stats();
        assert!(
            stats.requests <= max_requests,
            "a request or two per job: {stats:?}"
        );
        assert!(sandbox.records(self.simulator).is_empty());
        for secret in secrets {
            assert_secret_absent(&fx, &daemon, secret);
        }
    }
}
