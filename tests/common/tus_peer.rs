//! The official tus server (npm `@tus/server` + `@tus/file-store`) as a test
//! peer: `node tests/peers/tus-server.mjs` spawned on 127.0.0.1:0 with its
//! FileStore in a folder of the caller's choosing, killed when dropped.
//!
//! The Node packages are installed by `scripts/test` (`npm ci --prefix
//! tests/peers`). A missing `node` or missing packages fail the test loudly:
//! a skipped peer test would hide exactly the interoperability it checks.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the server may take to print its URL (a cold `node` start on a
/// loaded CI machine takes a second or two).
const START_DEADLINE: Duration = Duration::from_secs(30);

/// `tests/peers` in the source tree.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// One upload as the FileStore keeps it: `<id>` (the bytes) and `<id>.json`.
#[derive(Debug, Clone)]
pub struct StoredUpload {
    /// The upload id (last segment of its URL).
    pub id: String,
    /// The data file.
    pub data: PathBuf,
    /// `<id>.json`, parsed: `id`, `size`, `offset`, `metadata`, `creation_date`.
    pub info: serde_json::Value,
}

impl StoredUpload {
    /// A metadata value as the server decoded it.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.info["metadata"][key].as_str()
    }

    /// `size` from the info file.
    pub fn size(&self) -> Option<u64> {
        self.info["size"].as_u64()
    }
}

/// A running official tus server; SIGTERM (then SIGKILL) on drop.
pub struct TusPeer {
    child: Child,
    /// Held open: the server exits when it closes (`--exit-on-stdin-close`),
    /// so a test process killed without running Drop leaves no server behind.
    _stdin: Option<ChildStdin>,
    /// Creation endpoint, `http://127.0.0.1:PORT/files/`.
    pub url: String,
    /// The FileStore folder.
    pub store: PathBuf,
    /// The server's stderr (set `DEBUG=tus-node-server:*` for its request log).
    pub log: PathBuf,
}

impl TusPeer {
    /// Start the server with its FileStore in `store` (created by the server);
    /// its stderr goes to `log_dir/tus-peer.log`.
    ///
    /// # Panics
    /// When `node` or the npm packages are missing, or the server does not
    /// print its URL in time: the message says how to fix it.
    pub fn start(store: &Path, log_dir: &Path) -> Self {
        let script = peers_dir().join("tus-server.mjs");
        require_node_and_packages();
        let log = log_dir.join("tus-peer.log");
        let log_file = fs::File::create(&log).expect("tus peer log file");
        let mut child = Command::new("node")
            .arg(&script)
            .arg("--dir")
            .arg(store)
            .args(["--port", "0", "--exit-on-stdin-close"])
            .current_dir(peers_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn node {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        // Read the first line on a thread so a server that never prints
        // cannot hang the test past the deadline.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let started = Instant::now();
        let line = rx.recv_timeout(START_DEADLINE);
        let stdin = child.stdin.take();
        let mut peer = TusPeer {
            child,
            _stdin: stdin,
            url: String::new(),
            store: store.to_path_buf(),
            log,
        };
        let url = match line {
            Ok(Ok(line)) => line
                .trim()
                .strip_prefix("tus server listening on ")
                .map(str::to_string),
            _ => None,
        };
        peer.url = url.unwrap_or_else(|| {
            panic!(
                "the tus peer did not print its URL within {:?} ({:?} elapsed); its log:\n{}",
                START_DEADLINE,
                started.elapsed(),
                peer.log_text()
            )
        });
        peer
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every upload in the FileStore, by its `.json` info file.
    pub fn uploads(&self) -> Vec<StoredUpload> {
        let mut out: Vec<StoredUpload> = fs::read_dir(&self.store)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".json")?.to_string();
                let text = fs::read_to_string(entry.path()).ok()?;
                let info = serde_json::from_str(&text).ok()?;
                Some(StoredUpload {
                    data: self.store.join(&id),
                    id,
                    info,
                })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The uploads whose `filename` metadata is `name`.
    pub fn uploads_named(&self, name: &str) -> Vec<StoredUpload> {
        self.uploads()
            .into_iter()
            .filter(|u| u.metadata("filename") == Some(name))
            .collect()
    }
}

impl Drop for TusPeer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill with our child's pid and a valid signal.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- tus peer log ---\n{}", self.log_text());
        }
    }
}

/// Panic with a fix-it message unless `node` runs and `npm ci` has put the
/// pinned packages in tests/peers/node_modules.
fn require_node_and_packages() {
    let fix = "run scripts/test (it installs them with `npm ci --prefix tests/peers`), \
               or `npm ci --prefix tests/peers` by hand";
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`node --version` failed ({}): the tus peer tests need Node.js >= 20.19; {fix}",
            out.status
        ),
        Err(e) => {
            panic!("cannot run `node` ({e}): the tus peer tests need Node.js >= 20.19; {fix}")
        }
    }
    let modules = peers_dir().join("node_modules/@tus");
    for package in ["server", "file-store"] {
        let manifest = modules.join(package).join("package.json");
        assert!(
            manifest.is_file(),
            "{} is missing: the npm packages of the tus peer are not installed; {fix}",
            manifest.display()
        );
    }
}
