//! Debian's headless Chromium, for the status-page tests (scripts/test
//! installs it with apt-get; a test fails, never skips, without it).

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
