//! `type: apivideo`: api.video (PROTOCOLS §2). An API key is exchanged for a
//! bearer token, refreshed before it expires, and re-obtained once on a 401;
//! or a delegated upload token is used without auth. Videos are created
//! tagged with the job id (so a crash inside create is recovered by listing),
//! then filled by multipart chunks with `Content-Range: bytes` or `part K/N`.
//! After a crash the received ranges in `/status` say where to resume.

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use super::http::{self, excerpt, status_error, transport_error};
use super::token::{self, Refusal, Token, TokenCache};
use super::{
    Chunk, Delivery, ErrorKind, Lane, Lookup, ProviderError, RemoteOffset, Session, UploadRequest,
    Uploader,
};

/// Production API root.
pub const PRODUCTION: &str = "https://ws.api.video";
/// Sandbox API root.
pub const SANDBOX: &str = "https://sandbox.api.video";

/// How chunks are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMode {
    /// `Content-Range: bytes FIRST-LAST/TOTAL`.
    Bytes,
    /// `Content-Range: part K/N`.
    Parts,
}

/// How this provider authenticates.
pub enum Credentials {
    /// An API key exchanged for bearer tokens.
    ApiKey(String),
    /// A delegated upload token (no API access).
    UploadToken(String),
}

/// An api.video account.
pub struct ApiVideoProvider {
    base: Url,
    credentials: Credentials,
    mode: UploadMode,
    client: reqwest::Client,
    tokens: TokenCache,
    parallel: usize,
}

fn video_id(value: &Value) -> Option<String> {
    value
        .get("videoId")
        .and_then(Value::as_str)
        .map(str::to_string)
}

impl ApiVideoProvider {
    /// A client for one account.
    ///
    /// # Errors
    /// A permanent error for an unusable base URL.
    pub fn new(
        base: &str,
        credentials: Credentials,
        mode: UploadMode,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let base = Url::parse(&format!("{}/", base.trim_end_matches('/'))).map_err(|e| {
            ProviderError::new(
                ErrorKind::Permanent,
                format!("api.video base URL {base:?}: {e}"),
            )
        })?;
        Ok(ApiVideoProvider {
            base,
            credentials,
            mode,
            client: http::client(timeout)?,
            tokens: TokenCache::default(),
            parallel: 1,
        })
    }

    /// Send up to `parallel` parts at once (`upload_mode: parts` with an
    /// API key; the config refuses other combinations). The last part still
    /// goes alone, after every other part is acknowledged.
    pub fn with_parallel(mut self, parallel: usize) -> Self {
        self.parallel = parallel.max(1);
        self
    }

    fn url(&self, path: &str) -> Result<Url, ProviderError> {
        self.base.join(path.trim_start_matches('/')).map_err(|e| {
            ProviderError::new(ErrorKind::Permanent, format!("api.video path {path}: {e}"))
        })
    }

    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![match &self.credentials {
            Credentials::ApiKey(k) | Credentials::UploadToken(k) => k.clone(),
        }];
        secrets.extend(self.tokens.secrets());
        secrets
    }

    async fn error(&self, what: &str, response: reqwest::Response) -> ProviderError {
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let mut error = status_error(what, response, &refs).await;
        if error.status == Some(401) {
            error.kind = ErrorKind::Reauthenticate;
        }
        error
    }

    /// Exchange the key (or refresh token) for an access token.
    async fn obtain(&self, refresh: Option<&str>) -> Result<Token, ProviderError> {
        let Credentials::ApiKey(key) = &self.credentials else {
            return Err(ProviderError::new(
                ErrorKind::Permanent,
                "api.video: no API key to authenticate with",
            ));
        };
        let (path, body) = match refresh {
            Some(refresh) => ("auth/refresh", json!({"refreshToken": refresh})),
            None => ("auth/api-key", json!({"apiKey": key})),
        };
        let response = self
            .client
            .post(self.url(path)?)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport_error("api.video authentication", &e))?;
        let status = response.status();
        if !status.is_success() {
            let error = self.error("api.video authentication", response).await;
            return Err(token::login_refused(
                error,
                status,
                refresh.is_some(),
                token::LoginHints {
                    no_endpoint: "; no authentication endpoint there: check base_url (or environment)",
                    refused: "; the API key was refused: check api_key",
                },
            ));
        }
        let value: Value = response
            .json()
            .await
            .map_err(|e| transport_error("api.video authentication", &e))?;
        let access = value.get("access_token").and_then(Value::as_str);
        let refresh_token = value.get("refresh_token").and_then(Value::as_str);
        let expires_in = value
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(3600);
        match (access, refresh_token) {
            (Some(access), Some(refresh)) => Ok(Token::new(
                access.to_string(),
                Some(refresh.to_string()),
                Duration::from_secs(expires_in),
            )),
            _ => Err(ProviderError::new(
                ErrorKind::Transient,
                "api.video authentication: answer without access_token/refresh_token",
            )),
        }
    }

    /// A valid access token: obtained, or refreshed shortly before expiry.
    async fn bearer(&self) -> Result<String, ProviderError> {
        self.tokens
            .bearer(|refresh| async move { self.obtain(refresh.as_deref()).await })
            .await
    }

    /// A 401 on a request that carried `token`: forget the token and ask
    /// for one retry, or, when the token was already that re-authentication,
    /// fail for good (SPEC §3.4).
    async fn refused(&self, error: &mut ProviderError, token: Option<&str>) {
        error.kind = ErrorKind::Reauthenticate;
        if let Some(token) = token
            && self.tokens.refused(token).await == Refusal::StillRefused
        {
            error.kind = ErrorKind::Permanent;
            error.message.push_str(
                "; the access token was refused again right after a new authentication: check the API key's rights and this machine's clock",
            );
        }
    }

    async fn request(&self, method: Method, path: &str) -> Result<Call, ProviderError> {
        let builder = self.client.request(method, self.url(path)?);
        match &self.credentials {
            Credentials::ApiKey(_) => {
                let token = self.bearer().await?;
                Ok(Call {
                    builder: builder.bearer_auth(&token),
                    token: Some(token),
                })
            }
            Credentials::UploadToken(_) => Ok(Call {
                builder,
                token: None,
            }),
        }
    }

    /// Send an API call; a 401 forgets the token and asks for one retry.
    async fn api(&self, what: &str, call: Call) -> Result<reqwest::Response, ProviderError> {
        let response = call
            .builder
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        if response.status().is_success() {
            if let Some(token) = &call.token {
                self.tokens.accepted(token).await;
            }
            return Ok(response);
        }
        let mut error = self.error(what, response).await;
        if error.status == Some(401) {
            self.refused(&mut error, call.token.as_deref()).await;
        }
        Err(error)
    }

    async fn status(&self, video: &str) -> Result<Value, ProviderError> {
        let builder = self
            .request(Method::GET, &format!("videos/{video}/status"))
            .await?;
        let response = self.api("api.video status", builder).await?;
        response
            .json()
            .await
            .map_err(|e| transport_error("api.video status", &e))
    }

    fn content_range(&self, chunk: &Chunk) -> String {
        match self.mode {
            UploadMode::Bytes => {
                format!("bytes {}-{}/{}", chunk.start, chunk.end() - 1, chunk.total)
            }
            UploadMode::Parts => format!("part {}/{}", chunk.index + 1, chunk.count),
        }
    }
}

impl ApiVideoProvider {
    /// POST one chunk; answers the offset acknowledged and the answer's
    /// JSON (the video's id, and its assets after the last chunk).
    async fn post_chunk(
        &self,
        session: &Session,
        request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<(u64, Value), ProviderError> {
        let end = chunk.end();
        let range = self.content_range(&chunk);
        let len = chunk.len;
        let part = Part::stream_with_length(reqwest::Body::wrap_stream(chunk.into_stream()), len)
            .file_name(request.file_name.to_string())
            .mime_str("application/octet-stream")
            .map_err(|e| ProviderError::new(ErrorKind::Permanent, format!("api.video: {e}")))?;
        let mut form = Form::new();
        let call = match (&self.credentials, &session.remote_id) {
            (Credentials::UploadToken(token), id) => {
                if let Some(id) = id {
                    form = form.text("videoId", id.clone());
                }
                let mut url = self.url("upload")?;
                url.query_pairs_mut().append_pair("token", token);
                Call {
                    builder: self.client.post(url),
                    token: None,
                }
            }
            (Credentials::ApiKey(_), Some(id)) => {
                self.request(Method::POST, &format!("videos/{id}/source"))
                    .await?
            }
            (Credentials::ApiKey(_), None) => {
                return Err(ProviderError::new(
                    ErrorKind::Gone,
                    "the job has no api.video video id",
                ));
            }
        };
        let response = call
            .builder
            .header("Content-Range", range)
            .multipart(form.part("file", part))
            .send()
            .await
            .map_err(|e| transport_error("api.video upload", &e))?;
        if response.status().is_success() {
            if let Some(token) = &call.token {
                self.tokens.accepted(token).await;
            }
            let value: Value = response.json().await.unwrap_or(Value::Null);
            return Ok((end, value));
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        if status == StatusCode::BAD_REQUEST
            && body.to_ascii_lowercase().contains("already uploaded")
        {
            // A previous attempt completed before the crash: confirm with status.
            if let Some(id) = session.remote_id.clone()
                && finished_ingest(&self.status(&id).await?)
            {
                return Ok((request.size, Value::Null));
            }
        }
        let mut error = ProviderError::new(
            http::kind_of(status),
            format!("api.video upload: the server answered {status}"),
        );
        error.status = Some(status.as_u16());
        error.excerpt = excerpt(&body, &refs);
        if let Some(text) = &error.excerpt {
            error.message.push_str(&format!(" ({text})"));
        }
        match status.as_u16() {
            401 => self.refused(&mut error, call.token.as_deref()).await,
            // With a delegated token the first chunk creates the video: a 404
            // then is the token itself refused, which no new video can fix.
            404 if matches!(self.credentials, Credentials::UploadToken(_))
                && session.remote_id.is_none() =>
            {
                error.kind = ErrorKind::Permanent;
                error
                    .message
                    .push_str("; the upload token was refused: check upload_token");
            }
            404 => error.kind = ErrorKind::Gone,
            _ => {}
        }
        Err(error)
    }
}

/// A request and the access token it carries (none with a delegated token).
struct Call {
    builder: reqwest::RequestBuilder,
    token: Option<String>,
}

impl Call {
    fn json(self, body: &Value) -> Self {
        Call {
            builder: self.builder.json(body),
            token: self.token,
        }
    }
}

/// End of the contiguous prefix of `receivedBytes` (inclusive `from`/`to`).
pub fn contiguous_prefix(status: &Value) -> u64 {
    let mut ranges: Vec<(u64, u64)> = status
        .pointer("/ingest/receivedBytes")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|r| Some((r.get("from")?.as_u64()?, r.get("to")?.as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    ranges.sort_unstable();
    let mut end = 0;
    for (from, to) in ranges {
        if from > end {
            break;
        }
        end = end.max(to + 1);
    }
    end
}

fn finished_ingest(status: &Value) -> bool {
    matches!(
        status.pointer("/ingest/status").and_then(Value::as_str),
        Some("uploaded" | "ingesting" | "ingested")
    )
}

impl Uploader for ApiVideoProvider {
    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        if let Credentials::UploadToken(_) = self.credentials {
            // The first chunk creates the video; its answer names it.
            return Ok(Session::default());
        }
        let metadata = request.metadata;
        let title = metadata
            .get("title")
            .and_then(Value::as_str)
            .map_or_else(|| request.file_name.to_string(), str::to_string);
        // api.video makes videos public unless told otherwise; ours stay
        // private unless the rule or sidecar says `public: true`.
        let mut body = json!({
            "title": title,
            "mp4Support": true,
            "public": false,
            "metadata": [{"key": "hotfolder_job", "value": request.tag}],
        });
        for key in ["description", "tags", "public"] {
            if let Some(value) = metadata.get(key) {
                body[key] = match (key, value) {
                    ("tags", Value::String(s)) => {
                        json!(s.split(',').map(str::trim).collect::<Vec<_>>())
                    }
                    _ => value.clone(),
                };
            }
        }
        let call = self.request(Method::POST, "videos").await?.json(&body);
        let response = self.api("api.video create", call).await?;
        let value: Value = response
            .json()
            .await
            .map_err(|e| transport_error("api.video create", &e))?;
        let id = video_id(&value).ok_or_else(|| {
            ProviderError::new(
                ErrorKind::Transient,
                "api.video create: answer without videoId",
            )
        })?;
        let mut session = Session::for_remote(id);
        if self.parallel > 1 && self.mode == UploadMode::Parts {
            // Every part but the last goes in lanes; the last follows them.
            let last_start =
                (request.size.max(1) - 1) / request.chunk_size.max(1) * request.chunk_size.max(1);
            session.lanes = Lane::plan(last_start, request.chunk_size, self.parallel);
        }
        Ok(session)
    }

    async fn find_created(&self, request: &UploadRequest<'_>) -> Result<Lookup, ProviderError> {
        if let Credentials::UploadToken(_) = self.credentials {
            return Ok(Lookup::Unsupported);
        }
        let path = format!("videos?metadata[hotfolder_job]={}", request.tag);
        let builder = self.request(Method::GET, &path).await?;
        let response = self.api("api.video list", builder).await?;
        let value: Value = response
            .json()
            .await
            .map_err(|e| transport_error("api.video list", &e))?;
        let found = value
            .get("data")
            .and_then(Value::as_array)
            .and_then(|items| items.iter().find_map(video_id));
        Ok(match found {
            Some(id) => Lookup::Found(Session::for_remote(id)),
            None => Lookup::NotFound,
        })
    }

    /// The status's contiguous prefix, rounded down to a chunk boundary:
    /// what the server confirms. Below the persisted acknowledgement (a
    /// status that lags) the chunks from there are sent again; above it (a
    /// crash between the server storing a chunk and the acknowledgement
    /// being persisted) the upload goes on after it, as a server that wants
    /// each range to continue the upload requires.
    async fn offset(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        _acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        let (Credentials::ApiKey(_), Some(id)) = (&self.credentials, session.remote_id.clone())
        else {
            // Delegated tokens cannot read status: trust what was acknowledged.
            return Ok(RemoteOffset::Unknown);
        };
        let status = match self.status(&id).await {
            Ok(status) => status,
            Err(e) if e.status == Some(404) => return Ok(RemoteOffset::Gone),
            Err(e) => return Err(e),
        };
        if finished_ingest(&status) {
            return Ok(RemoteOffset::At(request.size));
        }
        let prefix = contiguous_prefix(&status);
        let boundary =
            prefix.min(request.size) - prefix.min(request.size) % request.chunk_size.max(1);
        Ok(RemoteOffset::At(boundary))
    }

    async fn send(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        let (acked, answer) = self.post_chunk(session, request, chunk).await?;
        if session.remote_id.is_none() {
            session.remote_id = video_id(&answer);
        }
        if let Some(assets) = answer.get("assets") {
            session.extra.insert("assets".into(), assets.clone());
        }
        Ok(acked)
    }

    /// A part other than the last, beside others: `part K/N` names where
    /// it goes, so parts may arrive in any order.
    async fn send_lane(
        &self,
        session: &Session,
        request: &UploadRequest<'_>,
        _lane: &Lane,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        Ok(self.post_chunk(session, request, chunk).await?.0)
    }

    async fn finalize(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        let id = session.remote_id_or_gone("api.video")?;
        if !session.extra.contains_key("assets")
            && let Credentials::ApiKey(_) = self.credentials
        {
            let builder = self.request(Method::GET, &format!("videos/{id}")).await?;
            let value: Value = self
                .api("api.video video", builder)
                .await?
                .json()
                .await
                .map_err(|e| transport_error("api.video video", &e))?;
            if let Some(assets) = value.get("assets") {
                session.extra.insert("assets".into(), assets.clone());
            }
        }
        let assets = session.extra.get("assets").cloned().unwrap_or(Value::Null);
        let mut links = serde_json::Map::new();
        if let Value::Object(map) = &assets {
            links.extend(map.clone());
        }
        Ok(Delivery {
            url: assets
                .get("player")
                .and_then(Value::as_str)
                .map(str::to_string),
            remote_id: id,
            links,
        })
    }

    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        let (Credentials::ApiKey(_), Some(id)) = (&self.credentials, &session.remote_id) else {
            return Ok(());
        };
        let builder = self
            .request(Method::DELETE, &format!("videos/{id}"))
            .await?;
        http::gone_is_deleted(self.api("api.video delete", builder).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_of_received_ranges() {
        let status = json!({"ingest": {"status": "uploading", "receivedBytes": [
            {"from": 0, "to": 99, "total": 300}, {"from": 200, "to": 299, "total": 300}, {"from": 100, "to": 149, "total": 300}
        ]}});
        assert_eq!(contiguous_prefix(&status), 150);
        assert_eq!(
            contiguous_prefix(&json!({"ingest": {"receivedBytes": []}})),
            0
        );
        assert!(!finished_ingest(&status));
        assert!(finished_ingest(&json!({"ingest": {"status": "ingested"}})));
    }
}
