//! `type: okru`: OK.ru (Odnoklassniki) video upload (PROTOCOLS §1).
//! Signed `fb.do` calls (`video.getUploadUrl`, `video.update`), the renewable
//! `Content-Range` upload with a status GET to resume, and OK.ru's HTTP-200
//! error bodies classified. A job is done only after `video.update`.

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use reqwest::{StatusCode, Url};
use serde_json::Value;

use super::http::{self, excerpt, status_error, transport_error};
use super::{
    Chunk, Delivery, ErrorKind, ProviderError, RemoteOffset, Session, UploadRequest, Uploader,
};

/// The documented API root.
pub const DEFAULT_BASE: &str = "https://api.ok.ru";

/// Credentials and target of an OK.ru account.
pub struct OkruProvider {
    api: Url,
    application_key: String,
    application_secret_key: String,
    access_token: String,
    group_id: Option<String>,
    client: reqwest::Client,
}

/// The request signature: md5 over the sorted `key=value` pairs (all but
/// `access_token`, `session_key` and `sig`) followed by
/// md5(access_token + application_secret_key), lowercase hex throughout.
pub fn signature(
    params: &BTreeMap<String, String>,
    access_token: &str,
    secret_key: &str,
) -> String {
    let secret = hex::encode(Md5::digest(
        format!("{access_token}{secret_key}").as_bytes(),
    ));
    let mut text = String::new();
    for (key, value) in params {
        if matches!(key.as_str(), "access_token" | "session_key" | "sig") {
            continue;
        }
        text.push_str(key);
        text.push('=');
        text.push_str(value);
    }
    text.push_str(&secret);
    hex::encode(Md5::digest(text.as_bytes()))
}

impl OkruProvider {
    /// A client for one account (and optionally one group).
    ///
    /// # Errors
    /// A permanent error for an unusable base URL.
    pub fn new(
        base_url: Option<&str>,
        application_key: &str,
        application_secret_key: &str,
        access_token: &str,
        group_id: Option<&str>,
        timeout: std::time::Duration,
    ) -> Result<Self, ProviderError> {
        let base = base_url.unwrap_or(DEFAULT_BASE).trim_end_matches('/');
        let api = Url::parse(&format!("{base}/fb.do")).map_err(|e| {
            ProviderError::new(
                ErrorKind::Permanent,
                format!("OK.ru base_url {base:?}: {e}"),
            )
        })?;
        Ok(OkruProvider {
            api,
            application_key: application_key.to_string(),
            application_secret_key: application_secret_key.to_string(),
            access_token: access_token.to_string(),
            group_id: group_id.map(str::to_string),
            client: http::client(timeout)?,
        })
    }

    fn secrets(&self) -> [&str; 2] {
        [&self.access_token, &self.application_secret_key]
    }

    /// One signed `fb.do` call; OK.ru's HTTP-200 errors become typed errors.
    async fn call(&self, method: &str, params: &[(&str, String)]) -> Result<Value, ProviderError> {
        let mut signed: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        signed.insert("method".into(), method.into());
        signed.insert("application_key".into(), self.application_key.clone());
        signed.insert("format".into(), "json".into());
        let sig = signature(&signed, &self.access_token, &self.application_secret_key);
        signed.insert("sig".into(), sig);
        signed.insert("access_token".into(), self.access_token.clone());
        let what = format!("OK.ru {method}");
        let response = self
            .client
            .post(self.api.clone())
            .form(&signed)
            .send()
            .await
            .map_err(|e| transport_error(&what, &e))?;
        if response.status() != StatusCode::OK {
            return Err(status_error(&what, response, &self.secrets()).await);
        }
        let body = response
            .text()
            .await
            .map_err(|e| transport_error(&what, &e))?;
        let value: Value = serde_json::from_str(&body).map_err(|_| {
            let mut error = ProviderError::new(
                ErrorKind::Transient,
                format!("{what}: the answer is not JSON"),
            );
            error.excerpt = excerpt(&body, &self.secrets());
            error
        })?;
        if let Some(code) = value.get("error_code").and_then(Value::as_i64) {
            let message = value
                .get("error_msg")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            let kind = match code {
                1 | 2 => ErrorKind::Transient,
                _ => ErrorKind::Permanent,
            };
            let advice = match code {
                102..=104 => {
                    "; the access token is expired or invalid: issue a new one and update access_token"
                }
                _ => "",
            };
            let mut error = ProviderError::new(
                kind,
                format!("{what}: OK.ru error {code} ({message}){advice}"),
            );
            error.status = Some(200);
            error.excerpt = excerpt(&body, &self.secrets());
            return Err(error);
        }
        Ok(value)
    }

    fn upload_url(session: &Session) -> Result<Url, ProviderError> {
        session
            .upload_url
            .as_deref()
            .and_then(|u| Url::parse(u).ok())
            .ok_or_else(|| ProviderError::new(ErrorKind::Gone, "the job has no OK.ru upload URL"))
    }
}

/// The last byte received, from any of the status shapes OK.ru may use
/// (PROTOCOLS §1 calls the exact shape unclear): a `Range` header
/// `bytes=0-LAST[/TOTAL]`, JSON `last_byte` (or a received count under
/// `uploaded`/`bytes_uploaded`), or a text body `0-LAST/TOTAL`. Answers the
/// number of bytes received.
pub fn received_bytes(range_header: Option<&str>, body: &str) -> Option<u64> {
    let from_range = |text: &str| -> Option<u64> {
        let text = text
            .trim()
            .trim_start_matches("bytes=")
            .trim_start_matches("bytes ");
        let (_, rest) = text.split_once('-')?;
        let last = rest.split('/').next()?.trim();
        last.parse::<i64>()
            .ok()
            .map(|last| (last + 1).max(0) as u64)
    };
    if let Some(bytes) = range_header.and_then(from_range) {
        return Some(bytes);
    }
    if let Ok(json) = serde_json::from_str::<Value>(body) {
        if let Some(last) = json.get("last_byte").and_then(Value::as_i64) {
            return Some((last + 1).max(0) as u64);
        }
        for key in ["uploaded", "bytes_uploaded"] {
            if let Some(count) = json.get(key).and_then(Value::as_u64) {
                return Some(count);
            }
        }
        return None;
    }
    from_range(body)
}

fn text(metadata: &BTreeMap<String, Value>, key: &str) -> Option<String> {
    match metadata.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
        ),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl Uploader for OkruProvider {
    fn describe_created(&self, request: &UploadRequest<'_>) -> String {
        format!(
            "an OK.ru video with file_name {:?} and file_size {}",
            request.file_name, request.size
        )
    }

    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        let mut params = vec![
            ("file_name", request.file_name.to_string()),
            ("file_size", request.size.to_string()),
            ("post_form", "true".to_string()),
        ];
        if let Some(gid) = &self.group_id {
            params.push(("gid", gid.clone()));
        }
        let answer = self.call("video.getUploadUrl", &params).await?;
        let upload_url = answer.get("upload_url").and_then(Value::as_str);
        let video_id = answer.get("video_id").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        match (upload_url, video_id) {
            (Some(url), Some(id)) => Ok(Session {
                remote_id: Some(id),
                upload_url: Some(url.to_string()),
                ..Default::default()
            }),
            _ => Err(ProviderError::new(
                ErrorKind::Transient,
                "OK.ru video.getUploadUrl: the answer lacks upload_url or video_id",
            )),
        }
    }

    async fn offset(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        _acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        let url = Self::upload_url(session)?;
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| transport_error("OK.ru upload status", &e))?;
        match response.status().as_u16() {
            200 | 201 | 206 => {
                let range = response
                    .headers()
                    .get("range")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = response
                    .text()
                    .await
                    .map_err(|e| transport_error("OK.ru upload status", &e))?;
                received_bytes(range.as_deref(), &body)
                    .map(RemoteOffset::At)
                    .ok_or_else(|| {
                        let mut error = ProviderError::new(
                            ErrorKind::Transient,
                            "OK.ru upload status: no received byte count in the answer",
                        );
                        error.excerpt = excerpt(&body, &self.secrets());
                        error
                    })
            }
            // The URL is no longer valid: a new upload URL (and video) is needed.
            403 | 404 | 410 => Ok(RemoteOffset::Gone),
            _ => Err(status_error("OK.ru upload status", response, &self.secrets()).await),
        }
    }

    async fn send(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        let url = Self::upload_url(session)?;
        let end = chunk.end();
        let range = format!("bytes {}-{}/{}", chunk.start, end - 1, chunk.total);
        let response = self
            .client
            .post(url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", range)
            .header("Content-Length", chunk.len)
            .body(reqwest::Body::wrap_stream(chunk.into_stream()))
            .send()
            .await
            .map_err(|e| transport_error("OK.ru upload", &e))?;
        match response.status().as_u16() {
            200 | 201 => Ok(end),
            416 => {
                let mut error = status_error("OK.ru upload", response, &self.secrets()).await;
                error.kind = ErrorKind::OffsetMismatch;
                Err(error)
            }
            403 => Err(ProviderError::new(
                ErrorKind::Gone,
                "OK.ru upload: the upload URL was refused (403); a new one is needed",
            )),
            _ => Err(status_error("OK.ru upload", response, &self.secrets()).await),
        }
    }

    async fn finalize(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        _sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        let video_id = session.remote_id_or_gone("OK.ru")?;
        let metadata = request.metadata;
        let title = text(metadata, "title").unwrap_or_else(|| request.file_name.to_string());
        let public = metadata
            .get("public")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let privacy = text(metadata, "privacy").unwrap_or_else(|| {
            if public {
                "PUBLIC".into()
            } else {
                "FRIENDS".into()
            }
        });
        let mut params = vec![
            ("vid", video_id.clone()),
            ("title", title),
            ("privacy", privacy),
        ];
        if let Some(description) = text(metadata, "description") {
            params.push(("description", description));
        }
        if let Some(tags) = text(metadata, "tags") {
            params.push(("tags", tags));
        }
        self.call("video.update", &params).await?;
        Ok(Delivery {
            url: Some(format!("https://ok.ru/video/{video_id}")),
            remote_id: video_id,
            links: Default::default(),
        })
    }

    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        // OK.ru's documented flow has no delete: the engine names the orphan.
        tracing::warn!(video = ?session.remote_id, "OK.ru has no documented delete; the abandoned video stays on the account");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_follows_the_documented_recipe() {
        let params: BTreeMap<String, String> = [
            ("method", "video.getUploadUrl"),
            ("application_key", "CBAFJIICABABABABA"),
            ("format", "json"),
            ("file_name", "клип.mp4"),
            ("access_token", "ignored-here"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let secret = hex::encode(Md5::digest(b"tokensecret"));
        let expected = hex::encode(Md5::digest(
            format!("application_key=CBAFJIICABABABABAfile_name=клип.mp4format=jsonmethod=video.getUploadUrl{secret}").as_bytes(),
        ));
        assert_eq!(signature(&params, "token", "secret"), expected);
    }

    #[test]
    fn status_shapes() {
        assert_eq!(received_bytes(Some("bytes=0-99"), ""), Some(100));
        assert_eq!(received_bytes(Some("0-99/200"), ""), Some(100));
        assert_eq!(
            received_bytes(None, r#"{"status":"partial","total":200,"last_byte":-1}"#),
            Some(0)
        );
        assert_eq!(received_bytes(None, r#"{"last_byte":149}"#), Some(150));
        assert_eq!(received_bytes(None, r#"{"bytes_uploaded":42}"#), Some(42));
        assert_eq!(received_bytes(None, "0-9/20"), Some(10));
        assert_eq!(received_bytes(None, "what"), None);
    }
}
