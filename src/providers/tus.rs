//! `type: tus`: any tus 1.0.0 server (PROTOCOLS §5), and the upload leg of
//! Gcore. Discovery with OPTIONS; creation (never with upload: see
//! [`TusProvider::post_create`]); HEAD for the server's offset; PATCH streamed from
//! the file; checksums (sha256 when offered, else sha1); termination.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use tokio::sync::OnceCell;

use super::http::{self, status_error, transport_error};
use super::{
    Chunk, Delivery, ErrorKind, Lane, ProviderError, RemoteOffset, Session, UploadRequest, Uploader,
};
use crate::source::{ChecksumAlgorithm, DigestAhead};

const TUS_VERSION: &str = "1.0.0";
const OFFSET_OCTETS: &str = "application/offset+octet-stream";

/// What the server said it supports.
#[derive(Debug, Clone, Default)]
struct Capabilities {
    termination: bool,
    concatenation: bool,
    checksum: Option<ChecksumAlgorithm>,
    max_size: Option<u64>,
}

/// A tus client for one endpoint.
pub struct TusProvider {
    endpoint: Url,
    headers: HeaderMap,
    secrets: Vec<String>,
    client: reqwest::Client,
    capabilities: OnceCell<Capabilities>,
    extra_metadata: Vec<(String, String)>,
    parallel: usize,
    /// Checksums of the chunks that come next, computed while the chunks
    /// before them are sent (one per upload in flight, a few at most).
    digests_ahead: std::sync::Mutex<Vec<DigestAhead>>,
}

/// Checksums kept ahead at most: one per upload or lane in flight (an
/// upload that ended may leave one behind, dropped when it is noticed).
const DIGESTS_AHEAD_MAX: usize = 64;

impl TusProvider {
    /// A client for `endpoint`, sending `headers` (values are secrets) on
    /// every request.
    ///
    /// # Errors
    /// A permanent error for an unusable endpoint or header.
    pub fn new(
        endpoint: &str,
        headers: &[(String, String)],
        timeout: std::time::Duration,
    ) -> Result<Self, ProviderError> {
        let endpoint = Url::parse(endpoint).map_err(|e| {
            ProviderError::new(
                ErrorKind::Permanent,
                format!("tus endpoint {endpoint:?} is not a URL: {e}"),
            )
        })?;
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let bad = |what: &str| {
                ProviderError::new(
                    ErrorKind::Permanent,
                    format!("tus header {name:?}: invalid {what}"),
                )
            };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("name"))?;
            let mut value = HeaderValue::from_str(value).map_err(|_| bad("value"))?;
            value.set_sensitive(true);
            map.insert(name, value);
        }
        Ok(TusProvider {
            endpoint,
            headers: map,
            secrets: headers.iter().map(|(_, v)| v.clone()).collect(),
            client: http::client(timeout)?,
            capabilities: OnceCell::new(),
            extra_metadata: Vec::new(),
            parallel: 1,
            digests_ahead: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Add `Upload-Metadata` pairs a service requires at creation (Gcore's
    /// `token`, `video_id`, `client_id`).
    pub fn with_metadata(mut self, pairs: Vec<(String, String)>) -> Self {
        self.extra_metadata = pairs;
        self
    }

    /// Send each file in up to `parallel` partial uploads side by side,
    /// joined at the end, where the server offers `concatenation`.
    pub fn with_parallel(mut self, parallel: usize) -> Self {
        self.parallel = parallel.max(1);
        self
    }

    /// Treat `secret` (a token carried in `Upload-Metadata`, such as
    /// Gcore's upload token) as a credential: it is removed, as sent and
    /// as its base64 form, from any answer quoted in an error.
    pub fn with_secret(mut self, secret: &str) -> Self {
        use base64::Engine as _;
        self.secrets.push(secret.to_string());
        self.secrets
            .push(base64::engine::general_purpose::STANDARD.encode(secret));
        self
    }

    fn secrets(&self) -> Vec<&str> {
        self.secrets.iter().map(String::as_str).collect()
    }

    fn request(&self, method: Method, url: &Url) -> reqwest::RequestBuilder {
        let builder = self
            .client
            .request(method.clone(), url.clone())
            .headers(self.headers.clone());
        if method == Method::OPTIONS {
            builder
        } else {
            builder.header("Tus-Resumable", TUS_VERSION)
        }
    }

    /// OPTIONS once; a server that refuses OPTIONS is taken to offer core + creation.
    async fn capabilities(&self) -> Result<&Capabilities, ProviderError> {
        self.capabilities
            .get_or_try_init(|| async {
                let response = self
                    .request(Method::OPTIONS, &self.endpoint)
                    .send()
                    .await
                    .map_err(|e| transport_error("tus OPTIONS", &e))?;
                let status = response.status();
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    return Err(status_error("tus OPTIONS", response, &self.secrets()).await);
                }
                if matches!(status.as_u16(), 401 | 403) {
                    let mut error = status_error("tus OPTIONS", response, &self.secrets()).await;
                    error
                        .message
                        .push_str("; check the provider's credentials (headers)");
                    return Err(error);
                }
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_ascii_lowercase()
                };
                let extensions: Vec<String> = header("tus-extension")
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect();
                let algorithms: Vec<String> = header("tus-checksum-algorithm")
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect();
                let has = |name: &str| extensions.iter().any(|e| e == name);
                let checksum = if has("checksum") {
                    if algorithms.iter().any(|a| a == "sha256") {
                        Some(ChecksumAlgorithm::Sha256)
                    } else if algorithms.iter().any(|a| a == "sha1") {
                        Some(ChecksumAlgorithm::Sha1)
                    } else {
                        None
                    }
                } else {
                    None
                };
                Ok(Capabilities {
                    termination: has("termination"),
                    concatenation: has("concatenation"),
                    checksum,
                    max_size: header("tus-max-size").parse().ok(),
                })
            })
            .await
    }

    fn upload_url(&self, session: &Session) -> Result<Url, ProviderError> {
        session
            .upload_url
            .as_deref()
            .and_then(|u| Url::parse(u).ok())
            .ok_or_else(|| ProviderError::new(ErrorKind::Gone, "the job has no tus upload URL"))
    }

    fn metadata_header(&self, request: &UploadRequest<'_>) -> String {
        let mut pairs = self.extra_metadata.clone();
        pairs.extend([
            ("filename".to_string(), request.file_name.to_string()),
            (
                "filetype".to_string(),
                mime_type(request.file_name).to_string(),
            ),
            ("hotfolder_job".to_string(), request.tag.to_string()),
        ]);
        for (key, value) in request.metadata {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            let key: String = key
                .chars()
                .filter(|c| !c.is_whitespace() && *c != ',')
                .collect();
            if !key.is_empty() && !pairs.iter().any(|(k, _)| *k == key) {
                pairs.push((key, text));
            }
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k} {}", BASE64.encode(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// POST the creation request, without a body even where the server
    /// offers creation-with-upload: the upload URL must be persisted before
    /// the first byte goes out (PROTOCOLS, common rules). A body in the
    /// creation request widens the one window no protocol closes (the
    /// request fails after the server created the upload, so its URL never
    /// reaches us) from one small request to a whole chunk's transfer, and a
    /// connection dropped in it leaves an orphan upload that cannot be found.
    async fn post_create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        if let Some(max) = self.capabilities().await?.max_size
            && request.size > max
        {
            return Err(ProviderError::new(
                ErrorKind::Permanent,
                format!(
                    "the file is {} bytes but the tus server accepts at most {max}",
                    request.size
                ),
            ));
        }
        if self.parallel > 1 && self.capabilities().await?.concatenation {
            let lanes = Lane::plan(request.size, request.chunk_size, self.parallel);
            if !lanes.is_empty() {
                return self.create_partials(request, lanes).await;
            }
        }
        let url = self
            .post(
                "tus create",
                &[
                    ("Upload-Length", request.size.to_string()),
                    ("Upload-Metadata", self.metadata_header(request)),
                ],
            )
            .await?;
        let remote_id = url
            .path_segments()
            .and_then(|mut s| s.next_back().map(str::to_string))
            .filter(|s| !s.is_empty());
        Ok(Session {
            remote_id,
            upload_url: Some(url.to_string()),
            ..Default::default()
        })
    }

    /// One partial upload per lane (`Upload-Concat: partial`), tagged with
    /// the job so an operator can find one a crash left; the file's own
    /// metadata goes on the final upload that joins them. A refusal part
    /// way deletes the partials already made.
    async fn create_partials(
        &self,
        request: &UploadRequest<'_>,
        mut lanes: Vec<Lane>,
    ) -> Result<Session, ProviderError> {
        for i in 0..lanes.len() {
            match self.create_partial(request, &lanes[i]).await {
                Ok(url) => lanes[i].upload_url = Some(url.to_string()),
                Err(e) => {
                    for made in lanes[..i].iter().filter_map(|l| l.upload_url.as_deref()) {
                        if let Ok(url) = Url::parse(made) {
                            let _ = self.terminate(&url).await;
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(Session {
            lanes,
            ..Default::default()
        })
    }

    /// `POST endpoint` with `Upload-Concat: partial` for `lane`.
    async fn create_partial(
        &self,
        request: &UploadRequest<'_>,
        lane: &Lane,
    ) -> Result<Url, ProviderError> {
        self.post(
            "tus create (partial)",
            &[
                ("Upload-Concat", "partial".to_string()),
                ("Upload-Length", (lane.end - lane.start).to_string()),
                (
                    "Upload-Metadata",
                    format!("hotfolder_job {}", BASE64.encode(request.tag)),
                ),
            ],
        )
        .await
    }

    /// POST a creation request with `headers` and no body; answers the
    /// new upload's URL.
    async fn post(&self, what: &str, headers: &[(&str, String)]) -> Result<Url, ProviderError> {
        let mut builder = self
            .request(Method::POST, &self.endpoint)
            .header("Content-Length", 0);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        if response.status() != StatusCode::CREATED {
            let mut error = status_error(what, response, &self.secrets()).await;
            // Say what the operator has to fix for the answers that mean a
            // wrong setting rather than a passing fault.
            match error.status {
                Some(413) => error.kind = ErrorKind::Permanent,
                Some(401 | 403) => error
                    .message
                    .push_str("; check the provider's credentials (headers)"),
                Some(404 | 405) => error
                    .message
                    .push_str("; check the provider's endpoint (the tus creation URL)"),
                _ => {}
            }
            return Err(error);
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorKind::Transient,
                    format!("{what}: 201 without a Location header"),
                )
            })?;
        self.endpoint.join(location).map_err(|e| {
            ProviderError::new(
                ErrorKind::Transient,
                format!("{what}: bad Location {location:?}: {e}"),
            )
        })
    }

    /// `chunk` as the body, with its checksum where the server takes one;
    /// `until` is where the upload the chunk belongs to ends (the file, or
    /// a lane's partial upload), up to which digests are computed ahead.
    async fn with_body(
        &self,
        builder: reqwest::RequestBuilder,
        chunk: Chunk,
        checksum: Option<ChecksumAlgorithm>,
        until: u64,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let mut builder = builder
            .header("Content-Type", OFFSET_OCTETS)
            .header("Content-Length", chunk.len);
        if let Some(algorithm) = checksum {
            // The checksum header goes before the body: the chunk's digest
            // was computed while the chunk before it was sent (else now),
            // and the next chunk's starts now, beside this send.
            let ahead = self.digest_ahead(&chunk, algorithm);
            if let Some(next) = chunk.digest_following(algorithm, until)
                && let Ok(mut kept) = self.digests_ahead.lock()
            {
                // Drop what ended uploads left (their files close with it).
                kept.retain(|d| !d.is_orphaned());
                if kept.len() >= DIGESTS_AHEAD_MAX {
                    kept.remove(0);
                }
                kept.push(next);
            }
            let digest = chunk.digest(algorithm, ahead).await.map_err(|e| {
                ProviderError::new(
                    ErrorKind::Transient,
                    format!("cannot read the source for the chunk checksum: {e}"),
                )
            })?;
            builder = builder.header(
                "Upload-Checksum",
                format!("{} {}", algorithm.tus_name(), BASE64.encode(digest)),
            );
        }
        Ok(builder.body(reqwest::Body::wrap_stream(chunk.into_stream())))
    }
}

impl TusProvider {
    /// The digest computed ahead for `chunk`, taken out of the kept ones.
    fn digest_ahead(&self, chunk: &Chunk, algorithm: ChecksumAlgorithm) -> Option<DigestAhead> {
        let mut kept = self.digests_ahead.lock().ok()?;
        let at = kept.iter().position(|d| d.is_for(chunk, algorithm))?;
        Some(kept.remove(at))
    }
}

fn upload_offset(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("upload-offset")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A MIME type from the file extension, for `filetype` metadata.
pub fn mime_type(file_name: &str) -> &'static str {
    let ext = file_name
        .rsplit('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "webm" => "video/webm",
        "avi" => "video/x-msvideo",
        "mxf" => "application/mxf",
        "ts" | "m2ts" => "video/mp2t",
        "mpg" | "mpeg" => "video/mpeg",
        _ => "application/octet-stream",
    }
}

impl Uploader for TusProvider {
    fn describe_created(&self, request: &UploadRequest<'_>) -> String {
        format!(
            "a tus upload with Upload-Metadata filename {:?} and hotfolder_job={}",
            request.file_name, request.tag
        )
    }

    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        self.post_create(request).await
    }

    async fn offset(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        self.head(&self.upload_url(session)?).await
    }

    async fn send(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        let total = chunk.total;
        self.patch(&self.upload_url(session)?, (0, total), chunk)
            .await
    }

    async fn lane_offset(
        &self,
        _session: &Session,
        lane: &Lane,
    ) -> Result<RemoteOffset, ProviderError> {
        Ok(match self.head(&lane_url(lane)?).await? {
            RemoteOffset::At(offset) => RemoteOffset::At(lane.start + offset),
            other => other,
        })
    }

    fn reopens_lanes(&self) -> bool {
        true
    }

    /// A new partial upload for the lane, which starts over.
    async fn reopen_lane(
        &self,
        request: &UploadRequest<'_>,
        lane: &mut Lane,
    ) -> Result<(), ProviderError> {
        let url = self.create_partial(request, lane).await?;
        lane.upload_url = Some(url.to_string());
        lane.acked = lane.start;
        Ok(())
    }

    async fn send_lane(
        &self,
        _session: &Session,
        _request: &UploadRequest<'_>,
        lane: &Lane,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        self.patch(&lane_url(lane)?, (lane.start, lane.end), chunk)
            .await
    }

    /// `POST endpoint` with `Upload-Concat: final;URL1 URL2 ...` and the
    /// file's metadata: the server joins the partial uploads into the one
    /// the session then names.
    async fn join_lanes(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
    ) -> Result<(), ProviderError> {
        let urls = session
            .lanes
            .iter()
            .map(|lane| lane_url(lane).map(|u| u.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let url = self
            .post(
                "tus create (final concatenation)",
                &[
                    ("Upload-Concat", format!("final;{}", urls.join(" "))),
                    ("Upload-Metadata", self.metadata_header(request)),
                ],
            )
            .await
            .map_err(|mut e| {
                // A partial upload expired or was deleted: send the parts again.
                if matches!(e.status, Some(404 | 410)) {
                    e.kind = ErrorKind::Gone;
                }
                e
            })?;
        session.remote_id = url
            .path_segments()
            .and_then(|mut s| s.next_back().map(str::to_string))
            .filter(|s| !s.is_empty());
        session.upload_url = Some(url.to_string());
        Ok(())
    }

    async fn finalize(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        let url = self.upload_url(session)?;
        Ok(Delivery {
            remote_id: session.remote_id.clone().unwrap_or_else(|| url.to_string()),
            url: Some(url.to_string()),
            links: Default::default(),
        })
    }

    /// Terminate the upload, and the partial uploads of parallel lanes.
    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        let mut urls: Vec<Url> = session
            .lanes
            .iter()
            .filter_map(|lane| lane_url(lane).ok())
            .collect();
        if session.upload_url.is_some() || urls.is_empty() {
            urls.push(self.upload_url(session)?);
        }
        let mut outcome = Ok(());
        for url in &urls {
            if let Err(e) = self.terminate(url).await {
                outcome = Err(e);
            }
        }
        outcome
    }
}

fn lane_url(lane: &Lane) -> Result<Url, ProviderError> {
    lane.upload_url
        .as_deref()
        .and_then(|u| Url::parse(u).ok())
        .ok_or_else(|| ProviderError::new(ErrorKind::Gone, "a parallel part has no tus upload URL"))
}

impl TusProvider {
    /// `HEAD url`: the upload's offset, or gone.
    async fn head(&self, url: &Url) -> Result<RemoteOffset, ProviderError> {
        let response = self
            .request(Method::HEAD, url)
            .send()
            .await
            .map_err(|e| transport_error("tus HEAD", &e))?;
        match response.status().as_u16() {
            200 | 204 => upload_offset(&response)
                .map(RemoteOffset::At)
                .ok_or_else(|| {
                    ProviderError::new(
                        ErrorKind::Transient,
                        "tus HEAD: answer without a valid Upload-Offset",
                    )
                }),
            403 | 404 | 410 => Ok(RemoteOffset::Gone),
            _ => Err(status_error("tus HEAD", response, &self.secrets()).await),
        }
    }

    /// `PATCH url` with `chunk`, the upload spanning `base..until` of the
    /// file; answers the acknowledged offset in the file.
    async fn patch(
        &self,
        url: &Url,
        (base, until): (u64, u64),
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        let checksum = self.capabilities().await?.checksum;
        let builder = self
            .request(Method::PATCH, url)
            .header("Upload-Offset", chunk.start - base);
        let builder = self.with_body(builder, chunk, checksum, until).await?;
        let response = builder
            .send()
            .await
            .map_err(|e| transport_error("tus PATCH", &e))?;
        let status = response.status().as_u16();
        match status {
            200 | 204 => upload_offset(&response)
                .map(|offset| base + offset)
                .ok_or_else(|| {
                    ProviderError::new(
                        ErrorKind::OffsetMismatch,
                        "tus PATCH: answer without a valid Upload-Offset",
                    )
                }),
            409 | 460 => {
                let mut error = status_error("tus PATCH", response, &self.secrets()).await;
                error.kind = ErrorKind::OffsetMismatch;
                if status == 460 {
                    error.message =
                        "tus PATCH: the server's checksum of the chunk did not match; resending"
                            .into();
                }
                Err(error)
            }
            404 | 410 => Err(ProviderError::new(
                ErrorKind::Gone,
                "tus PATCH: the upload is gone (expired or deleted)",
            )),
            423 => {
                let mut error = status_error("tus PATCH", response, &self.secrets()).await;
                error.kind = ErrorKind::Transient;
                Err(error)
            }
            _ => Err(status_error("tus PATCH", response, &self.secrets()).await),
        }
    }

    /// `DELETE url` where the server offers termination; otherwise the
    /// upload stays until the server expires it.
    async fn terminate(&self, url: &Url) -> Result<(), ProviderError> {
        if !self.capabilities().await.is_ok_and(|c| c.termination) {
            tracing::warn!(
                "the tus server does not offer termination; the abandoned upload stays until it expires"
            );
            return Ok(());
        }
        let response = self
            .request(Method::DELETE, url)
            .send()
            .await
            .map_err(|e| transport_error("tus DELETE", &e))?;
        match response.status().as_u16() {
            200 | 204 | 404 | 410 => Ok(()),
            _ => Err(status_error("tus DELETE", response, &self.secrets()).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_in_metadata_is_a_secret_in_both_forms() {
        let tus = TusProvider::new(
            "http://127.0.0.1:1/files/",
            &[],
            std::time::Duration::from_secs(1),
        )
        .unwrap()
        .with_secret("tok-123");
        let secrets = tus.secrets();
        assert!(secrets.contains(&"tok-123"));
        assert!(secrets.contains(&"dG9rLTEyMw=="), "{secrets:?}");
        let quoted =
            crate::providers::http::excerpt("500 token invalid: tok-123 (dG9rLTEyMw==)", &secrets);
        assert!(!quoted.unwrap_or_default().contains("tok-123"));
    }

    #[test]
    fn metadata_is_base64_pairs_with_job_tag() {
        let metadata = [
            ("title".to_string(), serde_json::json!("My clip")),
            ("tags".to_string(), serde_json::json!(["a", "b"])),
            ("public".to_string(), serde_json::json!(false)),
        ]
        .into_iter()
        .collect();
        let request = UploadRequest {
            tag: "42",
            file_name: "clip.mp4",
            relpath: std::path::Path::new("clip.mp4"),
            size: 10,
            metadata: &metadata,
            chunk_size: 5,
        };
        let provider = TusProvider::new(
            "http://127.0.0.1/files/",
            &[],
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let header = provider.metadata_header(&request);
        let pairs: Vec<(&str, String)> = header
            .split(',')
            .map(|pair| {
                let (k, v) = pair.split_once(' ').unwrap();
                (k, String::from_utf8(BASE64.decode(v).unwrap()).unwrap())
            })
            .collect();
        assert!(pairs.contains(&("filename", "clip.mp4".into())));
        assert!(pairs.contains(&("filetype", "video/mp4".into())));
        assert!(pairs.contains(&("hotfolder_job", "42".into())));
        assert!(pairs.contains(&("title", "My clip".into())));
        assert!(pairs.contains(&("tags", "a,b".into())));
        assert!(pairs.contains(&("public", "false".into())));
    }
}
