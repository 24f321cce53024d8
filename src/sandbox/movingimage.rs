//! The movingimage VideoManager Pro simulator (PROTOCOLS §4), read from the
//! protocol text alone: an OpenID Connect token endpoint (password and
//! refresh grants; access tokens live `--token-ttl`, 5 minutes by default),
//! the API under `/v1/vms/{vmId}` with bearer tokens, video creation and
//! upload URLs answered in `Location`, upload URLs whose own token expires,
//! numbered chunks that must come in order and agree on their count, 200 /
//! 201 / 202 in turn as success, and code 1101 past `--mi-quota` bytes.

// Refusals are ready HTTP responses carried as errors, the axum idiom.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::body::write_body;
use super::faults::ResetAfter;
use super::tokens::{BearerTokens, now};
use super::{ConnectionReset, Sandbox, records};

/// Default access-token lifetime, as the real service.
const ACCESS_LIFETIME: f64 = 300.0;
/// Default upload-URL lifetime, as the real service.
const UPLOAD_URL_LIFETIME: f64 = 4.0 * 3600.0;

/// One video as the simulator sees it (also `<data>/movingimage/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Video {
    /// Id (the last segment of the create answer's Location).
    pub id: String,
    /// `fileName` given at creation.
    pub file_name: String,
    /// `title` given at creation.
    pub title: String,
    /// `description` given at creation.
    pub description: String,
    /// `keywords` given at creation.
    pub keywords: Vec<String>,
    /// `autoPublish` given at creation.
    pub auto_publish: bool,
    /// Chunks stored, in order.
    pub chunks: u64,
    /// `Mi24-Upload-Total-Chunks` announced by the first chunk.
    pub total_chunks: Option<u64>,
    /// Size of the first chunk (all but the last must match it).
    pub chunk_size: Option<u64>,
    /// Bytes stored.
    pub received: u64,
    /// Body bytes received over all requests.
    pub bytes_received: u64,
    /// Every chunk arrived.
    pub complete: bool,
    /// Deleted by the client.
    pub deleted: bool,
    /// Upload URLs handed out.
    pub upload_urls: u64,
}

struct Issued {
    expires_at: f64,
}

/// Videos, tokens and upload URLs.
#[derive(Default)]
pub struct Movingimage {
    videos: Mutex<BTreeMap<String, Video>>,
    tokens: BearerTokens,
    upload_tokens: Mutex<HashMap<String, (String, Issued)>>,
    answers: Mutex<u64>,
}

impl Movingimage {
    /// Load `<data>/movingimage/*.json`.
    pub fn load(dir: &std::path::Path) -> Self {
        let videos = records::load::<Video>(dir)
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        Movingimage {
            videos: Mutex::new(videos),
            ..Movingimage::default()
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Video) -> T) -> Option<T> {
        self.videos
            .lock()
            .ok()?
            .get_mut(id)
            .filter(|v| !v.deleted)
            .map(f)
    }
}

fn save(sandbox: &Sandbox, video: &Video) {
    records::save(
        &sandbox
            .data
            .join("movingimage")
            .join(format!("{}.json", video.id)),
        video,
    );
}

fn bin_path(sandbox: &Sandbox, id: &str) -> std::path::PathBuf {
    sandbox.data.join("movingimage").join(format!("{id}.bin"))
}

/// The routes (token endpoint at the default auth path).
pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route(
            "/auth/realms/platform/protocol/openid-connect/token",
            post(token),
        )
        .route("/v1/vms/{vm}/videos", post(create))
        .route("/v1/vms/{vm}/videos/{id}", get(show).delete(delete))
        .route("/v1/vms/{vm}/videos/{id}/url", get(upload_url))
        .route("/mi/upload/{id}", post(upload))
        .route("/_sandbox/movingimage", get(dump))
        .route("/_sandbox/movingimage/auth", get(grants))
}

fn api_error(status: StatusCode, code: i64, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

fn issue(sandbox: &Sandbox, refreshed: bool) -> Response {
    let lifetime = sandbox
        .options
        .token_ttl
        .map_or(ACCESS_LIFETIME, |d| d.as_secs_f64());
    let (access, refresh) = sandbox.movingimage.tokens.issue("mi-", lifetime, refreshed);
    Json(json!({
        "access_token": access,
        "expires_in": lifetime.ceil() as u64,
        "refresh_expires_in": 1800,
        "refresh_token": refresh,
        "token_type": "bearer",
        "scope": "openid",
    }))
    .into_response()
}

async fn token(State(sandbox): State<Arc<Sandbox>>, body: String) -> Response {
    let form: HashMap<String, String> = reqwest::Url::parse(&format!("http://form/?{body}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let oidc_error =
        |code: &str| (StatusCode::UNAUTHORIZED, Json(json!({"error": code}))).into_response();
    if form.get("client_id").map(String::as_str) != Some("anonymous") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    match form.get("grant_type").map(String::as_str) {
        Some("password") => {
            let options = &sandbox.options;
            if form.get("scope").map(String::as_str) != Some("openid")
                || form.get("response_type").map(String::as_str) != Some("token")
            {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_request"})),
                )
                    .into_response();
            }
            if form.get("username") != Some(&options.mi_username)
                || form.get("password") != Some(&options.mi_password)
            {
                return oidc_error("invalid_grant");
            }
            issue(&sandbox, false)
        }
        Some("refresh_token") => {
            let refresh = form.get("refresh_token").cloned().unwrap_or_default();
            if sandbox.movingimage.tokens.redeem(&refresh) {
                issue(&sandbox, true)
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_grant"})),
                )
                    .into_response()
            }
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response(),
    }
}

fn authorize(sandbox: &Sandbox, vm: &str, headers: &HeaderMap) -> Result<(), Response> {
    if !sandbox.movingimage.tokens.authorized(headers) {
        return Err(api_error(
            StatusCode::UNAUTHORIZED,
            401,
            "access token missing or expired",
        ));
    }
    if vm != sandbox.options.mi_video_manager_id {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            403,
            "no access to this video manager",
        ));
    }
    Ok(())
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
    Path(vm): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &vm, &headers) {
        return refusal;
    }
    let Some(file_name) = body
        .get("fileName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return api_error(StatusCode::BAD_REQUEST, 400, "fileName is required");
    };
    let id = format!("{:x}", rand::random::<u64>());
    let video = Video {
        id: id.clone(),
        file_name: file_name.to_string(),
        title: body
            .get("title")
            .and_then(Value::as_str)
            .unwrap_or(file_name)
            .to_string(),
        description: body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        keywords: body
            .get("keywords")
            .and_then(Value::as_array)
            .map(|k| {
                k.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        auto_publish: body
            .get("autoPublish")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        chunks: 0,
        total_chunks: None,
        chunk_size: None,
        received: 0,
        bytes_received: 0,
        complete: false,
        deleted: false,
        upload_urls: 0,
    };
    if std::fs::File::create(bin_path(&sandbox, &id)).is_err() {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, 500, "storage failed");
    }
    save(&sandbox, &video);
    if let Ok(mut videos) = sandbox.movingimage.videos.lock() {
        videos.insert(id.clone(), video);
    }
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(location) = HeaderValue::from_str(&format!(
        "http://{}/v1/vms/{vm}/videos/{id}",
        host(&headers)
    )) {
        response.headers_mut().insert("location", location);
    }
    response
}

async fn upload_url(
    State(sandbox): State<Arc<Sandbox>>,
    Path((vm, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &vm, &headers) {
        return refusal;
    }
    let Some(video) = sandbox.movingimage.with(&id, |v| {
        v.upload_urls += 1;
        v.clone()
    }) else {
        return api_error(StatusCode::NOT_FOUND, 404, "video not found");
    };
    save(&sandbox, &video);
    let lifetime = sandbox
        .options
        .token_ttl
        .map_or(UPLOAD_URL_LIFETIME, |d| d.as_secs_f64());
    let token = format!("mi-up-{:016x}", rand::random::<u64>());
    if let Ok(mut tokens) = sandbox.movingimage.upload_tokens.lock() {
        tokens.insert(
            token.clone(),
            (
                id.clone(),
                Issued {
                    expires_at: now() + lifetime,
                },
            ),
        );
    }
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(location) = HeaderValue::from_str(&format!(
        "http://{}/mi/upload/{id}?token={token}",
        host(&headers)
    )) {
        response.headers_mut().insert("location", location);
    }
    response
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn upload(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let token = query.get("token").cloned().unwrap_or_default();
    let valid = sandbox
        .movingimage
        .upload_tokens
        .lock()
        .ok()
        .and_then(|t| {
            t.get(&token)
                .map(|(video, issued)| video == &id && issued.expires_at > now())
        })
        .unwrap_or(false);
    if !valid {
        return api_error(
            StatusCode::UNAUTHORIZED,
            401,
            "upload token invalid or expired",
        );
    }
    let Some(video) = sandbox.movingimage.with(&id, |v| v.clone()) else {
        return api_error(StatusCode::NOT_FOUND, 404, "video not found");
    };
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/octet-stream")
    {
        return api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            415,
            "Content-Type must be application/octet-stream",
        );
    }
    let (Some(total), Some(current)) = (
        header_u64(&headers, "mi24-upload-total-chunks"),
        header_u64(&headers, "mi24-upload-current-chunk"),
    ) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            400,
            "Mi24-Upload-Total-Chunks and Mi24-Upload-Current-Chunk are required",
        );
    };
    if current == 0 || current > total || video.total_chunks.is_some_and(|t| t != total) {
        return api_error(
            StatusCode::BAD_REQUEST,
            400,
            "chunk numbers are inconsistent",
        );
    }
    // The next chunk, or the last stored one again (its answer may have been lost).
    if current != video.chunks + 1 && current != video.chunks {
        return api_error(StatusCode::BAD_REQUEST, 400, "chunks must arrive in order");
    }
    if video.complete {
        return api_error(StatusCode::BAD_REQUEST, 400, "the upload is complete");
    }
    let Some(length) = header_u64(&headers, "content-length") else {
        return api_error(
            StatusCode::LENGTH_REQUIRED,
            411,
            "Content-Length is required",
        );
    };
    if current < total && video.chunk_size.is_some_and(|size| size != length) {
        return api_error(
            StatusCode::BAD_REQUEST,
            400,
            "all chunks but the last must have the same size",
        );
    }
    let start = video.chunk_size.unwrap_or(length) * (current - 1);
    if sandbox
        .options
        .mi_quota
        .is_some_and(|q| start + length > q.0)
    {
        // Read the chunk before refusing it, as a server that checks the
        // quota on what it stored would: an answer sent while the client is
        // still writing races it into a broken pipe, which says nothing of
        // the quota.
        let _ = axum::body::to_bytes(body, usize::MAX).await;
        return api_error(StatusCode::FORBIDDEN, 1101, "storage quota reached");
    }
    let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .open(bin_path(&sandbox, &id))
    else {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, 500, "storage missing");
    };
    if file.seek(SeekFrom::Start(start)).is_err() {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, 500, "seek failed");
    }
    let cut_after = reset_after.map(|Extension(ResetAfter(n))| n);
    let outcome = write_body(
        &sandbox.faults,
        body.into_data_stream(),
        &mut file,
        length,
        cut_after,
        |bytes| {
            sandbox
                .movingimage
                .with(&id, |v| v.bytes_received += bytes.len() as u64);
        },
    )
    .await;
    let Ok(received) = outcome else {
        return api_error(
            StatusCode::BAD_REQUEST,
            400,
            "body longer than Content-Length",
        );
    };
    let whole = !received.broken && received.bytes == length;
    let snapshot = sandbox.movingimage.with(&id, |v| {
        if whole {
            v.chunks = current;
            v.total_chunks = Some(total);
            if v.chunk_size.is_none() || current == 1 {
                v.chunk_size = Some(length);
            }
            v.received = start + length;
            v.complete = current == total;
        }
        v.clone()
    });
    if let Some(video) = &snapshot {
        save(&sandbox, video);
    }
    if received.cut
        && let Some(Extension(reset)) = reset
    {
        return reset.drop_connection().await;
    }
    if !whole {
        return api_error(
            StatusCode::BAD_REQUEST,
            400,
            "chunk body shorter than announced",
        );
    }
    // The documentation is unclear between 200, 201 and 202: answer each in turn.
    let turn = sandbox.movingimage.answers.lock().map(|mut n| {
        *n += 1;
        *n
    });
    match turn.unwrap_or(0) % 3 {
        0 => StatusCode::OK.into_response(),
        1 => StatusCode::CREATED.into_response(),
        _ => StatusCode::ACCEPTED.into_response(),
    }
}

async fn show(
    State(sandbox): State<Arc<Sandbox>>,
    Path((vm, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &vm, &headers) {
        return refusal;
    }
    match sandbox.movingimage.with(&id, |v| v.clone()) {
        Some(video) => {
            Json(json!({"id": video.id, "title": video.title, "fileName": video.file_name}))
                .into_response()
        }
        None => api_error(StatusCode::NOT_FOUND, 404, "video not found"),
    }
}

async fn delete(
    State(sandbox): State<Arc<Sandbox>>,
    Path((vm, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &vm, &headers) {
        return refusal;
    }
    match sandbox.movingimage.with(&id, |v| {
        v.deleted = true;
        v.clone()
    }) {
        Some(video) => {
            save(&sandbox, &video);
            StatusCode::NO_CONTENT.into_response()
        }
        None => api_error(StatusCode::NOT_FOUND, 404, "video not found"),
    }
}

/// `GET /_sandbox/movingimage/auth`: tokens issued per grant since start.
async fn grants(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    let (password, refresh) = sandbox.movingimage.tokens.grants();
    Json(json!({"password": password, "refresh": refresh}))
}

async fn dump(State(sandbox): State<Arc<Sandbox>>) -> Json<Vec<Video>> {
    Json(
        sandbox
            .movingimage
            .videos
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default(),
    )
}
