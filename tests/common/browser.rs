//! Debian's headless Chromium, for the status-page tests (scripts/test
//! installs it with apt-get; a test fails, never skips, without it).

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

fn chromium() -> &'static str {
    let path = "/usr/bin/chromium";
    assert!(
        Path::new(path).exists(),
        "Debian's chromium is not installed at {path}; run scripts/test (it installs it with apt-get)"
    );
    path
}

/// Run headless Chromium on `url` with `extra` arguments; answers stdout.
pub fn browse(url: &str, extra: &[&str], profile: &Path) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's `chromedriver` (package `chromium-driver`) on a free port of
/// 127.0.0.1, stopped on drop.
pub struct ChromeDriver {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`, for a WebDriver client.
    pub url: String,
}

impl ChromeDriver {
    /// Start it and wait until it answers.
    pub fn start() -> Self {
        let path = "/usr/bin/chromedriver";
        assert!(
            Path::new(path).exists(),
            "Debian's chromedriver is not installed at {path}; run scripts/test (it installs chromium-driver with apt-get)"
        );
        let address = super::free_address();
        let port = address.rsplit(':').next().unwrap_or_default().to_string();
        // Its own process group: on drop the browsers it started go too,
        // even when a test panics before closing its session.
        let child = Command::new(path)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        super::wait_for(
            "chromedriver to listen",
            std::time::Duration::from_secs(20),
            || std::net::TcpStream::connect(&address).ok(),
        );
        ChromeDriver {
            child,
            url: format!("http://{address}"),
        }
    }

    /// WebDriver capabilities for headless Chromium with its own profile.
    pub fn capabilities(profile: &Path) -> serde_json::Map<String, serde_json::Value> {
        let options = serde_json::json!({
            "binary": chromium(),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        capabilities
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // SAFETY: kill on the process group this child leads.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
