//! A tus 1.0.0 sink for benchmarks, faster than any client it measures: it
//! keeps no bytes, only counts them, over plain HTTP/1.1 keep-alive
//! connections, and drops body bytes in the kernel (`MSG_TRUNC`) instead of
//! copying them out. The Python sink (bench/sink.py) tops out near the speed
//! of the clients, so a ratio against it measured the sink. This one prints
//! its own ceiling (a client in this process that sends zeros from memory),
//! so a benchmark can tell a client-bound run from a sink-bound one.
//!
//! ```sh
//! cargo build --release --example tus_sink
//! target/release/examples/tus_sink              # "sink listening on http://127.0.0.1:PORT/files/"
//! target/release/examples/tus_sink ceiling URL BYTES   # "ceiling: SECONDS s for BYTES bytes"
//! ```
//!
//! Requests: OPTIONS, POST (creation), HEAD, PATCH (offset checked, body
//! discarded), DELETE, and `GET /stats` (per upload: length, offset, first
//! and last body byte as seconds since the epoch). No checksum extension.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes taken off the socket per call (and sent per write by the ceiling
/// client).
const SCRATCH: usize = 1 << 20;

#[derive(Default, Clone, serde::Serialize)]
struct Upload {
    length: u64,
    offset: u64,
    first_byte: Option<f64>,
    last_byte: Option<f64>,
}

#[derive(Default)]
struct Uploads {
    next: u64,
    by_id: HashMap<String, Upload>,
}

type Shared = Arc<Mutex<Uploads>>;

/// The uploads, for one request's look or change.
fn lock(uploads: &Shared) -> std::io::Result<std::sync::MutexGuard<'_, Uploads>> {
    uploads
        .lock()
        .map_err(|_| std::io::Error::other("the uploads table is poisoned"))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One request's head, parsed.
struct Head {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

impl Head {
    fn number(&self, name: &str) -> Option<u64> {
        self.headers.get(name)?.trim().parse().ok()
    }
}

/// Read a request head into `buffer` (which may already hold bytes of it);
/// answers the head and leaves any body bytes after it in `buffer`.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Option<Head>> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buffer[..end]).into_owned();
            buffer.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let mut first = lines.next().unwrap_or_default().split(' ');
            let method = first.next().unwrap_or_default().to_string();
            let path = first.next().unwrap_or_default().to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return Ok(Some(Head {
                method,
                path,
                headers,
            }));
        }
        let mut piece = [0u8; 8192];
        let n = stream.read(&mut piece).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&piece[..n]);
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nTus-Resumable: 1.0.0\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await
}

/// Take up to `want` body bytes off the socket without copying them to user
/// space (`recv` with `MSG_TRUNC`, which Linux honours for TCP): the sink
/// then costs the machine almost nothing per byte, and its ceiling is the
/// loopback's, not a copy loop's.
async fn discard(stream: &TcpStream, want: usize) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        stream.readable().await?;
        let fd = stream.as_raw_fd();
        let result = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: a null buffer is allowed with MSG_TRUNC on TCP: the
            // kernel drops the bytes and writes nothing.
            let n = unsafe { libc::recv(fd, std::ptr::null_mut(), want, libc::MSG_TRUNC) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn serve(mut stream: TcpStream, uploads: Shared) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut pending = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut pending).await? {
        let id = head.path.rsplit('/').next().unwrap_or_default().to_string();
        match head.method.as_str() {
            "OPTIONS" => {
                let headers = [
                    ("Tus-Version", "1.0.0".into()),
                    ("Tus-Extension", "creation,termination".into()),
                ];
                reply(&mut stream, "204 No Content", &headers, b"").await?;
            }
            "POST" => {
                let Some(length) = head.number("upload-length") else {
                    reply(
                        &mut stream,
                        "400 Bad Request",
                        &[],
                        b"Upload-Length required",
                    )
                    .await?;
                    continue;
                };
                let key = {
                    let mut all = lock(&uploads)?;
                    all.next += 1;
                    let key = all.next.to_string();
                    all.by_id.insert(
                        key.clone(),
                        Upload {
                            length,
                            ..Upload::default()
                        },
                    );
                    key
                };
                let headers = [("Location", format!("/files/{key}"))];
                reply(&mut stream, "201 Created", &headers, b"").await?;
            }
            "HEAD" => {
                let found = lock(&uploads)?.by_id.get(&id).cloned();
                match found {
                    None => reply(&mut stream, "404 Not Found", &[], b"").await?,
                    Some(u) => {
                        let headers = [
                            ("Upload-Offset", u.offset.to_string()),
                            ("Upload-Length", u.length.to_string()),
                            ("Cache-Control", "no-store".into()),
                        ];
                        reply(&mut stream, "200 OK", &headers, b"").await?;
                    }
                }
            }
            "PATCH" => {
                let length = head.number("content-length").unwrap_or(0);
                let offset = head.number("upload-offset");
                let current = lock(&uploads)?.by_id.get(&id).map(|u| u.offset);
                if current.is_none() || current != offset {
                    let status = if current.is_none() {
                        "404 Not Found"
                    } else {
                        "409 Conflict"
                    };
                    // The body is not read: close after answering.
                    reply(&mut stream, status, &[("Connection", "close".into())], b"").await?;
                    return Ok(());
                }
                let mut received = 0u64;
                let first = now();
                let from_head = pending.len().min(length as usize);
                pending.drain(..from_head);
                received += from_head as u64;
                while received < length {
                    let want = SCRATCH.min((length - received) as usize);
                    let n = discard(&stream, want).await?;
                    if n == 0 {
                        break;
                    }
                    received += n as u64;
                }
                let offset = {
                    let mut all = lock(&uploads)?;
                    let Some(upload) = all.by_id.get_mut(&id) else {
                        return Ok(());
                    };
                    upload.offset += received;
                    upload.first_byte.get_or_insert(first);
                    upload.last_byte = Some(now());
                    upload.offset
                };
                if received < length {
                    return Ok(());
                }
                reply(
                    &mut stream,
                    "204 No Content",
                    &[("Upload-Offset", offset.to_string())],
                    b"",
                )
                .await?;
            }
            "DELETE" => {
                let removed = lock(&uploads)?.by_id.remove(&id).is_some();
                let status = if removed {
                    "204 No Content"
                } else {
                    "404 Not Found"
                };
                reply(&mut stream, status, &[], b"").await?;
            }
            "GET" if head.path == "/stats" => {
                let body = {
                    let all = lock(&uploads)?;
                    serde_json::to_vec(&all.by_id).map_err(std::io::Error::other)?
                };
                let headers = [("Content-Type", "application/json".into())];
                reply(&mut stream, "200 OK", &headers, &body).await?;
            }
            _ => reply(&mut stream, "404 Not Found", &[], b"").await?,
        }
    }
    Ok(())
}

/// The ceiling: POST, then one PATCH of `bytes` zeros from memory on one
/// connection, as `curl -T` would send a file but with no file to read.
async fn ceiling(url: &str, bytes: u64) -> std::io::Result<f64> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("an http:// URL"))?;
    let (address, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let started = Instant::now();
    let post = format!(
        "POST /{path} HTTP/1.1\r\nHost: {address}\r\nTus-Resumable: 1.0.0\r\nUpload-Length: {bytes}\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(post.as_bytes()).await?;
    let mut pending = Vec::new();
    let answer = read_answer(&mut stream, &mut pending).await?;
    let location = answer
        .headers
        .get("location")
        .ok_or_else(|| std::io::Error::other("no Location"))?
        .clone();
    let patch = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {address}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {bytes}\r\n\r\n"
    );
    stream.write_all(patch.as_bytes()).await?;
    let zeros = vec![0u8; SCRATCH];
    let mut sent = 0u64;
    while sent < bytes {
        let n = SCRATCH.min((bytes - sent) as usize);
        stream.write_all(&zeros[..n]).await?;
        sent += n as u64;
    }
    let answer = read_answer(&mut stream, &mut pending).await?;
    if answer.path != "204" {
        return Err(std::io::Error::other(format!(
            "PATCH answered {}",
            answer.path
        )));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// An answer's head (status code in `path`).
async fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> std::io::Result<Head> {
    let head = read_head(stream, pending)
        .await?
        .ok_or_else(|| std::io::Error::other("the sink closed the connection"))?;
    let length = head.number("content-length").unwrap_or(0) as usize;
    while pending.len() < length {
        let mut piece = [0u8; 4096];
        let n = stream.read(&mut piece).await?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&piece[..n]);
    }
    pending.drain(..length.min(pending.len()));
    Ok(head)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("ceiling") {
        let (Some(url), Some(bytes)) = (args.get(1), args.get(2).and_then(|b| b.parse().ok()))
        else {
            eprintln!("usage: tus_sink ceiling URL BYTES");
            std::process::exit(2);
        };
        let seconds = ceiling(url, bytes).await?;
        println!("ceiling: {seconds:.4} s for {bytes} bytes");
        return Ok(());
    }
    let listen = match args.as_slice() {
        [] => "127.0.0.1:0".to_string(),
        [flag, address] if flag == "--listen" => address.clone(),
        _ => {
            eprintln!("usage: tus_sink [--listen ADDR] | tus_sink ceiling URL BYTES");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(&listen).await?;
    println!("sink listening on http://{}/files/", listener.local_addr()?);
    let uploads = Shared::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let uploads = Arc::clone(&uploads);
        tokio::spawn(async move {
            let _ = serve(stream, uploads).await;
        });
    }
}
