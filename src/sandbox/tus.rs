//! The tus 1.0.0 simulator at `/tus/files/` (PROTOCOLS §5), strict: it
//! refuses requests without `Tus-Resumable`, wrong content types, offsets
//! that do not match (409), checksums that do not match (460), bodies past
//! `Upload-Length`, concurrent PATCHes (423) and expired uploads (410). It
//! offers `concatenation` (PROTOCOLS §5): partial uploads, joined by a final
//! one only once each is complete; Gcore's upload leg does not. Each
//! upload's bytes are kept in `<data>/tus/<id>.bin` with `<id>.json` beside.

// Refusals are ready HTTP responses carried as errors, the axum idiom; their
// size does not matter on this path.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::body::write_body;
use super::faults::ResetAfter;
use super::tokens::now;
use super::{ConnectionReset, Sandbox, records};

const MAX_SIZE: u64 = 64 << 30;
const EXTENSIONS: &str =
    "creation,creation-with-upload,termination,checksum,expiration,concatenation";
/// Gcore's upload servers: the same tus without concatenation.
const GCORE_EXTENSIONS: &str = "creation,creation-with-upload,termination,checksum,expiration";

/// One upload as the simulator sees it (also its `<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upload {
    /// Upload id (last URL segment).
    pub id: String,
    /// `Upload-Length`.
    pub length: u64,
    /// Bytes committed.
    pub offset: u64,
    /// Decoded `Upload-Metadata`.
    pub metadata: BTreeMap<String, String>,
    /// Body bytes received over all requests (resends and discarded chunks included).
    pub bytes_received: u64,
    /// PATCH requests seen.
    pub patches: u64,
    /// Deleted by the client.
    pub terminated: bool,
    /// Seconds since the epoch of the last write.
    pub last_activity: f64,
    /// `partial` or `final` (concatenation), none for a plain upload.
    #[serde(default)]
    pub concat: Option<String>,
    /// A final upload's partial uploads, in order.
    #[serde(default)]
    pub parts: Vec<String>,
    #[serde(skip)]
    busy: bool,
}

/// All uploads, loaded from disk at start so a restarted sandbox resumes.
#[derive(Default)]
pub struct Uploads {
    map: Mutex<HashMap<String, Upload>>,
}

fn data_path(sandbox: &Sandbox, id: &str, ext: &str) -> PathBuf {
    sandbox.data.join("tus").join(format!("{id}.{ext}"))
}

impl Uploads {
    /// Load `<data>/tus/*.json`.
    pub fn load(dir: &std::path::Path) -> Self {
        let map = records::load::<Upload>(dir)
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
        Uploads {
            map: Mutex::new(map),
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Upload) -> T) -> Option<T> {
        self.map.lock().ok()?.get_mut(id).map(f)
    }
}

/// `(offset, length)` of an upload, for simulators built on tus (Gcore).
pub fn progress(sandbox: &Sandbox, id: &str) -> Option<(u64, u64)> {
    sandbox.tus.with(id, |u| (u.offset, u.length))
}

fn save(sandbox: &Sandbox, upload: &Upload) {
    records::save(&data_path(sandbox, &upload.id, "json"), upload);
}

/// The routes.
pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/tus/files", post(create).options(options))
        .route("/tus/files/", post(create).options(options))
        .route(
            "/tus/files/{id}",
            axum::routing::head(head)
                .patch(patch)
                .delete(delete)
                .options(options),
        )
        // Gcore's upload servers speak the same tus, with required metadata.
        .route("/upload/", post(create).options(options))
        .route(
            "/upload/{id}",
            axum::routing::head(head)
                .patch(patch)
                .delete(delete)
                .options(options),
        )
        .route("/_sandbox/tus", get(list))
}

fn tus_response(status: StatusCode) -> Response {
    let mut response = status.into_response();
    response
        .headers_mut()
        .insert("tus-resumable", HeaderValue::from_static("1.0.0"));
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

fn refuse(status: StatusCode, why: &str) -> Response {
    let mut response = (status, why.to_string()).into_response();
    response
        .headers_mut()
        .insert("tus-resumable", HeaderValue::from_static("1.0.0"));
    response
}

/// Checks every request but OPTIONS must pass.
fn precheck(sandbox: &Sandbox, headers: &HeaderMap) -> Result<(), Response> {
    if headers.get("tus-resumable").and_then(|v| v.to_str().ok()) != Some("1.0.0") {
        let mut response = refuse(
            StatusCode::PRECONDITION_FAILED,
            "Tus-Resumable: 1.0.0 required",
        );
        response
            .headers_mut()
            .insert("tus-version", HeaderValue::from_static("1.0.0"));
        return Err(response);
    }
    if let Some(token) = &sandbox.options.tus_token {
        let expected = format!("Bearer {token}");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
            ));
        }
    }
    Ok(())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    let text = headers.get(name)?.to_str().ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_metadata(value: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for pair in value.split(',').filter(|p| !p.trim().is_empty()) {
        let mut parts = pair.trim().splitn(2, ' ');
        let key = parts.next().unwrap_or_default();
        if key.is_empty() || map.contains_key(key) {
            return Err(format!("bad or repeated metadata key {key:?}"));
        }
        let decoded = match parts.next() {
            None => String::new(),
            Some(b64) => {
                let bytes = BASE64
                    .decode(b64)
                    .map_err(|_| format!("metadata {key:?} is not base64"))?;
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        map.insert(key.to_string(), decoded);
    }
    Ok(map)
}

fn expired(sandbox: &Sandbox, upload: &Upload) -> bool {
    sandbox.options.token_ttl.is_some_and(|ttl| {
        upload.offset < upload.length && now() - upload.last_activity > ttl.as_secs_f64()
    })
}

async fn options(uri: axum::http::Uri) -> Response {
    let mut response = tus_response(StatusCode::NO_CONTENT);
    let headers = response.headers_mut();
    headers.insert("tus-version", HeaderValue::from_static("1.0.0"));
    let extensions = if uri.path().starts_with("/upload") {
        GCORE_EXTENSIONS
    } else {
        EXTENSIONS
    };
    headers.insert("tus-extension", HeaderValue::from_static(extensions));
    headers.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static("sha1,sha256"),
    );
    headers.insert("tus-max-size", HeaderValue::from(MAX_SIZE));
    response
}

async fn list(State(sandbox): State<Arc<Sandbox>>) -> Json<Vec<Upload>> {
    let mut uploads: Vec<Upload> = sandbox
        .tus
        .map
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    uploads.sort_by(|a, b| a.id.cmp(&b.id));
    Json(uploads)
}

async fn create(
    State(sandbox): State<Arc<Sandbox>>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(response) = precheck(&sandbox, &headers) {
        return response;
    }
    let gcore_leg = uri.path().starts_with("/upload");
    let concat = match headers.get("upload-concat").map(|v| v.to_str()) {
        None => None,
        Some(Ok(value)) if !gcore_leg => match value.strip_prefix("final;") {
            Some(urls) => return create_final(&sandbox, &headers, urls),
            None if value == "partial" => Some("partial".to_string()),
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "Upload-Concat must be 'partial' or 'final;URL1 URL2 ...'",
                );
            }
        },
        Some(_) => {
            return refuse(StatusCode::BAD_REQUEST, "concatenation is not offered here");
        }
    };
    if headers.contains_key("upload-defer-length") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Defer-Length is not supported",
        );
    }
    let Some(length) = header_u64(&headers, "upload-length") else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Length missing or not a number",
        );
    };
    if length > MAX_SIZE {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Upload-Length exceeds Tus-Max-Size",
        );
    }
    let metadata = match metadata_of(&headers) {
        Ok(map) => map,
        Err(refusal) => return refusal,
    };
    let gcore_video = if gcore_leg {
        match super::gcore::check_upload_metadata(&sandbox, &metadata) {
            Ok(video) => Some(video),
            Err(refusal) => return refusal,
        }
    } else {
        None
    };
    let id = new_id(&sandbox);
    let upload = Upload {
        id: id.clone(),
        length,
        offset: 0,
        metadata,
        bytes_received: 0,
        patches: 0,
        terminated: false,
        last_activity: now(),
        concat,
        parts: Vec::new(),
        busy: false,
    };
    if std::fs::File::create(data_path(&sandbox, &id, "bin")).is_err() {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "sandbox cannot store the upload",
        );
    }
    save(&sandbox, &upload);
    if let Ok(mut map) = sandbox.tus.map.lock() {
        map.insert(id.clone(), upload);
    }
    let with_body = headers.get("content-type").and_then(|v| v.to_str().ok())
        == Some("application/offset+octet-stream");
    let mut response = tus_response(StatusCode::CREATED);
    if with_body {
        match receive(&sandbox, &id, 0, &headers, body, reset, reset_after).await {
            Ok(offset) => {
                response
                    .headers_mut()
                    .insert("upload-offset", HeaderValue::from(offset));
            }
            Err(refusal) => return refusal,
        }
    }
    if let Some(video) = gcore_video {
        super::gcore::link_upload(&sandbox, video, &id);
    }
    let prefix = if gcore_leg { "/upload" } else { "/tus/files" };
    if let Ok(location) = HeaderValue::from_str(&format!("{prefix}/{id}")) {
        response.headers_mut().insert("location", location);
    }
    response
}

fn metadata_of(headers: &HeaderMap) -> Result<BTreeMap<String, String>, Response> {
    match headers
        .get("upload-metadata")
        .map(|v| v.to_str().map(parse_metadata))
    {
        None => Ok(BTreeMap::new()),
        Some(Ok(Ok(map))) => Ok(map),
        Some(Ok(Err(e))) => Err(refuse(StatusCode::BAD_REQUEST, &e)),
        Some(Err(_)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Metadata is not ASCII",
        )),
    }
}

/// A fresh upload id.
fn new_id(sandbox: &Sandbox) -> String {
    format!(
        "{:016x}{:08x}",
        rand::random::<u64>(),
        sandbox.tus.map.lock().map_or(0, |m| m.len())
    )
}

/// `Upload-Concat: final;URL1 URL2 ...`: join complete partial uploads, in
/// the order given, into a new complete upload.
fn create_final(sandbox: &Sandbox, headers: &HeaderMap, urls: &str) -> Response {
    if headers.contains_key("upload-length") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a final upload takes no Upload-Length",
        );
    }
    let metadata = match metadata_of(headers) {
        Ok(map) => map,
        Err(refusal) => return refusal,
    };
    let mut parts = Vec::new();
    for url in urls.split_whitespace() {
        let id = url.rsplit('/').next().unwrap_or_default();
        let Some(part) = sandbox
            .tus
            .with(id, |u| u.clone())
            .filter(|u| !u.terminated && url.contains("/tus/files/"))
        else {
            return refuse(
                StatusCode::NOT_FOUND,
                &format!("partial upload {url} does not exist"),
            );
        };
        if expired(sandbox, &part) {
            return refuse(StatusCode::GONE, &format!("partial upload {url} expired"));
        }
        if part.concat.as_deref() != Some("partial") {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("{url} is not a partial upload"),
            );
        }
        if part.offset != part.length {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("partial upload {url} is not complete"),
            );
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a final upload needs partial uploads",
        );
    }
    let id = new_id(sandbox);
    let joined = (|| -> std::io::Result<()> {
        let mut out = std::fs::File::create(data_path(sandbox, &id, "bin"))?;
        for part in &parts {
            let mut input = std::fs::File::open(data_path(sandbox, &part.id, "bin"))?;
            std::io::copy(&mut input, &mut out)?;
        }
        Ok(())
    })();
    if joined.is_err() {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "sandbox cannot store the upload",
        );
    }
    let length = parts.iter().map(|p| p.length).sum();
    let upload = Upload {
        id: id.clone(),
        length,
        offset: length,
        metadata,
        bytes_received: 0,
        patches: 0,
        terminated: false,
        last_activity: now(),
        concat: Some("final".into()),
        parts: parts.into_iter().map(|p| p.id).collect(),
        busy: false,
    };
    save(sandbox, &upload);
    if let Ok(mut map) = sandbox.tus.map.lock() {
        map.insert(id.clone(), upload);
    }
    let mut response = tus_response(StatusCode::CREATED);
    if let Ok(location) = HeaderValue::from_str(&format!("/tus/files/{id}")) {
        response.headers_mut().insert("location", location);
    }
    response
}

async fn head(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = precheck(&sandbox, &headers) {
        return response;
    }
    let Some(upload) = sandbox
        .tus
        .with(&id, |u| u.clone())
        .filter(|u| !u.terminated)
    else {
        return refuse(StatusCode::NOT_FOUND, "no such upload");
    };
    if expired(&sandbox, &upload) {
        return refuse(StatusCode::GONE, "upload expired");
    }
    let mut response = tus_response(StatusCode::OK);
    response
        .headers_mut()
        .insert("upload-offset", HeaderValue::from(upload.offset));
    let concat = match upload.concat.as_deref() {
        Some("final") => Some(format!(
            "final;{}",
            upload
                .parts
                .iter()
                .map(|id| format!("/tus/files/{id}"))
                .collect::<Vec<_>>()
                .join(" ")
        )),
        other => other.map(str::to_string),
    };
    if let Some(value) = concat.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert("upload-concat", value);
    }
    response
        .headers_mut()
        .insert("upload-length", HeaderValue::from(upload.length));
    response
}

async fn delete(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = precheck(&sandbox, &headers) {
        return response;
    }
    let Some(upload) = sandbox.tus.with(&id, |u| {
        u.terminated = true;
        u.clone()
    }) else {
        return refuse(StatusCode::NOT_FOUND, "no such upload");
    };
    save(&sandbox, &upload);
    let _ = std::fs::remove_file(data_path(&sandbox, &id, "bin"));
    tus_response(StatusCode::NO_CONTENT)
}

async fn patch(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(response) = precheck(&sandbox, &headers) {
        return response;
    }
    let Some(upload) = sandbox
        .tus
        .with(&id, |u| u.clone())
        .filter(|u| !u.terminated)
    else {
        return refuse(StatusCode::NOT_FOUND, "no such upload");
    };
    if expired(&sandbox, &upload) {
        return refuse(StatusCode::GONE, "upload expired");
    }
    if upload.concat.as_deref() == Some("final") {
        return refuse(
            StatusCode::FORBIDDEN,
            "a final upload is made by concatenation and takes no PATCH",
        );
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok())
        != Some("application/offset+octet-stream")
    {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/offset+octet-stream",
        );
    }
    let Some(offset) = header_u64(&headers, "upload-offset") else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Offset missing or not a number",
        );
    };
    if offset != upload.offset {
        return refuse(
            StatusCode::CONFLICT,
            "Upload-Offset does not match the upload's offset",
        );
    }
    match receive(&sandbox, &id, offset, &headers, body, reset, reset_after).await {
        Ok(new_offset) => {
            let mut response = tus_response(StatusCode::NO_CONTENT);
            response
                .headers_mut()
                .insert("upload-offset", HeaderValue::from(new_offset));
            response
        }
        Err(refusal) => refusal,
    }
}

/// Clears the busy flag however the request ends (even a dropped connection).
struct BusyGuard<'a> {
    sandbox: &'a Sandbox,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.sandbox.tus.with(&self.id, |u| u.busy = false);
    }
}

enum Checksum {
    Sha1(sha1::Sha1, Vec<u8>),
    Sha256(sha2::Sha256, Vec<u8>),
}

fn parse_checksum(headers: &HeaderMap) -> Result<Option<Checksum>, Response> {
    let Some(value) = headers.get("upload-checksum") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| refuse(StatusCode::BAD_REQUEST, "bad Upload-Checksum"))?;
    let (algorithm, b64) = text.split_once(' ').ok_or_else(|| {
        refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Checksum must be 'ALGO BASE64'",
        )
    })?;
    let expected = BASE64.decode(b64.trim()).map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Checksum digest is not base64",
        )
    })?;
    match algorithm {
        "sha1" => Ok(Some(Checksum::Sha1(sha1::Sha1::new(), expected))),
        "sha256" => Ok(Some(Checksum::Sha256(sha2::Sha256::new(), expected))),
        _ => Err(refuse(
            StatusCode::BAD_REQUEST,
            "unsupported checksum algorithm",
        )),
    }
}

/// Read a body into the upload at `offset`, honouring the throttle, the
/// reset mark and the checksum. Without a checksum, bytes received before a
/// broken connection are kept (like tusd); with one, only a verified body
/// moves the offset. Answers the new offset.
async fn receive(
    sandbox: &Sandbox,
    id: &str,
    offset: u64,
    headers: &HeaderMap,
    body: Body,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
) -> Result<u64, Response> {
    let mut checksum = parse_checksum(headers)?;
    let claimed = sandbox.tus.with(id, |u| {
        if u.busy {
            false
        } else {
            u.busy = true;
            u.patches += 1;
            true
        }
    });
    if claimed != Some(true) {
        return Err(refuse(
            StatusCode::LOCKED,
            "another request is writing this upload",
        ));
    }
    let _guard = BusyGuard {
        sandbox,
        id: id.to_string(),
    };
    let length = sandbox.tus.with(id, |u| u.length).unwrap_or(0);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(data_path(sandbox, id, "bin"))
        .map_err(|_| refuse(StatusCode::NOT_FOUND, "upload data missing"))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "seek failed"))?;
    let cut_after = reset_after.map(|Extension(ResetAfter(n))| n);
    let outcome = write_body(
        &sandbox.faults,
        body.into_data_stream(),
        &mut file,
        length - offset,
        cut_after,
        |bytes| {
            match &mut checksum {
                Some(Checksum::Sha1(h, _)) => h.update(bytes),
                Some(Checksum::Sha256(h, _)) => h.update(bytes),
                None => {}
            }
            sandbox
                .tus
                .with(id, |u| u.bytes_received += bytes.len() as u64);
        },
    )
    .await;
    let Ok(arrived) = outcome else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "body goes past Upload-Length",
        ));
    };
    let (received, broken) = (arrived.bytes, arrived.broken);
    let verified = match checksum {
        None => true,
        Some(_) if broken => false,
        Some(Checksum::Sha1(h, expected)) => h.finalize().as_slice() == expected.as_slice(),
        Some(Checksum::Sha256(h, expected)) => h.finalize().as_slice() == expected.as_slice(),
    };
    let had_checksum = headers.contains_key("upload-checksum");
    let commit = verified || (!had_checksum && broken);
    let upload = sandbox.tus.with(id, |u| {
        if commit {
            u.offset = offset + received;
        }
        u.last_activity = now();
        u.clone()
    });
    if let Some(upload) = &upload {
        save(sandbox, upload);
    }
    if arrived.cut
        && let Some(Extension(reset)) = reset
    {
        return Err(reset.drop_connection().await);
    }
    if broken {
        return Err(refuse(StatusCode::BAD_REQUEST, "connection broke"));
    }
    if !verified {
        return Err(refuse(
            StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
            "checksum mismatch",
        ));
    }
    Ok(offset + received)
}
