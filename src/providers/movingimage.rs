//! `type: movingimage`: movingimage VideoManager Pro (PROTOCOLS §4). OpenID
//! Connect password grant with refresh (access tokens live five minutes, so
//! long uploads refresh several times), the video created via the
//! `Location` header, an upload URL (itself a 4-hour token) renewed when a
//! chunk is refused with 401/403, numbered chunks, and requests paced under
//! the 100-per-minute account limit. There is no offset query: a restart
//! resumes from the last acknowledged chunk.

use std::collections::VecDeque;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::http::{self, excerpt, status_error, transport_error};
use super::token::{self, Refusal, Token, TokenCache};
use super::{
    Chunk, Delivery, ErrorKind, ProviderError, RemoteOffset, Session, UploadRequest, Uploader,
};

/// The documented API root.
pub const DEFAULT_BASE: &str = "https://api.video-cdn.net/v1/vms";

/// The account's request budget.
const REQUESTS_PER_MINUTE: usize = 100;

/// Keeps requests under the per-minute limit (a sliding window).
#[derive(Default)]
struct Pacer {
    sent: Mutex<VecDeque<Instant>>,
}

impl Pacer {
    async fn wait_turn(&self) {
        let mut sent = self.sent.lock().await;
        let window = Duration::from_secs(60);
        while sent.front().is_some_and(|t| t.elapsed() >= window) {
            sent.pop_front();
        }
        if sent.len() >= REQUESTS_PER_MINUTE
            && let Some(oldest) = sent.front().copied()
        {
            tokio::time::sleep_until(oldest + window).await;
            sent.pop_front();
        }
        sent.push_back(Instant::now());
    }
}

/// A VideoManager Pro account.
pub struct MovingimageProvider {
    base: String,
    auth_url: Url,
    username: String,
    password: String,
    video_manager: String,
    client: reqwest::Client,
    tokens: TokenCache,
    pacer: Pacer,
}

/// The last path segment of a `Location` header.
fn location_id(response: &reqwest::Response) -> Option<String> {
    let location = response.headers().get("location")?.to_str().ok()?;
    location
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// movingimage's application error code in an answer body, if any.
fn application_code(body: &str) -> Option<i64> {
    let value: Value = serde_json::from_str(body).ok()?;
    ["code", "errorCode", "error_code"].iter().find_map(|k| {
        value
            .get(*k)
            .and_then(|c| c.as_i64().or_else(|| c.as_str()?.parse().ok()))
    })
}

impl MovingimageProvider {
    /// A client for one account.
    ///
    /// # Errors
    /// A permanent error for an unusable URL.
    pub fn new(
        base_url: Option<&str>,
        auth_url: &str,
        username: &str,
        password: &str,
        video_manager: &str,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let auth_url = Url::parse(auth_url).map_err(|e| {
            ProviderError::new(
                ErrorKind::Permanent,
                format!("movingimage auth_url {auth_url:?}: {e}"),
            )
        })?;
        Ok(MovingimageProvider {
            base: base_url
                .unwrap_or(DEFAULT_BASE)
                .trim_end_matches('/')
                .to_string(),
            auth_url,
            username: username.to_string(),
            password: password.to_string(),
            video_manager: video_manager.to_string(),
            client: http::client(timeout)?,
            tokens: TokenCache::default(),
            pacer: Pacer::default(),
        })
    }

    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![self.password.clone()];
        secrets.extend(self.tokens.secrets());
        secrets
    }

    async fn error(&self, what: &str, response: reqwest::Response) -> ProviderError {
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        status_error(what, response, &refs).await
    }

    async fn obtain(&self, refresh: Option<String>) -> Result<Token, ProviderError> {
        let mut form = vec![("client_id", "anonymous".to_string())];
        match &refresh {
            Some(refresh) => {
                form.push(("grant_type", "refresh_token".into()));
                form.push(("refresh_token", refresh.clone()));
            }
            None => {
                form.push(("grant_type", "password".into()));
                form.push(("response_type", "token".into()));
                form.push(("scope", "openid".into()));
                form.push(("username", self.username.clone()));
                form.push(("password", self.password.clone()));
            }
        }
        self.pacer.wait_turn().await;
        let response = self
            .client
            .post(self.auth_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| transport_error("movingimage login", &e))?;
        let status = response.status();
        if !status.is_success() {
            let error = self.error("movingimage login", response).await;
            return Err(token::login_refused(
                error,
                status,
                refresh.is_some(),
                token::LoginHints {
                    no_endpoint: "; no token endpoint there: check auth_url",
                    refused: "; the user name or password was refused: check username and password",
                },
            ));
        }
        let value: Value = response
            .json()
            .await
            .map_err(|e| transport_error("movingimage login", &e))?;
        let access = value
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Transient,
                    "movingimage login: answer without access_token",
                )
            })?;
        Ok(Token::new(
            access.to_string(),
            value
                .get("refresh_token")
                .and_then(Value::as_str)
                .map(str::to_string),
            Duration::from_secs(
                value
                    .get("expires_in")
                    .and_then(Value::as_u64)
                    .unwrap_or(300),
            ),
        ))
    }

    /// An authenticated, paced API call; a 401 forgets the token and asks the
    /// engine to try again (the next call logs in anew).
    async fn api(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<reqwest::Response, ProviderError> {
        let bearer = self
            .tokens
            .bearer(|refresh| async move { self.obtain(refresh).await })
            .await?;
        self.pacer.wait_turn().await;
        let url = format!(
            "{}/{}/{}",
            self.base,
            self.video_manager,
            path.trim_start_matches('/')
        );
        let mut builder = self.client.request(method, url).bearer_auth(&bearer);
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        if response.status().is_success() {
            self.tokens.accepted(&bearer).await;
            return Ok(response);
        }
        let mut error = self.error(what, response).await;
        if error.status == Some(401) {
            error.kind = ErrorKind::Reauthenticate;
            if self.tokens.refused(&bearer).await == Refusal::StillRefused {
                error.kind = ErrorKind::Permanent;
                error.message.push_str(
                    "; the access token was refused again right after a new login: check the user's rights and this machine's clock",
                );
            }
        }
        if error.excerpt.as_deref().and_then(application_code) == Some(1101) {
            error.kind = ErrorKind::Permanent;
            error.message = format!("{what}: the movingimage storage quota is reached (code 1101)");
        }
        Err(error)
    }

    async fn fetch_upload_url(&self, video: &str) -> Result<String, ProviderError> {
        let response = self
            .api(
                "movingimage upload URL",
                Method::GET,
                &format!("videos/{video}/url"),
                None,
            )
            .await?;
        response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Transient,
                    "movingimage upload URL: answer without Location",
                )
            })
    }
}

impl Uploader for MovingimageProvider {
    fn describe_created(&self, request: &UploadRequest<'_>) -> String {
        format!("a movingimage video with fileName {:?}", request.file_name)
    }

    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        let metadata = request.metadata;
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let keywords: Vec<String> = match metadata.get("tags") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => s.split(',').map(|t| t.trim().to_string()).collect(),
            _ => Vec::new(),
        };
        let body = json!({
            "fileName": request.file_name,
            "title": text("title").unwrap_or_else(|| request.file_name.to_string()),
            "description": text("description").unwrap_or_default(),
            "keywords": keywords,
            "autoPublish": metadata.get("public").and_then(Value::as_bool).unwrap_or(false),
        });
        let response = self
            .api("movingimage create", Method::POST, "videos", Some(body))
            .await?;
        let id = location_id(&response).ok_or_else(|| {
            ProviderError::new(
                ErrorKind::Transient,
                "movingimage create: answer without Location",
            )
        })?;
        // The upload URL is fetched in `offset`, after this id is persisted.
        Ok(Session::for_remote(id))
    }

    async fn offset(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        if session.upload_url.is_none() {
            self.renew(session, _request).await?;
        }
        // No offset query in this protocol: resume from the last acknowledged chunk.
        Ok(RemoteOffset::Unknown)
    }

    async fn send(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        let url = session.upload_url.clone().ok_or_else(|| {
            ProviderError::new(
                ErrorKind::RenewUpload,
                "the job has no movingimage upload URL",
            )
        })?;
        let end = chunk.end();
        let (number, count) = (chunk.index + 1, chunk.count);
        self.pacer.wait_turn().await;
        let response = self
            .client
            .post(url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", chunk.len)
            .header("Mi24-Upload-Total-Chunks", count)
            .header("Mi24-Upload-Current-Chunk", number)
            .body(reqwest::Body::wrap_stream(chunk.into_stream()))
            .send()
            .await
            .map_err(|e| transport_error("movingimage upload", &e))?;
        let status = response.status().as_u16();
        if matches!(status, 200..=202) {
            return Ok(end);
        }
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let body = response.text().await.unwrap_or_default();
        if number == count
            && (400..500).contains(&status)
            && body.to_ascii_lowercase().contains("upload is complete")
        {
            // The last chunk was stored before its answer was lost (a crash,
            // a dropped connection): the server says the upload is whole.
            tracing::info!(
                status,
                "movingimage: the last chunk was already stored; the upload is complete"
            );
            return Ok(end);
        }
        let mut error = ProviderError::new(
            http::kind_of(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)),
            format!("movingimage upload of chunk {number}/{count}: the server answered {status}"),
        );
        error.status = Some(status);
        error.excerpt = excerpt(&body, &refs);
        if application_code(&body) == Some(1101) {
            error.kind = ErrorKind::Permanent;
            error.message = "movingimage upload: the storage quota is reached (code 1101)".into();
        } else if matches!(status, 401 | 403) {
            // The upload URL's own token expired: fetch a new URL, continue.
            error.kind = ErrorKind::RenewUpload;
        }
        Err(error)
    }

    async fn renew(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
    ) -> Result<(), ProviderError> {
        let video = session.remote_id_or_gone("movingimage")?;
        session.upload_url = Some(self.fetch_upload_url(&video).await?);
        Ok(())
    }

    async fn finalize(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        let id = session.remote_id_or_gone("movingimage")?;
        Ok(Delivery {
            url: Some(format!("{}/{}/videos/{id}", self.base, self.video_manager)),
            remote_id: id,
            links: Default::default(),
        })
    }

    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        let Some(id) = &session.remote_id else {
            return Ok(());
        };
        http::gone_is_deleted(
            self.api(
                "movingimage delete",
                Method::DELETE,
                &format!("videos/{id}"),
                None,
            )
            .await,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_codes() {
        assert_eq!(
            application_code(r#"{"code": 1101, "message": "quota"}"#),
            Some(1101)
        );
        assert_eq!(application_code(r#"{"errorCode": "1101"}"#), Some(1101));
        assert_eq!(application_code("plain text"), None);
    }
}
