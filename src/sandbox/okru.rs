//! The OK.ru simulator (PROTOCOLS §1), read from the protocol text alone:
//! `/fb.do` checks the application key, the access token and the request
//! signature (md5 of the sorted pairs plus md5(token + secret)); answers
//! errors as HTTP 200 with `error_code`. Upload URLs take strict
//! `Content-Range` chunks (416 on a wrong start, 400 on a short body), expire
//! after `--token-ttl` (403), and report their status on GET. A video counts
//! as published only after `video.update`.

// Refusals are ready HTTP responses carried as errors, the axum idiom.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::body::write_body;
use super::faults::ResetAfter;
use super::records;
use super::tokens::now;
use super::{ConnectionReset, Sandbox};

/// One video as the simulator sees it (also `<data>/okru/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Video {
    /// Numeric id.
    pub video_id: u64,
    /// `file_name` given to getUploadUrl.
    pub file_name: String,
    /// `file_size` given to getUploadUrl.
    pub file_size: u64,
    /// Group, if any.
    pub gid: Option<String>,
    /// Bytes stored contiguously from 0.
    pub received: u64,
    /// Body bytes received over all requests.
    pub bytes_received: u64,
    /// Upload token in the URL.
    pub token: String,
    /// When the upload URL was issued (seconds since the epoch).
    pub issued_at: f64,
    /// Set by video.update.
    pub title: Option<String>,
    /// Set by video.update.
    pub description: Option<String>,
    /// Set by video.update.
    pub tags: Option<String>,
    /// Set by video.update.
    pub privacy: Option<String>,
    /// video.update succeeded.
    pub updated: bool,
}

/// All videos.
#[derive(Default)]
pub struct Videos {
    map: Mutex<HashMap<u64, Video>>,
}

impl Videos {
    /// Load `<data>/okru/*.json`.
    pub fn load(dir: &std::path::Path) -> Self {
        let map = records::load::<Video>(dir)
            .into_iter()
            .map(|v| (v.video_id, v))
            .collect();
        Videos {
            map: Mutex::new(map),
        }
    }

    fn with<T>(&self, id: u64, f: impl FnOnce(&mut Video) -> T) -> Option<T> {
        self.map.lock().ok()?.get_mut(&id).map(f)
    }
}

fn save(sandbox: &Sandbox, video: &Video) {
    records::save(
        &sandbox
            .data
            .join("okru")
            .join(format!("{}.json", video.video_id)),
        video,
    );
}

fn bin_path(sandbox: &Sandbox, id: u64) -> std::path::PathBuf {
    sandbox.data.join("okru").join(format!("{id}.bin"))
}

/// The routes.
pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/fb.do", get(api_get).post(api_post))
        .route("/okru/upload/{id}", post(upload).get(status))
        .route("/_sandbox/okru", get(list))
}

async fn list(State(sandbox): State<Arc<Sandbox>>) -> Json<Vec<Video>> {
    let mut videos: Vec<Video> = sandbox
        .okru
        .map
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    videos.sort_by_key(|v| v.video_id);
    Json(videos)
}

fn error(code: i64, message: &str) -> Response {
    Json(json!({"error_code": code, "error_msg": message, "error_data": null})).into_response()
}

fn md5_hex(text: &str) -> String {
    hex::encode(Md5::digest(text.as_bytes()))
}

async fn api_get(
    State(sandbox): State<Arc<Sandbox>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = decode_form(query.as_deref().unwrap_or(""));
    api(&sandbox, params, &headers)
}

async fn api_post(
    State(sandbox): State<Arc<Sandbox>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut params = query;
    params.extend(decode_form(&body));
    api(&sandbox, params, &headers)
}

fn decode_form(text: &str) -> BTreeMap<String, String> {
    // A URL's query parser is an application/x-www-form-urlencoded parser.
    reqwest::Url::parse(&format!("http://form/?{text}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

/// Authenticate, verify the signature, dispatch.
fn api(sandbox: &Sandbox, params: BTreeMap<String, String>, headers: &HeaderMap) -> Response {
    let options = &sandbox.options;
    if params.get("application_key") != Some(&options.okru_application_key) {
        return error(101, "PARAM_API_KEY : Application key is unknown");
    }
    if params.get("access_token") != Some(&options.okru_access_token) {
        return error(102, "PARAM_SESSION_EXPIRED : Session expired");
    }
    let secret = md5_hex(&format!(
        "{}{}",
        options.okru_access_token, options.okru_secret_key
    ));
    let mut text = String::new();
    for (key, value) in &params {
        if key != "access_token" && key != "session_key" && key != "sig" {
            text.push_str(&format!("{key}={value}"));
        }
    }
    text.push_str(&secret);
    if params.get("sig").map(|s| s.to_ascii_lowercase()) != Some(md5_hex(&text)) {
        return error(104, "PARAM_SIGNATURE : Invalid signature");
    }
    if params.get("format").map(String::as_str) != Some("json") {
        return error(100, "PARAM : format must be json");
    }
    match params.get("method").map(String::as_str) {
        Some("video.getUploadUrl") => get_upload_url(sandbox, &params, headers),
        Some("video.update") => update(sandbox, &params),
        _ => error(3, "METHOD : Method is unknown"),
    }
}

fn get_upload_url(
    sandbox: &Sandbox,
    params: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let Some(file_name) = params.get("file_name").filter(|n| !n.is_empty()) else {
        return error(100, "PARAM : file_name is required");
    };
    let Some(file_size) = params.get("file_size").and_then(|s| s.parse::<u64>().ok()) else {
        return error(100, "PARAM : file_size must be a number of bytes");
    };
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let Ok(mut map) = sandbox.okru.map.lock() else {
        return error(2, "SERVICE : try later");
    };
    let video_id = 1_000_000 + map.len() as u64 + 1;
    let token = format!("{:016x}", rand::random::<u64>());
    let video = Video {
        video_id,
        file_name: file_name.clone(),
        file_size,
        gid: params.get("gid").cloned(),
        received: 0,
        bytes_received: 0,
        token: token.clone(),
        issued_at: now(),
        title: None,
        description: None,
        tags: None,
        privacy: None,
        updated: false,
    };
    if std::fs::File::create(bin_path(sandbox, video_id)).is_err() {
        return error(2, "SERVICE : storage failed");
    }
    save(sandbox, &video);
    map.insert(video_id, video);
    Json(json!({
        "upload_url": format!("http://{host}/okru/upload/{video_id}?token={token}"),
        "video_id": video_id,
    }))
    .into_response()
}

fn update(sandbox: &Sandbox, params: &BTreeMap<String, String>) -> Response {
    let Some(vid) = params.get("vid").and_then(|v| v.parse::<u64>().ok()) else {
        return error(100, "PARAM : vid is required");
    };
    let Some(title) = params.get("title").filter(|t| !t.is_empty()) else {
        return error(100, "PARAM : title is required");
    };
    if let Some(privacy) = params.get("privacy")
        && privacy != "PUBLIC"
        && privacy != "FRIENDS"
    {
        return error(100, "PARAM : privacy must be PUBLIC or FRIENDS");
    }
    let updated = sandbox.okru.with(vid, |v| {
        if v.received < v.file_size {
            return None;
        }
        v.title = Some(title.clone());
        v.description = params.get("description").cloned();
        v.tags = params.get("tags").cloned();
        v.privacy = params.get("privacy").cloned();
        v.updated = true;
        Some(v.clone())
    });
    match updated {
        None => error(300, "NOT_FOUND : no such video"),
        Some(None) => error(100, "PARAM : the video's upload is not complete"),
        Some(Some(video)) => {
            save(sandbox, &video);
            Json(json!(true)).into_response()
        }
    }
}

fn check_token(
    sandbox: &Sandbox,
    id: u64,
    query: &BTreeMap<String, String>,
) -> Result<Video, Response> {
    let Some(video) = sandbox.okru.with(id, |v| v.clone()) else {
        return Err((StatusCode::NOT_FOUND, "no such upload").into_response());
    };
    if query.get("token") != Some(&video.token) {
        return Err((StatusCode::FORBIDDEN, "bad upload token").into_response());
    }
    if let Some(ttl) = sandbox.options.token_ttl
        && now() - video.issued_at > ttl.as_secs_f64()
    {
        return Err((StatusCode::FORBIDDEN, "upload URL expired").into_response());
    }
    Ok(video)
}

async fn status(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<u64>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let video = match check_token(&sandbox, id, &query) {
        Ok(video) => video,
        Err(refusal) => return refusal,
    };
    let last = video.received as i64 - 1;
    let state = if video.received == video.file_size {
        "complete"
    } else {
        "partial"
    };
    let mut response =
        Json(json!({"status": state, "total": video.file_size, "last_byte": last})).into_response();
    if let Ok(range) = HeaderValue::from_str(&format!("bytes=0-{last}")) {
        response.headers_mut().insert("range", range);
    }
    response
}

/// `Content-Range: bytes FIRST-LAST/TOTAL`, inclusive.
fn parse_range(headers: &HeaderMap) -> Option<(u64, u64, u64)> {
    let text = headers
        .get("content-range")?
        .to_str()
        .ok()?
        .strip_prefix("bytes ")?;
    let (span, total) = text.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last, total) = (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
    (first <= last && last < total).then_some((first, last, total))
}

async fn upload(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<u64>,
    Query(query): Query<BTreeMap<String, String>>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let video = match check_token(&sandbox, id, &query) {
        Ok(video) => video,
        Err(refusal) => return refusal,
    };
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/octet-stream")
    {
        return (
            StatusCode::BAD_REQUEST,
            "Content-Type must be application/octet-stream",
        )
            .into_response();
    }
    let Some((first, last, total)) = parse_range(&headers) else {
        return (
            StatusCode::BAD_REQUEST,
            "Content-Range must be 'bytes FIRST-LAST/TOTAL'",
        )
            .into_response();
    };
    if total != video.file_size {
        return (
            StatusCode::BAD_REQUEST,
            "Content-Range total differs from file_size",
        )
            .into_response();
    }
    if first != video.received {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range does not start at the next expected byte",
        )
            .into_response();
    }
    let expected = last - first + 1;
    let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .open(bin_path(&sandbox, id))
    else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "storage missing").into_response();
    };
    if file.seek(SeekFrom::Start(first)).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "seek failed").into_response();
    }
    let cut_after = reset_after.map(|Extension(ResetAfter(n))| n);
    let outcome = write_body(
        &sandbox.faults,
        body.into_data_stream(),
        &mut file,
        expected,
        cut_after,
        |bytes| {
            sandbox
                .okru
                .with(id, |v| v.bytes_received += bytes.len() as u64);
        },
    )
    .await;
    let Ok(arrived) = outcome else {
        return (StatusCode::BAD_REQUEST, "body longer than Content-Range").into_response();
    };
    let (received, broken) = (arrived.bytes, arrived.broken);
    // A chunk counts only when whole: the range must be stored completely.
    let complete_chunk = !broken && received == expected;
    let snapshot = sandbox.okru.with(id, |v| {
        if complete_chunk {
            v.received = last + 1;
        }
        v.clone()
    });
    if let Some(video) = &snapshot {
        save(&sandbox, video);
    }
    if arrived.cut
        && let Some(Extension(reset)) = reset
    {
        return reset.drop_connection().await;
    }
    if broken {
        return (StatusCode::BAD_REQUEST, "connection broke").into_response();
    }
    if received < expected {
        return (StatusCode::BAD_REQUEST, "body shorter than Content-Range").into_response();
    }
    if last + 1 == total {
        StatusCode::OK.into_response()
    } else {
        StatusCode::CREATED.into_response()
    }
}
