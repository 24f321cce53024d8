//! `hotfolder sandbox` as a test peer: spawned on 127.0.0.1:0 with the
//! given fault options, its address read from the line it prints, its tus
//! uploads and counters read from `/_sandbox/tus` and `/_sandbox/stats`,
//! restartable on the same address and data folder, killed when dropped.
//!
//! HTTP to the sandbox is a few lines over `std::net::TcpStream`: the tests
//! need GET, HEAD and DELETE without bodies, so no HTTP client is pulled into
//! the dev-dependencies.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigParts, Fixture, bin, wait_for};

/// How long the sandbox may take to print its address.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// One tus upload as the sandbox reports it (`<data>/tus/<id>.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct TusUpload {
    /// Upload id, the last segment of its URL.
    pub id: String,
    /// `Upload-Length`.
    pub length: u64,
    /// Bytes committed.
    pub offset: u64,
    /// Decoded `Upload-Metadata` (`filename`, `filetype`, `hotfolder_job`, ...).
    pub metadata: BTreeMap<String, String>,
    /// Body bytes received, resends included.
    pub bytes_received: u64,
    /// PATCH requests seen.
    pub patches: u64,
    /// Deleted by a client.
    pub terminated: bool,
    /// `partial` or `final` (concatenation), none for a plain upload.
    #[serde(default)]
    pub concat: Option<String>,
    /// A final upload's partial uploads, in order.
    #[serde(default)]
    pub parts: Vec<String>,
}

impl TusUpload {
    /// The `filename` metadata.
    pub fn filename(&self) -> &str {
        self.metadata.get("filename").map_or("", String::as_str)
    }

    /// Every byte committed.
    pub fn complete(&self) -> bool {
        !self.terminated && self.offset == self.length
    }
}

/// Request and fault counters (`/_sandbox/stats`).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Stats {
    /// Requests seen on the simulated APIs.
    pub requests: u64,
    /// 500s injected.
    pub failures: u64,
    /// Connections dropped.
    pub resets: u64,
    /// 429s injected.
    pub rate_limited: u64,
    /// 502s sent after the request was handled.
    #[serde(default)]
    pub gateway_errors: u64,
    /// The most request bodies received at once.
    #[serde(default)]
    pub bodies_in_flight_peak: u64,
}

/// A running `hotfolder sandbox`, killed (SIGKILL) when dropped.
pub struct Sandbox {
    child: Option<Child>,
    /// `IP:PORT` it listens on (kept across restarts).
    pub addr: String,
    /// Its `--data` folder.
    pub data: PathBuf,
    /// Options after `--listen` and `--data`.
    options: Vec<String>,
    /// Its stderr, appended across restarts.
    pub log: PathBuf,
}

impl Sandbox {
    /// Start a sandbox on 127.0.0.1:0 keeping its data in `data`, with
    /// `options` (e.g. `["--fail-rate", "0.1", "--seed", "3"]`).
    pub fn start(data: &Path, options: &[&str]) -> Self {
        fs::create_dir_all(data).expect("sandbox data dir");
        let log = data.with_extension("log");
        let mut sandbox = Sandbox {
            child: None,
            addr: "127.0.0.1:0".into(),
            data: data.to_path_buf(),
            options: options.iter().map(|s| s.to_string()).collect(),
            log,
        };
        sandbox.spawn();
        sandbox
    }

    /// The tus creation endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}/tus/files/", self.addr)
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("sandbox log");
        let mut child = Command::new(bin())
            .arg("sandbox")
            .args(["--listen", &self.addr])
            .arg("--data")
            .arg(&self.data)
            .args(&self.options)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn hotfolder sandbox");
        let stdout = child.stdout.take().expect("piped stdout");
        // Read the line on a thread so a sandbox that never prints cannot
        // hang the test past the deadline.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_DEADLINE).unwrap_or_default();
        self.child = Some(child);
        let addr = line
            .strip_prefix("sandbox listening on http://")
            .and_then(|rest| rest.split_whitespace().next());
        match addr {
            Some(addr) => self.addr = addr.to_string(),
            None => panic!(
                "the sandbox did not print its address (got {line:?}); its log:\n{}",
                self.log_text()
            ),
        }
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap (no-op when not running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill it and start it again on the same address and data folder: it
    /// reloads its uploads from disk.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start it again after [`Sandbox::kill`], on the same address and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the sandbox is still running");
        self.spawn();
    }

    /// Replace the options the next start uses (e.g. drop `--token-ttl`).
    pub fn set_options(&mut self, options: &[&str]) {
        self.options = options.iter().map(|s| s.to_string()).collect();
    }

    /// One request without a body: answers the status and the body.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        http(&self.addr, method, path, headers)
            .unwrap_or_else(|e| panic!("{method} {path} to the sandbox at {}: {e}", self.addr))
    }

    /// Every tus upload it knows (terminated ones included).
    pub fn uploads(&self) -> Vec<TusUpload> {
        let (status, body) = self.request("GET", "/_sandbox/tus", &[]);
        assert_eq!(status, 200, "GET /_sandbox/tus: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/_sandbox/tus: {e}: {body}"))
    }

    /// The uploads whose `filename` metadata is `name`.
    pub fn uploads_named(&self, name: &str) -> Vec<TusUpload> {
        self.uploads()
            .into_iter()
            .filter(|u| u.filename() == name)
            .collect()
    }

    /// The only upload named `name`, once it exists.
    pub fn upload_named(&self, name: &str) -> Option<TusUpload> {
        let mut uploads = self.uploads_named(name);
        assert!(
            uploads.len() <= 1,
            "more than one upload of {name}: {uploads:?}"
        );
        uploads.pop()
    }

    /// Poll until the live upload of `name` has committed `at_least` bytes;
    /// answers it.
    pub fn wait_for_offset(&self, name: &str, at_least: u64, deadline: Duration) -> TusUpload {
        self.wait_for_upload(
            name,
            &format!("{at_least} bytes committed"),
            deadline,
            |u| u.offset >= at_least,
        )
    }

    /// Poll until a live (not terminated) upload of `name` satisfies `check`
    /// (`bytes_received` counts bytes as they arrive, mid-request; `offset`
    /// moves once per request); answers it.
    pub fn wait_for_upload(
        &self,
        name: &str,
        what: &str,
        deadline: Duration,
        check: impl Fn(&TusUpload) -> bool,
    ) -> TusUpload {
        wait_for(&format!("{name} on the sandbox: {what}"), deadline, || {
            self.uploads_named(name)
                .into_iter()
                .find(|u| !u.terminated && check(u))
        })
    }

    /// Request and fault counters.
    pub fn stats(&self) -> Stats {
        let (status, body) = self.request("GET", "/_sandbox/stats", &[]);
        assert_eq!(status, 200, "GET /_sandbox/stats: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/_sandbox/stats: {e}: {body}"))
    }

    /// Where the sandbox keeps an upload's bytes.
    pub fn bin(&self, id: &str) -> PathBuf {
        self.data.join("tus").join(format!("{id}.bin"))
    }

    /// `DELETE` an upload as a tus client would (termination); answers the status.
    pub fn terminate(&self, id: &str) -> u16 {
        self.request(
            "DELETE",
            &format!("/tus/files/{id}"),
            &[("Tus-Resumable", "1.0.0")],
        )
        .0
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- sandbox log ---\n{}", self.log_text());
        }
    }
}

/// One HTTP/1.1 request without a body over a fresh connection; answers the
/// status and the (de-chunked) body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = |what: &str| std::io::Error::other(format!("{what} in answer: {text:?}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

impl Fixture {
    /// A fixture whose files all go to one tus provider `t` at `endpoint`;
    /// `settings` are more flow-mapping keys for it (e.g. `chunk_size: 1MiB,
    /// retry: { max_attempts: 5, initial_backoff: 50ms, max_backoff: 200ms }`).
    pub fn with_tus(endpoint: &str, settings: &str) -> Self {
        let fixture = Fixture::new();
        fixture.write_tus_config(endpoint, settings);
        fixture
    }

    /// Rewrite the config so every file goes to the tus provider `t`.
    pub fn write_tus_config(&self, endpoint: &str, settings: &str) {
        let provider = tus_provider("t", endpoint, settings);
        self.write_config_parts(ConfigParts {
            providers: &provider,
            rules: Some("- match: {}\n  provider: t\n  metadata: { title: \"{stem}\" }"),
            ..ConfigParts::default()
        });
    }
}

/// A `providers:` entry (one line) for a tus provider.
pub fn tus_provider(name: &str, endpoint: &str, settings: &str) -> String {
    let settings = if settings.trim().is_empty() {
        String::new()
    } else {
        format!(", {settings}")
    };
    format!("{name}: {{ type: tus, endpoint: \"{endpoint}\"{settings} }}\n")
}
