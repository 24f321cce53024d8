//! The OK.ru, api.video, Gcore and movingimage simulators of `hotfolder
//! sandbox` as test peers, for tests/{okru,apivideo,gcore,movingimage}.rs:
//! provider entries pointing at a sandbox, a fixture whose every file goes
//! to one such provider, the simulators' records (`/_sandbox/<name>`) and
//! received bytes, and the waits and checks those tests share.

use std::path::PathBuf;
use std::time::Duration;

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
