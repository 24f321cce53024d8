//! The status page in a real browser (Debian's headless Chromium): loaded
//! while an upload runs, it shows the job uploading with its progress, a
//! failed job with its reason and a Retry button. A screenshot is kept in
//! `target/test-artifacts/status-page.png`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::browse;
use common::sandbox::{Sandbox, http};
use common::{Fixture, in_state, wait_for, write_random};

const TOKEN: &str = "page-token-8c2f";

#[test]
fn the_page_shows_live_progress_failures_and_a_retry_button() {
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let fx = Fixture::with_config(
        "",
        "",
        &format!("http: {{ listen: \"{address}\", token: \"{TOKEN}\" }}"),
    );
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &["--throttle", "1MiB"]);
    // Route the big file to the slow tus sandbox, everything else to the folder.
    let text = std::fs::read_to_string(&fx.config).unwrap();
    let text = text
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  slow: {{ type: tus, endpoint: \"{}\", chunk_size: 1MiB }}\n",
                sandbox.endpoint()
            ),
        )
        .replace(
            "rules:\n",
            "rules:\n  - match: { glob: \"big*\" }\n    provider: slow\n",
        );
    fx.write_raw_config(&text);
    std::fs::write(fx.watch.join("broken.json"), b"{oops").unwrap();
    write_random(&fx.watch.join("broken.mp4"), 10_000, 1);
    write_random(&fx.watch.join("big.mp4"), 30 << 20, 2);
    let _daemon = fx.start();
    wait_for(
        "one failed job and one upload under way",
        Duration::from_secs(30),
        || {
            let rows = fx.status();
            let uploading = rows
                .iter()
                .any(|r| r["state"] == "uploading" && r["bytes_acknowledged"].as_u64() > Some(0));
            (in_state(&rows, "failed").len() == 1 && uploading).then_some(())
        },
    );

    // The page's shell needs no token (a browser cannot send a header when
    // it opens a page); everything it shows comes from the API, which does.
    // A token in the query string opens nothing: it would end up in
    // browser history and proxy logs.
    let (status, shell) = http(&address, "GET", "/", &[]).unwrap();
    assert_eq!(status, 200);
    assert!(!shell.contains("big.mp4"), "the shell holds no job data");
    for path in ["/api/jobs", &format!("/api/jobs?token={TOKEN}")] {
        let (status, _) = http(&address, "GET", path, &[]).unwrap();
        assert_eq!(status, 401, "{path}");
    }

    // Opened without a token, the page asks for it and shows nothing else.
    let profile = tempfile::tempdir().unwrap();
    let dom = browse(
        &format!("http://{address}/"),
        &["--dump-dom"],
        profile.path(),
    );
    assert!(
        dom.contains("<form id=\"token-form\">"),
        "a token prompt: {dom}"
    );
    assert!(!dom.contains("big.mp4"), "no jobs without the token: {dom}");

    // A link may carry the token in the fragment, which never leaves the
    // browser; the page keeps it in sessionStorage and sends it as a header.
    let url = format!("http://{address}/#token={TOKEN}");
    let dom = browse(&url, &["--dump-dom"], profile.path());
    assert!(
        !dom.contains(TOKEN),
        "the token is not left in the page: {dom}"
    );
    assert!(
        dom.contains("<form id=\"token-form\" hidden=\"\">"),
        "no prompt once the token works: {dom}"
    );
    assert!(dom.contains("hotfolder"), "{dom}");
    assert!(
        dom.contains("big.mp4") && dom.contains("uploading"),
        "the upload is listed: {dom}"
    );
    assert!(dom.contains("% of 30.0 MiB"), "progress is shown: {dom}");
    assert!(
        dom.contains("MiB/s") || dom.contains("KiB/s"),
        "the rate is shown: {dom}"
    );
    assert!(
        dom.contains("failed") && dom.contains("broken.json"),
        "the failure and its reason: {dom}"
    );
    assert!(dom.contains(">Retry</button>"), "a retry button: {dom}");
    assert!(
        !dom.contains("<th id=\"node-column\">")
            && dom.contains("<section id=\"fleet\" hidden=\"\">"),
        "no node column or nodes list on a single box: {dom}"
    );
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "no error shown: {dom}"
    );

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,500",
        ],
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "a real PNG screenshot"
    );
}
