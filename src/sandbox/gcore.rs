//! The Gcore Video Streaming simulator (PROTOCOLS §3), read from the
//! protocol text alone: `Authorization: APIKey` on the REST API, video
//! creation (answered as an object or a one-element array, alternately),
//! upload parameters naming this sandbox as the upload server (plain http),
//! a tus leg at `/upload/` that insists on the `token`, `video_id` and
//! `client_id` metadata (500 "token invalid" and friends otherwise), and a
//! status that moves empty → pending → viewable → ready once the bytes are in.

// Refusals are ready HTTP responses carried as errors, the axum idiom.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::tokens::now;
use super::{Sandbox, records};

const CLIENT_ID: u64 = 4242;
/// Upload tokens live four hours unless `--token-ttl` says otherwise.
const TOKEN_LIFETIME: f64 = 4.0 * 3600.0;

/// One video as the simulator sees it (also `<data>/gcore/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Video {
    /// Numeric id.
    pub id: u64,
    /// `name` given at creation.
    pub name: String,
    /// `description` given at creation.
    pub description: Option<String>,
    /// empty, pending, viewable, ready or error.
    pub status: String,
    /// The tus upload that carries its bytes.
    pub upload: Option<String>,
    /// Deleted by the client.
    pub deleted: bool,
}

struct UploadToken {
    video: u64,
    issued_at: f64,
}

/// Videos and upload tokens.
#[derive(Default)]
pub struct Gcore {
    videos: Mutex<BTreeMap<u64, Video>>,
    tokens: Mutex<HashMap<String, UploadToken>>,
}

impl Gcore {
    /// Load `<data>/gcore/*.json`.
    pub fn load(dir: &std::path::Path) -> Self {
        let videos = records::load::<Video>(dir)
            .into_iter()
            .map(|v| (v.id, v))
            .collect();
        Gcore {
            videos: Mutex::new(videos),
            ..Gcore::default()
        }
    }

    fn with<T>(&self, id: u64, f: impl FnOnce(&mut Video) -> T) -> Option<T> {
        self.videos
            .lock()
            .ok()?
            .get_mut(&id)
            .filter(|v| !v.deleted)
            .map(f)
    }
}

fn save(sandbox: &Sandbox, video: &Video) {
    records::save(
        &sandbox
            .data
            .join("gcore")
            .join(format!("{}.json", video.id)),
        video,
    );
}

/// The routes.
pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/streaming/videos", post(create))
        .route("/streaming/videos/{id}", get(show).delete(delete))
        .route("/streaming/videos/{id}/upload", get(upload_parameters))
        .route("/_sandbox/gcore", get(dump))
}

fn authorize(sandbox: &Sandbox, headers: &HeaderMap) -> Result<(), Response> {
    let expected = format!("APIKey {}", sandbox.options.gcore_api_key);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str()) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Invalid API key"})),
        )
            .into_response())
    }
}

fn video_json(video: &Video, host: &str) -> Value {
    let mut value = json!({
        "id": video.id,
        "name": video.name,
        "description": video.description,
        "status": video.status,
        "client_id": CLIENT_ID,
    });
    if matches!(video.status.as_str(), "viewable" | "ready") {
        value["hls_url"] = json!(format!("http://{host}/videos/{}/master.m3u8", video.id));
        value["iframe_url"] = json!(format!("http://{host}/videos/{}", video.id));
    }
    value
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

async fn create(
    State(sandbox): State<Arc<Sandbox>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    let Some(name) = body
        .pointer("/video/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "video.name is required"})),
        )
            .into_response();
    };
    if body.pointer("/video/origin_url").is_some() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "origin_url is not used for uploads"})),
        )
            .into_response();
    }
    let Ok(mut videos) = sandbox.gcore.videos.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let id = 500_000 + videos.len() as u64 + 1;
    let video = Video {
        id,
        name: name.to_string(),
        description: body
            .pointer("/video/description")
            .and_then(Value::as_str)
            .map(str::to_string),
        status: "empty".into(),
        upload: None,
        deleted: false,
    };
    save(&sandbox, &video);
    let answer = video_json(&video, &host(&headers));
    videos.insert(id, video);
    // The documentation is unclear between the two shapes: give both.
    let answer = if id.is_multiple_of(2) {
        json!([answer])
    } else {
        answer
    };
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn upload_parameters(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    let Some(video) = sandbox.gcore.with(id, |v| v.clone()) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "video not found"})),
        )
            .into_response();
    };
    let token = format!("gt-{:016x}", rand::random::<u64>());
    if let Ok(mut tokens) = sandbox.gcore.tokens.lock() {
        tokens.insert(
            token.clone(),
            UploadToken {
                video: id,
                issued_at: now(),
            },
        );
    }
    let host = host(&headers);
    Json(json!({
        "servers": [
            {"id": 560, "hostname": "inactive.invalid", "active": false, "ssl": true},
            {"id": 561, "hostname": host, "active": true, "ssl": false},
        ],
        "token": token,
        "video": video_json(&video, &host),
    }))
    .into_response()
}

fn token_error(message: &str) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, message.to_string()).into_response()
}

/// The tus leg's creation check: filename, filetype, a live token that was
/// issued for this video and this client. Answers the video id.
pub fn check_upload_metadata(
    sandbox: &Sandbox,
    metadata: &BTreeMap<String, String>,
) -> Result<u64, Response> {
    for key in ["filename", "filetype", "token", "video_id", "client_id"] {
        if metadata.get(key).is_none_or(String::is_empty) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("Upload-Metadata needs {key}"),
            )
                .into_response());
        }
    }
    let lifetime = sandbox
        .options
        .token_ttl
        .map_or(TOKEN_LIFETIME, |d| d.as_secs_f64());
    let token = metadata
        .get("token")
        .map(String::as_str)
        .unwrap_or_default();
    let issued = sandbox
        .gcore
        .tokens
        .lock()
        .ok()
        .and_then(|t| t.get(token).map(|t| (t.video, t.issued_at)));
    let Some((video, _)) = issued.filter(|(_, at)| now() - at <= lifetime) else {
        return Err(token_error("token invalid"));
    };
    if metadata.get("video_id").and_then(|v| v.parse::<u64>().ok()) != Some(video) {
        return Err(token_error("token video does not match"));
    }
    if metadata
        .get("client_id")
        .and_then(|c| c.parse::<u64>().ok())
        != Some(CLIENT_ID)
    {
        return Err(token_error("token client does not match"));
    }
    Ok(video)
}

/// Remember which tus upload carries a video's bytes.
pub fn link_upload(sandbox: &Sandbox, video: u64, upload: &str) {
    if let Some(v) = sandbox.gcore.with(video, |v| {
        v.upload = Some(upload.to_string());
        v.clone()
    }) {
        save(sandbox, &v);
    }
}

async fn show(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    let upload = sandbox.gcore.with(id, |v| v.upload.clone());
    let Some(upload) = upload else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "video not found"})),
        )
            .into_response();
    };
    let complete = upload
        .and_then(|u| super::tus::progress(&sandbox, &u))
        .is_some_and(|(offset, length)| offset == length);
    // Processing advances one step per look once the bytes are in.
    let video = sandbox.gcore.with(id, |v| {
        if complete {
            v.status = match v.status.as_str() {
                "empty" => "pending",
                "pending" => "viewable",
                _ => "ready",
            }
            .into();
        }
        v.clone()
    });
    match video {
        Some(video) => {
            save(&sandbox, &video);
            Json(video_json(&video, &host(&headers))).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn delete(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    match sandbox.gcore.with(id, |v| {
        v.deleted = true;
        v.clone()
    }) {
        Some(video) => {
            save(&sandbox, &video);
            StatusCode::NO_CONTENT.into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "video not found"})),
        )
            .into_response(),
    }
}

async fn dump(State(sandbox): State<Arc<Sandbox>>) -> Json<Vec<Video>> {
    Json(
        sandbox
            .gcore
            .videos
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default(),
    )
}
