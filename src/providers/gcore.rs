//! `type: gcore`: Gcore Video Streaming (PROTOCOLS §3). The video object is
//! created over the REST API, upload parameters name a tus server and a
//! token, the bytes go over tus (the [`TusProvider`] leg, with Gcore's
//! required metadata), and `wait_until` polls the video's status before the
//! job counts as done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, Url};
use serde_json::{Value, json};

use super::http::{self, status_error, transport_error};
use super::tus::TusProvider;
use super::{
    Chunk, Delivery, ErrorKind, ProviderError, RemoteOffset, Session, UploadRequest, Uploader,
};

/// The documented API root.
pub const DEFAULT_BASE: &str = "https://api.gcore.com";

/// Longest pause between status polls, and the longest total wait.
const POLL_CAP: Duration = Duration::from_secs(60);
const WAIT_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// When a Gcore job counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitUntil {
    /// Every byte acknowledged.
    Uploaded,
    /// The video plays (status viewable or ready).
    Viewable,
    /// Every rendition is ready.
    Ready,
}

/// A Gcore account.
pub struct GcoreProvider {
    base: Url,
    api_key: String,
    wait_until: WaitUntil,
    timeout: Duration,
    client: reqwest::Client,
    legs: Mutex<HashMap<String, Arc<TusProvider>>>,
}

/// Upload parameters: where and with which token to start the tus session.
struct UploadTarget {
    endpoint: String,
    token: String,
    client_id: String,
}

fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl GcoreProvider {
    /// A client for one account.
    ///
    /// # Errors
    /// A permanent error for an unusable base URL.
    pub fn new(
        base_url: Option<&str>,
        api_key: &str,
        wait_until: WaitUntil,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let base = base_url.unwrap_or(DEFAULT_BASE).trim_end_matches('/');
        let base = Url::parse(&format!("{base}/")).map_err(|e| {
            ProviderError::new(
                ErrorKind::Permanent,
                format!("Gcore base_url {base:?}: {e}"),
            )
        })?;
        Ok(GcoreProvider {
            base,
            api_key: api_key.to_string(),
            wait_until,
            timeout,
            client: http::client(timeout)?,
            legs: Mutex::new(HashMap::new()),
        })
    }

    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ProviderError> {
        let url = self
            .base
            .join(path)
            .map_err(|e| ProviderError::new(ErrorKind::Permanent, format!("{what}: {e}")))?;
        let mut builder = self
            .client
            .request(method, url)
            .header("Authorization", format!("APIKey {}", self.api_key));
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        if !response.status().is_success() {
            let mut error = status_error(what, response, &[&self.api_key]).await;
            if matches!(error.status, Some(401 | 403)) {
                error
                    .message
                    .push_str("; the API key was refused: check api_key");
            }
            return Err(error);
        }
        let text = response
            .text()
            .await
            .map_err(|e| transport_error(what, &e))?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn upload_target(&self, video_id: &str) -> Result<UploadTarget, ProviderError> {
        let answer = self
            .call(
                "Gcore upload parameters",
                Method::GET,
                &format!("streaming/videos/{video_id}/upload"),
                None,
            )
            .await?;
        let server = answer
            .get("servers")
            .and_then(Value::as_array)
            .and_then(|servers| {
                servers
                    .iter()
                    .find(|s| s.get("active").and_then(Value::as_bool).unwrap_or(false))
            })
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Transient,
                    "Gcore upload parameters: no active upload server",
                )
            })?;
        let hostname = server
            .get("hostname")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Transient,
                    "Gcore upload parameters: server without hostname",
                )
            })?;
        let scheme = if server.get("ssl").and_then(Value::as_bool).unwrap_or(true) {
            "https"
        } else {
            "http"
        };
        let token = answer.get("token").and_then(Value::as_str).ok_or_else(|| {
            ProviderError::new(ErrorKind::Transient, "Gcore upload parameters: no token")
        })?;
        let client_id = answer
            .pointer("/video/client_id")
            .and_then(id_text)
            .unwrap_or_default();
        Ok(UploadTarget {
            endpoint: format!("{scheme}://{hostname}/upload/"),
            token: token.to_string(),
            client_id,
        })
    }

    /// The tus client for an upload server (cached; metadata only matters at creation).
    fn leg(&self, endpoint: &str) -> Result<Arc<TusProvider>, ProviderError> {
        let mut legs = self.legs.lock().map_err(|_| {
            ProviderError::new(ErrorKind::Transient, "Gcore: internal lock poisoned")
        })?;
        if let Some(leg) = legs.get(endpoint) {
            return Ok(Arc::clone(leg));
        }
        let leg = Arc::new(TusProvider::new(endpoint, &[], self.timeout)?);
        legs.insert(endpoint.to_string(), Arc::clone(&leg));
        Ok(leg)
    }

    fn session_leg(&self, session: &Session) -> Result<Arc<TusProvider>, ProviderError> {
        let endpoint = session
            .extra
            .get("endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ProviderError::new(ErrorKind::Gone, "the job has no Gcore upload server")
            })?;
        self.leg(endpoint)
    }

    /// Start the tus session with the token; token refusals (500 "token …")
    /// are not transient: fetch fresh parameters once, then give up.
    async fn start_tus(
        &self,
        request: &UploadRequest<'_>,
        video_id: &str,
    ) -> Result<(Session, String), ProviderError> {
        let mut last = None;
        for _ in 0..2 {
            let target = self.upload_target(video_id).await?;
            let leg = TusProvider::new(&target.endpoint, &[], self.timeout)?
                .with_metadata(vec![
                    ("token".into(), target.token.clone()),
                    ("video_id".into(), video_id.to_string()),
                    ("client_id".into(), target.client_id.clone()),
                ])
                .with_secret(&target.token);
            match leg.create(request).await {
                Ok(session) => return Ok((session, target.endpoint)),
                Err(e)
                    if e.status == Some(500)
                        && e.excerpt.as_deref().is_some_and(|x| x.contains("token")) =>
                {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let mut error = last.unwrap_or_else(|| {
            ProviderError::new(ErrorKind::Permanent, "Gcore refused the upload token")
        });
        error.kind = ErrorKind::Permanent;
        error.message = format!("Gcore refused the upload token twice: {}", error.message);
        Err(error)
    }

    async fn video(&self, id: &str) -> Result<Value, ProviderError> {
        self.call(
            "Gcore video",
            Method::GET,
            &format!("streaming/videos/{id}"),
            None,
        )
        .await
    }
}

/// The name a Gcore video gets: the rendered title, else the file name.
fn video_name(request: &UploadRequest<'_>) -> String {
    request
        .metadata
        .get("title")
        .and_then(Value::as_str)
        .map_or_else(|| request.file_name.to_string(), str::to_string)
}

impl Uploader for GcoreProvider {
    fn describe_created(&self, request: &UploadRequest<'_>) -> String {
        format!("a Gcore video named {:?}", video_name(request))
    }

    fn creates_on_offset(&self, session: &Session) -> bool {
        session.upload_url.is_none()
    }

    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        let mut video = json!({"name": video_name(request)});
        if let Some(description) = request.metadata.get("description").and_then(Value::as_str) {
            video["description"] = json!(description);
        }
        let answer = self
            .call(
                "Gcore create",
                Method::POST,
                "streaming/videos",
                Some(json!({"video": video})),
            )
            .await?;
        // The answer is an object or a one-element array (PROTOCOLS §3).
        let object = match &answer {
            Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
            other => other.clone(),
        };
        let id = object.get("id").and_then(id_text).ok_or_else(|| {
            ProviderError::new(ErrorKind::Transient, "Gcore create: answer without an id")
        })?;
        // The tus session starts in `offset`, once this video id is persisted,
        // so a failure there retries on the same video instead of a new one.
        Ok(Session::for_remote(id))
    }

    async fn offset(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        if session.upload_url.is_none() {
            let video = session.remote_id_or_gone("Gcore")?;
            let (tus, endpoint) = self.start_tus(request, &video).await?;
            session.upload_url = tus.upload_url;
            session.extra.insert("endpoint".into(), json!(endpoint));
            return Ok(RemoteOffset::At(0));
        }
        self.session_leg(session)?
            .offset(session, request, acknowledged)
            .await
    }

    async fn send(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        self.session_leg(session)?
            .send(session, request, chunk)
            .await
    }

    async fn finalize(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        let id = session.remote_id_or_gone("Gcore")?;
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_secs(1);
        let video = loop {
            let video = self.video(&id).await?;
            let status = video.get("status").and_then(Value::as_str).unwrap_or("");
            if status == "error" {
                let reason = video
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(ProviderError::new(
                    ErrorKind::Permanent,
                    format!("Gcore could not process video {id}: {reason}"),
                ));
            }
            let done = match self.wait_until {
                WaitUntil::Uploaded => true,
                WaitUntil::Viewable => matches!(status, "viewable" | "ready"),
                WaitUntil::Ready => status == "ready",
            };
            if done {
                break video;
            }
            if started.elapsed() > WAIT_LIMIT {
                return Err(ProviderError::new(
                    ErrorKind::Transient,
                    format!("Gcore video {id} is still {status} after a day"),
                ));
            }
            tracing::debug!(video = %id, status, "waiting for Gcore to process the video");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_CAP);
        };
        let mut links = serde_json::Map::new();
        for key in ["status", "hls_url", "iframe_url", "screenshot", "slug"] {
            if let Some(value) = video.get(key) {
                links.insert(key.into(), value.clone());
            }
        }
        Ok(Delivery {
            url: video
                .get("iframe_url")
                .or_else(|| video.get("hls_url"))
                .and_then(Value::as_str)
                .map(str::to_string),
            remote_id: id,
            links,
        })
    }

    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        if let Ok(leg) = self.session_leg(session) {
            let _ = leg.abandon(session).await;
        }
        let Some(id) = &session.remote_id else {
            return Ok(());
        };
        http::gone_is_deleted(
            self.call(
                "Gcore delete",
                Method::DELETE,
                &format!("streaming/videos/{id}"),
                None,
            )
            .await,
        )
    }
}
