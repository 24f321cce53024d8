//! The status page in a real browser (Debian's headless Chromium): loaded
//! while an upload runs, it shows the job uploading with its progress, a
//! failed job with its reason and a Retry button. A screenshot is kept in
//! `target/test-artifacts/status-page.png`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::{ChromeDriver, browse};
use common::sandbox::{Sandbox, http};
use common::{Fixture, free_address, in_state, wait_for, write_random};
use fantoccini::{Client, ClientBuilder, Locator};

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

/// The page driven through WebDriver (Debian's chromedriver and headless
/// Chromium): the per-provider table counts today's jobs, Pause holds the
/// provider (a new file waits, queued), Retry queues a failed job again,
/// Resume delivers both. A screenshot is kept in
/// `target/test-artifacts/status-page-webdriver.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webdriver_clicks_pause_retry_and_resume() {
    let address = free_address();
    // Nothing listens there: every webhook event keeps failing.
    let dead_receiver = free_address();
    let fx = Fixture::with_config(
        "",
        "",
        &format!(
            "http: {{ listen: \"{address}\", token: \"{TOKEN}\" }}\nbandwidth: 50MiB/s\n\
             notify: [{{ url: \"http://{dead_receiver}/hook\", events: [done] }}]"
        ),
    );
    std::fs::write(fx.watch.join("broken.json"), b"{oops").unwrap();
    write_random(&fx.watch.join("broken.mp4"), 10_000, 1);
    write_random(&fx.watch.join("first.mp4"), 20_000, 2);
    let _daemon = fx.start();
    // Blocking here is fine: nothing else runs on this test's runtime yet.
    let rows = wait_for("one done, one failed", Duration::from_secs(30), || {
        let rows = fx.status();
        (in_state(&rows, "done").len() == 1 && in_state(&rows, "failed").len() == 1).then_some(rows)
    });
    let failed_id = in_state(&rows, "failed")[0]["id"].as_u64().unwrap();

    let driver = ChromeDriver::start();
    let profile = tempfile::tempdir().unwrap();
    // chromedriver listens on loopback: plain HTTP, no TLS in the client.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = ClientBuilder::new(connector)
        .capabilities(ChromeDriver::capabilities(profile.path()))
        .connect(&driver.url)
        .await
        .expect("a WebDriver session with headless Chromium");
    browser
        .goto(&format!("http://{address}/#token={TOKEN}"))
        .await
        .unwrap();

    // Provider | queued | in flight | done | failed. The failed job never
    // got a provider (its sidecar is broken): it has a row of its own.
    let archive = "#provider-archive";
    wait_until_shown(&browser, archive, |row| row.contains("|0|0|1|0|")).await;
    wait_until_shown(&browser, "#provider-", |row| {
        row.contains("(no provider)|0|0|0|1|")
    })
    .await;
    // The limit in force, and the webhook event that keeps failing.
    wait_until_shown(&browser, "#all-limit", |text| {
        text.contains("50.0 MiB/s (50MiB/s)")
    })
    .await;
    wait_until_shown(&browser, "#webhook-rows", |text| {
        text.contains("cannot connect")
    })
    .await;

    // Pause the provider: the button turns into Resume, the API agrees.
    let pause_button = "#pause-provider-archive";
    click(&browser, pause_button).await;
    wait_until_shown(&browser, pause_button, |text| text == "Resume").await;
    let (_, pauses) = http(
        &address,
        "GET",
        "/api/pauses",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    )
    .unwrap();
    assert!(pauses.contains("archive"), "{pauses}");

    // A new file waits, queued; Retry queues the failed one again (its
    // sidecar fixed), and it waits too.
    write_random(&fx.watch.join("second.mp4"), 20_000, 3);
    wait_until_shown(&browser, archive, |row| row.contains("|1|0|1|0|")).await;
    std::fs::write(fx.failed.join("broken.json"), br#"{"title": "fixed"}"#).unwrap();
    click(&browser, &format!("#job-{failed_id} button")).await;
    wait_until_shown(&browser, &format!("#job-{failed_id}"), |row| {
        row.contains("queued")
    })
    .await;

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "a real PNG"
    );
    std::fs::write(artifacts.join("status-page-webdriver.png"), &png).unwrap();

    // Resume: both are delivered.
    click(&browser, pause_button).await;
    wait_until_shown(&browser, archive, |row| row.contains("|0|0|3|0|")).await;
    assert_eq!(
        Fixture::files_in(&fx.outbox),
        vec!["broken.mp4", "first.mp4", "second.mp4"]
    );
    browser.close().await.unwrap();
}

/// What `selector` shows: a table row's cells joined by `|`, else its text.
async fn shown(browser: &Client, selector: &str) -> Option<String> {
    let element = browser.find(Locator::Css(selector)).await.ok()?;
    if element.tag_name().await.ok()? != "tr" {
        return element.text().await.ok();
    }
    let mut cells = Vec::new();
    for cell in element.find_all(Locator::Css("td")).await.ok()? {
        cells.push(cell.text().await.ok()?);
    }
    Some(cells.join("|"))
}

/// Wait (at most 20 seconds) until `selector` shows what `check` accepts.
async fn wait_until_shown(browser: &Client, selector: &str, check: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if shown(browser, selector)
            .await
            .is_some_and(|text| check(&text))
        {
            return;
        }
        if std::time::Instant::now() > deadline {
            let page = browser.source().await.unwrap_or_default();
            panic!("timed out after 20s waiting for {selector}; the page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Click what `selector` finds. The page redraws itself as the daemon's
/// state changes: an element found just before a redraw is stale by the
/// click, so it is found again (until a deadline).
async fn click(browser: &Client, selector: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let element = browser
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|e| panic!("{selector}: {e}"));
        match element.click().await {
            Ok(()) => return,
            Err(e)
                if e.to_string().contains("stale element")
                    && std::time::Instant::now() < deadline => {}
            Err(e) => panic!("clicking {selector}: {e}"),
        }
    }
}
