//! hotfolder against the official tus server (npm `@tus/server` with
//! `@tus/file-store`, see tests/peers/): an independent implementation, so
//! these tests catch misreadings of the protocol that our own sandbox shares
//! with the client. The bytes the server stored must be identical to the
//! source, also after a connection dropped in the middle of a PATCH.

mod common;

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::tus_peer::{StoredUpload, TusPeer};
use common::{ConfigParts, Fixture, bin, sha256, wait_for, write_random};

const MIB: u64 = 1 << 20;

/// Longest a `hotfolder upload` here may take (debug build, tens of MiB).
const UPLOAD_DEADLINE: Duration = Duration::from_secs(180);

/// Stands for the endpoint in [`tus_fixture`]'s config until [`set_endpoint`].
const ENDPOINT: &str = "ENDPOINT-NOT-SET";

/// A fixture whose config has a tus provider `peer` (every rule routes to
/// it; endpoint set later with [`set_endpoint`], once the server runs), small
/// retry backoffs, and JSON logs so the tests can read the engine's log fields.
fn tus_fixture(chunk_size: &str) -> Fixture {
    let providers = format!(
        "peer:\n  type: tus\n  endpoint: \"{ENDPOINT}\"\n  chunk_size: {chunk_size}\n  \
         retry: {{ max_attempts: 5, initial_backoff: 100ms, max_backoff: 500ms }}\n"
    );
    Fixture::with_parts(ConfigParts {
        top: "log: { level: \"info,hotfolder=debug\", format: json }",
        providers: &providers,
        rules: Some("- match: {}\n  provider: peer\n  metadata: { title: \"{stem}\" }\n"),
        ..ConfigParts::default()
    })
}

/// Point the `peer` provider at `endpoint`.
fn set_endpoint(fx: &Fixture, endpoint: &str) {
    let text = fs::read_to_string(&fx.config).expect("read config");
    fs::write(&fx.config, text.replace(ENDPOINT, endpoint)).expect("write config");
}

/// The server's `IP:PORT`, from its URL.
fn peer_addr(peer: &TusPeer) -> SocketAddr {
    peer.url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|host| host.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the peer's address from {}", peer.url))
}

/// Start the official server with its FileStore under the fixture.
fn start_peer(fx: &Fixture) -> TusPeer {
    TusPeer::start(&fx.root.join("tus-store"), &fx.root)
}

/// `hotfolder upload --provider peer FILES -c CONFIG`, killed after
/// [`UPLOAD_DEADLINE`]; output captured through files so a chatty child
/// cannot block on a full pipe.
fn upload(fx: &Fixture, files: &[&Path]) -> Output {
    let out_path = fx.root.join("upload.stdout");
    let err_path = fx.root.join("upload.stderr");
    let mut child = Command::new(bin())
        .args(["upload", "--provider", "peer"])
        .args(files)
        .arg("-c")
        .arg(&fx.config)
        .current_dir(&fx.root)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn hotfolder upload");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > UPLOAD_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hotfolder upload did not finish within {UPLOAD_DEADLINE:?}; stderr:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    }
}

/// The one upload the server holds for `name`, checked against `source`:
/// info `size` right, `filename` metadata right, bytes identical.
fn assert_stored(peer: &TusPeer, name: &str, source: &Path) -> StoredUpload {
    let uploads = peer.uploads_named(name);
    assert_eq!(
        uploads.len(),
        1,
        "expected exactly one upload named {name} on the server, found {uploads:#?}"
    );
    let upload = uploads.into_iter().next().expect("one upload");
    let size = fs::metadata(source).expect("stat source").len();
    assert_eq!(
        upload.size(),
        Some(size),
        "info of {name}: {:#}",
        upload.info
    );
    assert_eq!(
        fs::metadata(&upload.data).expect("stat stored data").len(),
        size,
        "stored length of {name}"
    );
    assert_eq!(
        sha256(&upload.data),
        sha256(source),
        "the server's copy of {name} differs from the source"
    );
    upload
}

/// The JSON log lines (hotfolder logs JSON in these fixtures) whose message is `message`.
fn log_events(stderr: &[u8], message: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["fields"]["message"] == message)
        .collect()
}

#[test]
fn upload_multi_chunk_and_single_chunk_files_to_the_official_server() {
    let fx = tus_fixture("4MiB");
    let peer = start_peer(&fx);
    // What hotfolder learns from OPTIONS decides the paths it takes below.
    let extensions = tus_extensions(&peer);
    for wanted in ["creation", "termination"] {
        assert!(
            extensions.split(',').any(|e| e.trim() == wanted),
            "the official server no longer offers {wanted}: Tus-Extension {extensions:?}"
        );
    }
    // A proxy that only counts, to see which requests carried the bytes.
    let proxy = Proxy::start(peer_addr(&peer), None);
    let endpoint = format!("http://{}/files/", proxy.addr);
    set_endpoint(&fx, &endpoint);
    let media = fx.root.join("media");
    // Five whole 4 MiB chunks and a short sixth: PATCH after PATCH.
    let big = media.join("big clip.mp4");
    write_random(&big, 20 * MIB + 12_345, 1);
    // One chunk: a single PATCH.
    let small = media.join("small.mov");
    write_random(&small, MIB + 3, 2);

    let out = upload(&fx, &[&big, &small]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hotfolder upload failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    for (name, source, filetype) in [
        ("big clip.mp4", &big, "video/mp4"),
        ("small.mov", &small, "video/quicktime"),
    ] {
        let stored = assert_stored(&peer, name, source);
        let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
        assert_eq!(stored.metadata("title"), Some(stem), "{:#}", stored.info);
        assert_eq!(
            stored.metadata("filetype"),
            Some(filetype),
            "{:#}",
            stored.info
        );
        assert!(
            stored.metadata("hotfolder_job").is_some(),
            "{:#}",
            stored.info
        );
        // The URL hotfolder reports is the Location the server gave
        // (absolute, from the Host header: the proxy's address).
        let url = format!("{endpoint}{}", stored.id);
        assert!(
            stdout.contains(&format!("uploaded: {url}")),
            "no `uploaded: {url}` in:\n{stdout}"
        );
    }
    assert_eq!(
        peer.uploads().len(),
        2,
        "no stray uploads: {:#?}",
        peer.uploads()
    );
    // Six PATCHes of at most 4 MiB for the big file, one for the small file;
    // no body on creation even though the server offers creation-with-upload
    // (the upload URL is persisted before any byte goes, see providers/tus.rs).
    let stats = &proxy.stats;
    let problems = stats.problems.lock().expect("problems lock").clone();
    assert!(problems.is_empty(), "proxy problems: {problems:?}");
    assert_eq!(stats.patches.load(Ordering::SeqCst), 6 + 1, "{stats:?}");
    assert_eq!(
        stats.patch_body_bytes.load(Ordering::SeqCst),
        (20 * MIB + 12_345) + (MIB + 3),
        "{stats:?}"
    );
    assert_eq!(stats.posts_with_body.load(Ordering::SeqCst), 0, "{stats:?}");
}

/// `Tus-Extension` of the server's OPTIONS answer (raw HTTP/1.1 over TCP).
fn tus_extensions(peer: &TusPeer) -> String {
    let mut stream = TcpStream::connect(peer_addr(peer)).expect("connect to the peer");
    write!(
        stream,
        "OPTIONS /files/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        peer_addr(peer)
    )
    .expect("send OPTIONS");
    let mut answer = String::new();
    io::Read::read_to_string(&mut stream, &mut answer).expect("read the OPTIONS answer");
    assert!(
        answer.starts_with("HTTP/1.1 204"),
        "OPTIONS answer:\n{answer}"
    );
    answer
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("tus-extension")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Tus-Extension in the OPTIONS answer:\n{answer}"))
}

/// What the proxy saw.
#[derive(Debug, Default)]
struct ProxyStats {
    /// Client connections accepted.
    connections: AtomicUsize,
    /// PATCH requests seen (their heads).
    patches: AtomicUsize,
    /// PATCH body bytes forwarded to the server, all connections.
    patch_body_bytes: AtomicU64,
    /// POST requests with a body (creation-with-upload; hotfolder sends none).
    posts_with_body: AtomicUsize,
    /// Connections cut on purpose.
    drops: AtomicUsize,
    /// True until the first PATCH is chosen to be cut.
    armed: AtomicBool,
    /// Anything the proxy could not handle (the test fails on any).
    problems: Mutex<Vec<String>>,
}

impl ProxyStats {
    fn problem(&self, what: String) {
        self.problems.lock().expect("problems lock").push(what);
    }
}

/// A TCP proxy on 127.0.0.1:0 in front of `upstream`. Server-to-client bytes
/// are copied as they come; client-to-server it reads just enough HTTP/1.1
/// (request line, headers, `Content-Length`) to count requests and body
/// bytes. With `cut_first_patch_after: Some(n)` it cuts the first connection
/// that carries a PATCH, both sides, after forwarding `n` bytes of that body:
/// a connection lost mid-upload.
struct Proxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: SocketAddr, cut_first_patch_after: Option<u64>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stats = Arc::new(ProxyStats {
            armed: AtomicBool::new(cut_first_patch_after.is_some()),
            ..ProxyStats::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    let stats = Arc::clone(&stats);
                    std::thread::spawn(move || {
                        let cut = cut_first_patch_after.unwrap_or(u64::MAX);
                        if let Err(e) = relay(client, upstream, &stats, cut) {
                            // Resets and broken pipes are normal when either
                            // side closes; only the proxy's own mistakes count.
                            if e.kind() == io::ErrorKind::InvalidData {
                                stats.problem(e.to_string());
                            }
                        }
                    });
                }
            })
        };
        Proxy {
            addr,
            stats,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// One request head: its raw bytes and what the proxy needs from it.
struct RequestHead {
    raw: Vec<u8>,
    method: String,
    content_length: u64,
    chunked: bool,
}

/// Read one request head; `None` at a clean end of the connection.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<RequestHead>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = reader.read_until(b'\n', &mut raw)?;
        if n == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if &raw[before..] == b"\r\n" && before > 0 {
            break;
        }
        if raw.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head over 64 KiB",
            ));
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let method = text.split(' ').next().unwrap_or("").to_string();
    let mut content_length = 0;
    let mut chunked = false;
    for line in text.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            content_length = value.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad Content-Length {value:?}"),
                )
            })?;
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    Ok(Some(RequestHead {
        raw,
        method,
        content_length,
        chunked,
    }))
}

fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    stats: &ProxyStats,
    drop_after: u64,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    {
        let (mut from, mut to) = (server.try_clone()?, client.try_clone()?);
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    let mut reader = BufReader::with_capacity(256 * 1024, client.try_clone()?);
    let mut to_server = server.try_clone()?;
    while let Some(head) = read_head(&mut reader)? {
        if head.chunked {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} with a chunked body: the proxy only counts Content-Length bodies",
                    head.method
                ),
            ));
        }
        to_server.write_all(&head.raw)?;
        let is_patch = head.method == "PATCH";
        let is_post = head.method == "POST";
        if is_patch {
            stats.patches.fetch_add(1, Ordering::SeqCst);
        }
        if is_post && head.content_length > 0 {
            stats.posts_with_body.fetch_add(1, Ordering::SeqCst);
        }
        let cut_here = is_patch && stats.armed.swap(false, Ordering::SeqCst);
        if cut_here && head.content_length <= drop_after {
            stats.problem(format!(
                "the first PATCH carries {} bytes, not more than the cut point {drop_after}",
                head.content_length
            ));
        }
        let limit = if cut_here {
            head.content_length.min(drop_after)
        } else {
            head.content_length
        };
        let mut left = limit;
        while left > 0 {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            to_server.write_all(&buf[..n])?;
            reader.consume(n);
            left -= n as u64;
            if is_patch {
                stats.patch_body_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        if cut_here && limit < head.content_length {
            stats.drops.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    let _ = to_server.shutdown(Shutdown::Write);
    Ok(())
}

#[test]
fn upload_resumes_on_the_official_server_after_a_dropped_connection() {
    let fx = tus_fixture("4MiB");
    let peer = start_peer(&fx);
    // Cut the first PATCH (4 MiB) after 3 MiB and an odd few bytes, so the
    // server's offset lands off any chunk or read-piece boundary.
    let drop_after = 3 * MIB + 4_321;
    let proxy = Proxy::start(peer_addr(&peer), Some(drop_after));
    set_endpoint(&fx, &format!("http://{}/files/", proxy.addr));

    let chunk = 4 * MIB;
    let size = 20 * MIB + 777;
    let source = fx.root.join("media/resume.mp4");
    write_random(&source, size, 3);

    let out = upload(&fx, &[&source]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hotfolder upload failed ({}):\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
    );
    let problems = proxy.stats.problems.lock().expect("problems lock").clone();
    assert!(problems.is_empty(), "proxy problems: {problems:?}");

    // Same upload resumed (one on the server), bytes identical.
    assert_stored(&peer, "resume.mp4", &source);

    let stats = &proxy.stats;
    assert_eq!(stats.drops.load(Ordering::SeqCst), 1, "{stats:?}");
    assert!(
        stats.connections.load(Ordering::SeqCst) > 1,
        "the upload must have reconnected after the drop: {stats:?}"
    );
    let patched = stats.patch_body_bytes.load(Ordering::SeqCst);
    assert!(
        patched >= size && patched < size + chunk,
        "PATCH body bytes forwarded: {patched}; want at least the file ({size}) and less than \
         the file plus one chunk ({}): a resume, not a restart ({stats:?})",
        size + chunk
    );

    // hotfolder asked the server where it stood and went on from there: from
    // what the server had kept of the cut PATCH (0 < offset <= cut point).
    let resumed: Vec<u64> = log_events(&out.stderr, "resuming")
        .iter()
        .filter_map(|e| e["fields"]["offset"].as_u64())
        .collect();
    eprintln!("proxy saw {stats:?}; hotfolder resumed at {resumed:?}");
    assert!(
        resumed.iter().any(|&o| o > 0 && o <= drop_after),
        "no resume from the server's offset after the drop (resumed at {resumed:?}); stderr:\n{stderr}"
    );
}

#[test]
fn daemon_delivers_a_dropped_file_to_the_official_server() {
    let fx = tus_fixture("4MiB");
    let peer = start_peer(&fx);
    set_endpoint(&fx, &peer.url);
    let mut daemon = fx.start();

    // Written beside the watch, then renamed in whole: the daemon sees a
    // finished file at once.
    let staged: PathBuf = fx.root.join("staging/clip.mp4");
    write_random(&staged, 9 * MIB + 7, 4);
    let hash = sha256(&staged);
    fs::rename(&staged, fx.watch.join("clip.mp4")).expect("move into the watch");

    let done = fx.done.join("clip.mp4");
    let receipt_path = fx.done.join("clip.mp4.receipt.json");
    wait_for(
        "clip.mp4 to be delivered and moved to done/ with a receipt",
        Duration::from_secs(120),
        || (done.is_file() && receipt_path.is_file()).then_some(()),
    );
    let (status, _) = daemon.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "daemon exit: {status}; log:\n{}",
        daemon.log()
    );

    let stored = assert_stored(&peer, "clip.mp4", &done);
    let receipt = common::read_json(&receipt_path);
    assert_eq!(receipt["provider"], "peer", "{receipt:#}");
    assert_eq!(receipt["sha256"], hash.as_str(), "{receipt:#}");
    assert_eq!(receipt["bytes"], 9 * MIB + 7, "{receipt:#}");
    assert_eq!(receipt["remote_id"], stored.id.as_str(), "{receipt:#}");
    assert_eq!(
        receipt["url"],
        format!("{}{}", peer.url, stored.id).as_str(),
        "{receipt:#}"
    );
    assert!(
        !fx.watch.join("clip.mp4").exists(),
        "the source left the watch"
    );
}

/// `parallel: 4` where the server does not offer `concatenation` (the
/// official Node server's FileStore does not): the file goes as one plain
/// upload, chunk after chunk, and arrives whole; no partial upload is made.
#[test]
fn parallel_without_concatenation_on_the_server_uploads_one_plain_upload() {
    let fx = tus_fixture("4MiB\n  parallel: 4");
    let peer = start_peer(&fx);
    let extensions = tus_extensions(&peer);
    assert!(
        !extensions.split(',').any(|e| e.trim() == "concatenation"),
        "the official server now offers concatenation ({extensions:?}): test parallel parts against it"
    );
    set_endpoint(&fx, &peer.url);
    let source = fx.root.join("media/wide.mp4");
    write_random(&source, 18 * MIB + 5, 9);

    let out = upload(&fx, &[&source]);
    assert!(
        out.status.success(),
        "hotfolder upload failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_stored(&peer, "wide.mp4", &source);
    assert_eq!(peer.uploads().len(), 1, "one upload, no partials");
}
