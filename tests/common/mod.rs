//! Shared fixtures for the integration tests: a temporary appliance folder
//! (watch folder, outbox, done/failed, state), a config writer, the real
//! binary spawned and killed on drop, and polling with a deadline.
#![allow(dead_code)]

/// Headless Chromium, for tests/status_page.rs and tests/fleet.rs.
pub mod browser;
/// A private PostgreSQL server, for tests/fleet.rs.
pub mod postgres;
/// The OK.ru, api.video, Gcore and movingimage simulators as peers, for
/// tests/{okru,apivideo,gcore,movingimage}.rs.
pub mod providers;
/// `hotfolder sandbox` as a peer, for tests/tus.rs.
pub mod sandbox;
/// The official tus server (npm) as a peer, for tests/tus_peer.rs.
pub mod tus_peer;
/// A local webhook receiver, for tests/notify.rs and tests/reload.rs.
pub mod webhook;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// An address on 127.0.0.1 nothing listens on now (for a daemon's
/// `http:` block, or a receiver started later).
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hotfolder")
}

/// Top-level keys the fixture's config sets unless `top_extra` sets them.
const TOP_LEVEL_DEFAULTS: [(&str, &str); 4] = [
    ("state_dir", "./state"),
    ("workers", "4"),
    ("shutdown_timeout", "10s"),
    ("log", "{ level: \"info,hotfolder=debug\" }"),
];

/// A temporary appliance: `<root>/drop` watched, `<root>/outbox` the folder
/// provider's target, `<root>/done/drop` and `<root>/failed/drop` by default.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub watch: PathBuf,
    pub outbox: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

impl Fixture {
    /// A fixture with the default config (stable_for 300ms).
    pub fn new() -> Self {
        Self::with_config("", "", "")
    }

    /// A fixture whose config gets `watch_extra` lines (indented 4) in the
    /// watch, `provider_extra` in the folder provider and `top_extra` at top level.
    pub fn with_config(watch_extra: &str, provider_extra: &str, top_extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hotfolder-test-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let fixture = Fixture {
            watch: root.join("drop"),
            outbox: root.join("outbox"),
            done: root.join("done/drop"),
            failed: root.join("failed/drop"),
            state: root.join("state"),
            config: root.join("hotfolder.yaml"),
            root,
            dir,
        };
        fs::create_dir_all(&fixture.watch).expect("watch dir");
        fixture.write_config(watch_extra, provider_extra, top_extra);
        fixture
    }

    /// Rewrite the config. A key set at the start of a line in `top_extra`
    /// replaces the fixture's default for it (e.g. `shutdown_timeout: 5s`).
    pub fn write_config(&self, watch_extra: &str, provider_extra: &str, top_extra: &str) {
        let top_defaults: String = TOP_LEVEL_DEFAULTS
            .iter()
            .filter(|(key, _)| !top_extra.lines().any(|l| l.starts_with(&format!("{key}:"))))
            .map(|(key, value)| format!("{key}: {value}\n"))
            .collect();
        let text = format!(
            "{top_defaults}{top_extra}\n\
defaults:\n  stable_for: 300ms\n  rescan_every: 2s\n  retry: {{ max_attempts: 3, initial_backoff: 100ms, max_backoff: 500ms }}\n\
watches:\n  - name: drop\n    path: ./drop\n{watch}\n\
providers:\n  archive:\n    type: folder\n    path: ./outbox\n{provider}\n\
rules:\n  - match: {{}}\n    provider: archive\n    metadata: {{ title: \"{{stem}}\" }}\n",
            watch = indent(watch_extra, 4),
            provider = indent(provider_extra, 4),
        );
        fs::write(&self.config, text).expect("write config");
    }

    /// Write a raw config file.
    pub fn write_raw_config(&self, text: &str) {
        fs::write(&self.config, text).expect("write config");
    }

    /// Run `hotfolder ARGS -c <config>` to completion.
    pub fn hotfolder(&self, args: &[&str]) -> Output {
        self.hotfolder_with(&self.config, args)
    }

    /// Run `hotfolder ARGS -c CONFIG` (another config beside the fixture's,
    /// e.g. another node's) from the fixture's root, to completion.
    pub fn hotfolder_with(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("-c")
            .arg(config)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .expect("run hotfolder")
    }

    /// `hotfolder status --json`, parsed.
    pub fn status(&self) -> Vec<serde_json::Value> {
        let out = self.hotfolder(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Poll `status` until job `file` has `at_least` bytes delivered (live
    /// progress while the daemon runs); answers the bytes seen.
    pub fn wait_for_bytes(&self, file: &str, at_least: u64, deadline: Duration) -> u64 {
        wait_for(
            &format!("{at_least} bytes of {file} delivered"),
            deadline,
            || {
                let rows = self.status();
                let bytes =
                    rows.iter().find(|r| r["file"] == file)?["bytes_acknowledged"].as_u64()?;
                (bytes >= at_least).then_some(bytes)
            },
        )
    }

    /// How many receipts `name` has in done/ (`name.receipt.json`,
    /// `name.receipt-1.json`, ...).
    pub fn receipt_count(&self, name: &str) -> usize {
        let prefix = format!("{name}.receipt");
        Self::files_in(&self.done)
            .iter()
            .filter(|f| f.starts_with(&prefix) && f.ends_with(".json"))
            .count()
    }

    /// Files in the folder provider's partial folder other than the
    /// `.delivered` markers: data of unfinished deliveries.
    pub fn partial_leftovers(&self) -> Vec<String> {
        fs::read_dir(self.outbox.join(".hotfolder-partial"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".delivered"))
            .collect()
    }

    /// Start the daemon.
    pub fn start(&self) -> Daemon {
        self.start_with(Command::new(bin()))
    }

    /// Start the daemon, allowing it `deadline` to say it runs (a start
    /// that reads a long history on a loaded machine).
    pub fn start_within(&self, deadline: Duration) -> Daemon {
        self.start_with_deadline(Command::new(bin()), deadline)
    }

    /// Start the daemon with failpoints set (`FAILPOINTS`, see
    /// src/failpoint.rs), e.g. `"filing::after_move=return"`.
    pub fn start_with_failpoints(&self, failpoints: &str) -> Daemon {
        let mut command = Command::new(bin());
        command.env("FAILPOINTS", failpoints);
        self.start_with(command)
    }

    /// Start the daemon with failpoints that stop it (abort) at a step,
    /// and wait until it has stopped there; panics if it exits any other
    /// way or not within `deadline` (e.g. a binary built without
    /// `--features failpoints`, whose points never fire).
    pub fn run_until_failpoint(&self, failpoints: &str, deadline: Duration) -> String {
        let mut daemon = self.start_with_failpoints(failpoints);
        let status = wait_for(
            &format!("the daemon to stop at failpoint {failpoints}"),
            deadline,
            || daemon.child.try_wait().expect("try_wait"),
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "the daemon should have stopped at {failpoints} (is the test binary built with --features failpoints?); it exited with {status}; log:\n{}",
            daemon.log()
        );
        daemon.log()
    }

    /// Start the daemon as an unprivileged user when the tests run as root
    /// (root ignores file modes, which the permission tests rely on).
    pub fn start_unprivileged(&self) -> Daemon {
        if !is_root() {
            return self.start();
        }
        make_world_accessible(&self.root);
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin());
        self.start_with(command)
    }

    fn start_with(&self, command: Command) -> Daemon {
        self.start_with_deadline(command, Duration::from_secs(20))
    }

    fn start_with_deadline(&self, command: Command, deadline: Duration) -> Daemon {
        let log = self.root.join(format!("daemon-{}.log", unique()));
        self.run_daemon(command, &self.config, log, deadline)
    }

    /// Start `hotfolder run -c CONFIG` (another node's config beside the
    /// fixture's) with `env` set, logging beside its config; waits until it
    /// runs.
    pub fn start_node(&self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(bin());
        command.envs(env.iter().copied());
        let log = config.with_extension("log");
        self.run_daemon(command, config, log, Duration::from_secs(20))
    }

    fn run_daemon(
        &self,
        mut command: Command,
        config: &Path,
        log: PathBuf,
        deadline: Duration,
    ) -> Daemon {
        let log_file = fs::File::create(&log).expect("log file");
        let child = command
            .arg("run")
            .arg("-c")
            .arg(config)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log clone"))
            .stderr(log_file)
            .spawn()
            .expect("spawn hotfolder run");
        let daemon = Daemon { child, log };
        wait_for("the daemon to start", deadline, || {
            daemon.log().contains("hotfolder running").then_some(())
        });
        daemon
    }

    /// Files under `dir` (relative paths, sorted), skipping hidden folders.
    pub fn files_in(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        collect(dir, dir, &mut out);
        out.sort();
        out
    }
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') {
                collect(base, &path, out);
            }
        } else {
            out.push(
                path.strip_prefix(base)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// True when the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// chmod a+rwx every folder and a+rw every file below `root` (and root's
/// parents' traversal), so an unprivileged daemon can work there.
pub fn make_world_accessible(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o777));
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(meta) = fs::metadata(&path) {
                let mode = meta.permissions().mode();
                if mode & 0o777 != 0 {
                    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o666));
                }
            }
        }
    }
}

/// A running `hotfolder run`, killed with SIGKILL when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Everything it logged so far, without terminal colour codes (the
    /// text log colours even when stderr is a file).
    pub fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The `offset=` of every "resuming" line it logged, in order.
    pub fn resume_offsets(&self) -> Vec<u64> {
        self.log()
            .lines()
            .filter(|line| line.contains(" resuming "))
            .filter_map(|line| field(line, "offset")?.parse().ok())
            .collect()
    }

    /// True while the process has not exited.
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with a valid pid and signal number.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `deadline` for the exit; answers the status
    /// and how long the exit took.
    pub fn terminate(&mut self, deadline: Duration) -> (ExitStatus, Duration) {
        self.stop_with(libc::SIGTERM, deadline)
    }

    /// Send `signal`, then wait up to `deadline` for the exit; answers the
    /// status and how long the exit took.
    pub fn stop_with(&mut self, signal: i32, deadline: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(signal);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < deadline,
                "daemon did not exit within {deadline:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=value` in a text log line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split_whitespace().next()
}

/// Poll `check` every 20 ms until it answers `Some`, or panic after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(deadline, check)
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// Poll `check` every 20 ms until it answers `Some`; `None` once `deadline`
/// has passed (for callers that report before they fail).
pub fn poll<T>(deadline: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// sha256 of a file, hex.
pub fn sha256(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::io::copy(&mut file, &mut hasher).expect("hash");
    hex::encode(hasher.finalize())
}

/// True when two files hold the same bytes (cheaper than two sha256 passes
/// in a debug build).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    if fa.metadata().expect("stat").len() != fb.metadata().expect("stat").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).expect("read");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Write `size` pseudo-random bytes (deterministic per seed), creating folders.
pub fn write_random(path: &Path, size: u64, seed: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    let mut file = fs::File::create(path).expect("create");
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    file.sync_all().expect("sync");
}

/// Jobs in a state.
pub fn in_state<'a>(rows: &'a [serde_json::Value], state: &str) -> Vec<&'a serde_json::Value> {
    rows.iter().filter(|r| r["state"] == state).collect()
}

/// Config pieces beyond [`Fixture::with_config`]'s: more providers, and a
/// rule list of its own (the fixture's default is one catch-all rule to
/// `archive` with `title: "{stem}"`).
#[derive(Debug, Default, Clone, Copy)]
pub struct ConfigParts<'a> {
    /// Lines in the watch (indented 4).
    pub watch: &'a str,
    /// Lines in the `archive` folder provider (indented 4).
    pub archive: &'a str,
    /// Top-level lines (e.g. `unmatched: fail`).
    pub top: &'a str,
    /// More providers (indented 2), e.g. `ro: { type: folder, path: ./ro }`.
    pub providers: &'a str,
    /// The rule list (indented 2); `None` keeps the catch-all rule.
    pub rules: Option<&'a str>,
}

impl Fixture {
    /// A fixture whose config is built from `parts`.
    pub fn with_parts(parts: ConfigParts<'_>) -> Self {
        let fixture = Self::new();
        fixture.write_config_parts(parts);
        fixture
    }

    /// Rewrite the config from `parts`: [`Fixture::write_config`], then the
    /// extra providers spliced in and the rule list replaced.
    pub fn write_config_parts(&self, parts: ConfigParts<'_>) {
        self.write_config(parts.watch, parts.archive, parts.top);
        let text = fs::read_to_string(&self.config).expect("read config");
        let (head, default_rules) = text
            .split_once("\nrules:\n")
            .expect("the fixture config has rules");
        let head = head.replacen(
            "\nproviders:\n",
            &format!("\nproviders:\n{}", indent(parts.providers, 2)),
            1,
        );
        let rules = parts
            .rules
            .map_or_else(|| default_rules.to_string(), |r| indent(r, 2));
        fs::write(&self.config, format!("{head}\nrules:\n{rules}")).expect("write config");
    }
}

/// The standard output of a command that must have succeeded (else its
/// exit code and both outputs, as the failure).
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A JSON file (receipt, error report, sidecar), parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Set a file's or folder's permission bits (e.g. 0o000, 0o555).
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// How many lines of `log` contain every one of `needles`.
pub fn log_lines_with(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

/// Wait (30 s at most) until exactly `done` jobs are done and `failed`
/// failed, and no others exist; answers the status rows.
pub fn wait_for_outcome(fx: &Fixture, done: usize, failed: usize) -> Vec<serde_json::Value> {
    wait_for(
        &format!("{done} done and {failed} failed"),
        Duration::from_secs(30),
        || {
            let rows = fx.status();
            (in_state(&rows, "done").len() == done
                && in_state(&rows, "failed").len() == failed
                && rows.len() == done + failed)
                .then_some(rows)
        },
    )
}

/// The value of the metric `name` in a `/metrics` text.
pub fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// The metric `name` as the daemon listening on `address` reports it now.
pub fn counter(address: &str, name: &str) -> f64 {
    let (_, metrics) = sandbox::http(address, "GET", "/metrics", &[]).expect("metrics");
    gauge(&metrics, name).unwrap_or_else(|| panic!("{name} missing from /metrics"))
}
