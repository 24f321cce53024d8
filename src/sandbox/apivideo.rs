//! The api.video simulator (PROTOCOLS §2), read from the protocol text
//! alone: API key → bearer tokens (expiring after `--token-ttl`), refresh,
//! videos created with metadata and listed by it, multipart chunks with
//! strict `Content-Range` (`bytes F-L/T` contiguous, or `part K/N`; at least
//! 5 MiB except the last), status with received ranges, delegated upload
//! tokens, and "already uploaded" for a source sent twice. Parts may arrive
//! side by side and in any order (a part sent again replaces it); the last
//! part (`N/N`) is refused until every other part is stored, then joins them.

// Refusals are ready HTTP responses carried as errors, the axum idiom.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use axum::extract::{Multipart, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::body::write_body;
use super::faults::ResetAfter;
use super::records;
use super::tokens::BearerTokens;
use super::{ConnectionReset, Sandbox};

const MIN_CHUNK: u64 = 5 << 20;

/// One video as the simulator sees it (also `<data>/apivideo/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Video {
    /// `vi…` id.
    pub video_id: String,
    /// Title given at creation.
    pub title: String,
    /// Description given at creation.
    pub description: Option<String>,
    /// Tags given at creation.
    pub tags: Vec<String>,
    /// Public flag given at creation.
    pub public: bool,
    /// Metadata pairs given at creation.
    pub metadata: Vec<BTreeMap<String, String>>,
    /// Total size, once the first chunk said it.
    pub total: Option<u64>,
    /// Bytes stored contiguously from 0.
    pub received: u64,
    /// Parts stored (parts mode).
    pub parts: u64,
    /// Size of each part stored, by part number (parts mode).
    #[serde(default)]
    pub part_sizes: BTreeMap<u64, u64>,
    /// Body bytes received over all requests.
    pub bytes_received: u64,
    /// Every byte arrived.
    pub complete: bool,
    /// Deleted by the client.
    pub deleted: bool,
    /// Created through a delegated upload token.
    pub delegated: bool,
}

/// Videos and tokens (videos reloaded from disk at start).
#[derive(Default)]
pub struct ApiVideo {
    videos: Mutex<HashMap<String, Video>>,
    tokens: BearerTokens,
}

impl ApiVideo {
    /// Load `<data>/apivideo/*.json`.
    pub fn load(dir: &std::path::Path) -> Self {
        let videos = records::load::<Video>(dir)
            .into_iter()
            .map(|v| (v.video_id.clone(), v))
            .collect();
        ApiVideo {
            videos: Mutex::new(videos),
            ..ApiVideo::default()
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
            .join("apivideo")
            .join(format!("{}.json", video.video_id)),
        video,
    );
}

fn bin_path(sandbox: &Sandbox, id: &str) -> std::path::PathBuf {
    sandbox.data.join("apivideo").join(format!("{id}.bin"))
}

/// The routes.
pub fn routes() -> Router<Arc<Sandbox>> {
    Router::new()
        .route("/auth/api-key", post(auth))
        .route("/auth/refresh", post(refresh))
        .route("/videos", post(create).get(list))
        .route("/videos/{id}", get(show).delete(delete))
        .route("/videos/{id}/status", get(status))
        .route("/videos/{id}/source", post(source))
        .route("/upload", post(delegated))
        .route("/_sandbox/apivideo", get(dump))
        .route("/_sandbox/apivideo/auth", get(grants))
}

fn problem(status: StatusCode, title: &str) -> Response {
    (
        status,
        Json(json!({
            "type": "https://docs.api.video/reference/sandbox",
            "title": title,
            "status": status.as_u16(),
            "name": "",
            "problems": [],
        })),
    )
        .into_response()
}

fn issue_tokens(sandbox: &Sandbox, refreshed: bool) -> Response {
    let ttl = sandbox
        .options
        .token_ttl
        .map_or(3600.0, |d| d.as_secs_f64());
    let (access, refresh) = sandbox.apivideo.tokens.issue("", ttl, refreshed);
    Json(json!({"token_type": "Bearer", "access_token": access, "refresh_token": refresh, "expires_in": ttl.ceil() as u64}))
        .into_response()
}

async fn auth(State(sandbox): State<Arc<Sandbox>>, Json(body): Json<Value>) -> Response {
    if body.get("apiKey").and_then(Value::as_str) != Some(sandbox.options.apivideo_api_key.as_str())
    {
        return problem(StatusCode::UNAUTHORIZED, "The API key is invalid.");
    }
    issue_tokens(&sandbox, false)
}

async fn refresh(State(sandbox): State<Arc<Sandbox>>, Json(body): Json<Value>) -> Response {
    let token = body
        .get("refreshToken")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !sandbox.apivideo.tokens.redeem(token) {
        return problem(StatusCode::BAD_REQUEST, "The refresh token is invalid.");
    }
    issue_tokens(&sandbox, true)
}

fn authorize(sandbox: &Sandbox, headers: &HeaderMap) -> Result<(), Response> {
    if sandbox.apivideo.tokens.authorized(headers) {
        Ok(())
    } else {
        Err(problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: missing or expired access token.",
        ))
    }
}

fn video_json(video: &Video, host: &str) -> Value {
    json!({
        "videoId": video.video_id,
        "title": video.title,
        "description": video.description,
        "tags": video.tags,
        "public": video.public,
        "metadata": video.metadata,
        "assets": {
            "hls": format!("http://{host}/vod/{}/hls/manifest.m3u8", video.video_id),
            "player": format!("http://{host}/vod/{}", video.video_id),
            "thumbnail": format!("http://{host}/vod/{}/thumbnail.jpg", video.video_id),
            "mp4": format!("http://{host}/vod/{}/mp4/source.mp4", video.video_id),
        },
    })
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

fn new_video(sandbox: &Sandbox, title: String, delegated: bool) -> Option<Video> {
    let video = Video {
        video_id: format!("vi{:016x}", rand::random::<u64>()),
        title,
        description: None,
        tags: Vec::new(),
        public: true,
        metadata: Vec::new(),
        total: None,
        received: 0,
        parts: 0,
        part_sizes: BTreeMap::new(),
        bytes_received: 0,
        complete: false,
        deleted: false,
        delegated,
    };
    std::fs::File::create(bin_path(sandbox, &video.video_id)).ok()?;
    Some(video)
}

async fn create(
    State(sandbox): State<Arc<Sandbox>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    let Some(title) = body
        .get("title")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "The request body is invalid: title is required.",
        );
    };
    let Some(mut video) = new_video(&sandbox, title.to_string(), false) else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage failed");
    };
    video.description = body
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    video.tags = body
        .get("tags")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    video.public = body.get("public").and_then(Value::as_bool).unwrap_or(true);
    video.metadata = body
        .get("metadata")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|m| {
                    let key = m.get("key")?.as_str()?;
                    let value = m.get("value")?.as_str()?;
                    Some(BTreeMap::from([
                        ("key".to_string(), key.to_string()),
                        ("value".to_string(), value.to_string()),
                    ]))
                })
                .collect()
        })
        .unwrap_or_default();
    save(&sandbox, &video);
    let answer = video_json(&video, &host(&headers));
    if let Ok(mut videos) = sandbox.apivideo.videos.lock() {
        videos.insert(video.video_id.clone(), video);
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list(
    State(sandbox): State<Arc<Sandbox>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    let filters: Vec<(String, String)> =
        reqwest::Url::parse(&format!("http://q/?{}", query.unwrap_or_default()))
            .map(|u| {
                u.query_pairs()
                    .filter_map(|(k, v)| {
                        let key = k.strip_prefix("metadata[")?.strip_suffix(']')?.to_string();
                        Some((key, v.into_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
    let host = host(&headers);
    let data: Vec<Value> = sandbox
        .apivideo
        .videos
        .lock()
        .map(|videos| {
            videos
                .values()
                .filter(|v| !v.deleted)
                .filter(|v| {
                    filters.iter().all(|(key, value)| {
                        v.metadata
                            .iter()
                            .any(|m| m.get("key") == Some(key) && m.get("value") == Some(value))
                    })
                })
                .map(|v| video_json(v, &host))
                .collect()
        })
        .unwrap_or_default();
    let count = data.len();
    Json(json!({"data": data, "pagination": {"currentPage": 1, "pagesTotal": 1, "itemsTotal": count}})).into_response()
}

async fn show(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    match sandbox
        .apivideo
        .with(&id, |v| video_json(v, &host(&headers)))
    {
        Some(video) => Json(video).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "The requested resource was not found.",
        ),
    }
}

async fn delete(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    match sandbox.apivideo.with(&id, |v| {
        v.deleted = true;
        v.clone()
    }) {
        Some(video) => {
            save(&sandbox, &video);
            StatusCode::NO_CONTENT.into_response()
        }
        None => problem(
            StatusCode::NOT_FOUND,
            "The requested resource was not found.",
        ),
    }
}

async fn status(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    let Some(video) = sandbox.apivideo.with(&id, |v| v.clone()) else {
        return problem(
            StatusCode::NOT_FOUND,
            "The requested resource was not found.",
        );
    };
    let total = video.total.unwrap_or(0);
    let ranges = if video.received > 0 {
        json!([{"from": 0, "to": video.received - 1, "total": total}])
    } else {
        json!([])
    };
    let state = if video.complete {
        "uploaded"
    } else if video.received > 0 {
        "uploading"
    } else {
        "missing"
    };
    Json(json!({"ingest": {"status": state, "filesize": total, "receivedBytes": ranges}, "encoding": {"playable": false}}))
        .into_response()
}

/// `GET /_sandbox/apivideo/auth`: tokens issued per grant since start.
async fn grants(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    let (api_key, refresh) = sandbox.apivideo.tokens.grants();
    Json(json!({"api_key": api_key, "refresh": refresh}))
}

async fn dump(State(sandbox): State<Arc<Sandbox>>) -> Json<Vec<Video>> {
    let mut videos: Vec<Video> = sandbox
        .apivideo
        .videos
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    videos.sort_by(|a, b| a.video_id.cmp(&b.video_id));
    Json(videos)
}

/// `Content-Range` forms api.video accepts.
#[derive(Debug, Clone, Copy)]
enum Range {
    Bytes { first: u64, last: u64, total: u64 },
    Part { index: u64, count: Option<u64> },
}

fn parse_range(headers: &HeaderMap) -> Option<Range> {
    let text = headers.get("content-range")?.to_str().ok()?.trim();
    if let Some(rest) = text.strip_prefix("bytes ") {
        let (span, total) = rest.split_once('/')?;
        let (first, last) = span.split_once('-')?;
        let (first, last, total) = (first.parse().ok()?, last.parse().ok()?, total.parse().ok()?);
        return (first <= last && last < total).then_some(Range::Bytes { first, last, total });
    }
    let rest = text.strip_prefix("part ")?;
    let (index, count) = rest.split_once('/')?;
    let index: u64 = index.parse().ok()?;
    let count = if count == "*" {
        None
    } else {
        Some(count.parse().ok()?)
    };
    (index >= 1 && count.is_none_or(|n| index <= n)).then_some(Range::Part { index, count })
}

async fn source(
    State(sandbox): State<Arc<Sandbox>>,
    Path(id): Path<String>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: HeaderMap,
    multipart: Multipart,
) -> Response {
    if let Err(refusal) = authorize(&sandbox, &headers) {
        return refusal;
    }
    receive(&sandbox, Some(id), reset, reset_after, &headers, multipart).await
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn delegated(
    State(sandbox): State<Arc<Sandbox>>,
    Query(query): Query<TokenQuery>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: HeaderMap,
    multipart: Multipart,
) -> Response {
    if query.token.as_deref() != Some(sandbox.options.apivideo_upload_token.as_str()) {
        return problem(
            StatusCode::NOT_FOUND,
            "The upload token does not exist or has expired.",
        );
    }
    receive(&sandbox, None, reset, reset_after, &headers, multipart).await
}

/// Take one multipart chunk: fields `videoId` (delegated uploads after the
/// first chunk) and `file` (with a filename), in that order.
async fn receive(
    sandbox: &Sandbox,
    mut id: Option<String>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: &HeaderMap,
    mut multipart: Multipart,
) -> Response {
    let Some(range) = parse_range(headers) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Content-Range must be 'bytes F-L/T' or 'part K/N'.",
        );
    };
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => return problem(StatusCode::BAD_REQUEST, "The request has no 'file' part."),
            Err(_) => return problem(StatusCode::BAD_REQUEST, "The multipart body is malformed."),
        };
        match field.name() {
            Some("videoId") => {
                let Ok(text) = field.text().await else {
                    return problem(StatusCode::BAD_REQUEST, "bad videoId field");
                };
                id = Some(text);
            }
            Some("file") => {
                if field.file_name().is_none_or(str::is_empty) {
                    return problem(StatusCode::BAD_REQUEST, "The 'file' part needs a filename.");
                }
                let video = match &id {
                    Some(id) => match sandbox.apivideo.with(id, |v| v.clone()) {
                        Some(video) => video,
                        None => {
                            return problem(
                                StatusCode::NOT_FOUND,
                                "The requested resource was not found.",
                            );
                        }
                    },
                    None => {
                        let title = field.file_name().unwrap_or("upload").to_string();
                        let Some(video) = new_video(sandbox, title, true) else {
                            return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage failed");
                        };
                        if let Ok(mut videos) = sandbox.apivideo.videos.lock() {
                            videos.insert(video.video_id.clone(), video.clone());
                        }
                        video
                    }
                };
                return store_chunk(sandbox, video, range, field, reset, reset_after, headers)
                    .await;
            }
            _ => return problem(StatusCode::BAD_REQUEST, "Unexpected multipart field."),
        }
    }
}

async fn store_chunk(
    sandbox: &Sandbox,
    video: Video,
    range: Range,
    field: axum::extract::multipart::Field<'_>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: &HeaderMap,
) -> Response {
    if video.complete {
        return problem(
            StatusCode::BAD_REQUEST,
            "The source of the video is already uploaded.",
        );
    }
    // Where this chunk must start, and how long it may be.
    let (start, expected, last_chunk, total) = match range {
        Range::Bytes { first, last, total } => {
            if video.total.is_some_and(|t| t != total) || first != video.received {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Content-Range does not continue the upload.",
                );
            }
            (
                first,
                Some(last - first + 1),
                last + 1 == total,
                Some(total),
            )
        }
        Range::Part { index, count } => {
            return store_part(
                sandbox,
                video,
                index,
                count,
                field,
                reset,
                reset_after,
                headers,
            )
            .await;
        }
    };
    if let Some(len) = expected
        && len < MIN_CHUNK
        && !last_chunk
    {
        return problem(
            StatusCode::BAD_REQUEST,
            "Chunks must be at least 5 MiB except the last one.",
        );
    }
    let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .open(bin_path(sandbox, &video.video_id))
    else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage missing");
    };
    if file.seek(SeekFrom::Start(start)).is_err() {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "seek failed");
    }
    let cut_after = reset_after.map(|Extension(ResetAfter(n))| n);
    let id = video.video_id.clone();
    let max = expected.unwrap_or(u64::MAX);
    let outcome = write_body(&sandbox.faults, field, &mut file, max, cut_after, |bytes| {
        sandbox
            .apivideo
            .with(&id, |v| v.bytes_received += bytes.len() as u64);
    })
    .await;
    let Ok(received) = outcome else {
        return problem(
            StatusCode::BAD_REQUEST,
            "The file part is longer than its Content-Range.",
        );
    };
    let whole = !received.broken && expected.is_none_or(|len| received.bytes == len);
    if whole && expected.is_none() && received.bytes < MIN_CHUNK && !last_chunk {
        return problem(
            StatusCode::BAD_REQUEST,
            "Chunks must be at least 5 MiB except the last one.",
        );
    }
    let snapshot = sandbox.apivideo.with(&id, |v| {
        if whole {
            v.received = start + received.bytes;
            v.parts += 1;
            if total.is_some() {
                v.total = total;
            }
            if last_chunk {
                v.total = Some(v.received);
                v.complete = true;
            }
        }
        v.clone()
    });
    if let Some(video) = &snapshot {
        save(sandbox, video);
    }
    if received.cut
        && let Some(Extension(reset)) = reset
    {
        return reset.drop_connection().await;
    }
    if !whole {
        return problem(
            StatusCode::BAD_REQUEST,
            "The file part is shorter than its Content-Range.",
        );
    }
    stored_answer(snapshot, headers)
}

/// The answer to a stored chunk or part: the full video (201) once it is
/// complete, else its id.
fn stored_answer(snapshot: Option<Video>, headers: &HeaderMap) -> Response {
    match snapshot {
        Some(video) if video.complete => (
            StatusCode::CREATED,
            Json(video_json(&video, &host(headers))),
        )
            .into_response(),
        Some(video) => Json(json!({"videoId": video.video_id})).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "The requested resource was not found.",
        ),
    }
}

fn part_path(sandbox: &Sandbox, id: &str, index: u64) -> std::path::PathBuf {
    sandbox
        .data
        .join("apivideo")
        .join(format!("{id}.part{index}"))
}

/// One numbered part, stored on its own: parts may arrive side by side and
/// in any order. The last part (`N/N`) is taken only once parts 1..N-1 are
/// all stored; it joins them into the video's bytes.
#[allow(clippy::too_many_arguments)]
async fn store_part(
    sandbox: &Sandbox,
    video: Video,
    index: u64,
    count: Option<u64>,
    field: axum::extract::multipart::Field<'_>,
    reset: Option<Extension<ConnectionReset>>,
    reset_after: Option<Extension<ResetAfter>>,
    headers: &HeaderMap,
) -> Response {
    let last = count == Some(index);
    if last {
        let missing: Vec<String> = (1..index)
            .filter(|k| !video.part_sizes.contains_key(k))
            .map(|k| k.to_string())
            .collect();
        if !missing.is_empty() {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!(
                    "The last part arrived before parts {} were stored.",
                    missing.join(", ")
                ),
            );
        }
    }
    let id = video.video_id.clone();
    // One staging file per request: a part sent again while the server
    // still reads the first copy (from a client that died) must not write
    // into, or delete, the other's file.
    let staging = part_path(sandbox, &id, index)
        .with_extension(format!("part{index}.{:016x}.tmp", rand::random::<u64>()));
    let Ok(mut file) = std::fs::File::create(&staging) else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage missing");
    };
    let cut_after = reset_after.map(|Extension(ResetAfter(n))| n);
    let outcome = write_body(
        &sandbox.faults,
        field,
        &mut file,
        u64::MAX,
        cut_after,
        |bytes| {
            sandbox
                .apivideo
                .with(&id, |v| v.bytes_received += bytes.len() as u64);
        },
    )
    .await;
    let received = match outcome {
        Ok(received) => received,
        Err(_) => return problem(StatusCode::BAD_REQUEST, "The file part is too long."),
    };
    let whole = !received.broken;
    if whole && received.bytes < MIN_CHUNK && !last {
        let _ = std::fs::remove_file(&staging);
        return problem(
            StatusCode::BAD_REQUEST,
            "Chunks must be at least 5 MiB except the last one.",
        );
    }
    let stored = whole && std::fs::rename(&staging, part_path(sandbox, &id, index)).is_ok();
    let snapshot = sandbox.apivideo.with(&id, |v| {
        if stored {
            v.part_sizes.insert(index, received.bytes);
            v.parts = v.part_sizes.len() as u64;
            v.received = (1..).map_while(|k| v.part_sizes.get(&k)).sum();
        }
        v.clone()
    });
    if stored && last && snapshot.is_some() {
        // Join parts 1..=N into the video's bytes.
        let joined = (|| -> std::io::Result<u64> {
            let mut out = std::fs::File::create(bin_path(sandbox, &id))?;
            let mut total = 0;
            for k in 1..=index {
                let path = part_path(sandbox, &id, k);
                total += std::io::copy(&mut std::fs::File::open(&path)?, &mut out)?;
                std::fs::remove_file(path)?;
            }
            Ok(total)
        })();
        let Ok(total) = joined else {
            return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage failed");
        };
        let _ = sandbox.apivideo.with(&id, |v| {
            v.total = Some(total);
            v.received = total;
            v.complete = true;
        });
    }
    let snapshot = sandbox.apivideo.with(&id, |v| v.clone()).or(snapshot);
    if let Some(video) = &snapshot {
        save(sandbox, video);
    }
    if !stored {
        let _ = std::fs::remove_file(&staging);
    }
    if received.cut
        && let Some(Extension(reset)) = reset
    {
        return reset.drop_connection().await;
    }
    if !whole {
        return problem(
            StatusCode::BAD_REQUEST,
            "The file part is shorter than its Content-Range.",
        );
    }
    if !stored {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage failed");
    }
    stored_answer(snapshot, headers)
}
