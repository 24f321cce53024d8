//! Upload backends behind one contract. A provider knows its wire protocol
//! and nothing of folders, rules or sled: the engine ([`crate::upload`])
//! hands it a request, a persisted [`Session`] and chunks of bytes, and
//! persists whatever the provider reports. One file per provider; the
//! [`Provider`] enum forwards to them (a fixed set needs no boxing).

mod apivideo;
mod folder;
mod gcore;
pub mod http;
mod movingimage;
mod okru;
mod token;
pub(crate) mod tus;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ProviderConfig, ProviderKind};
pub use crate::source::Chunk;
pub use apivideo::{ApiVideoProvider, Credentials as ApiVideoCredentials, UploadMode};
pub use folder::FolderProvider;
pub use gcore::{GcoreProvider, WaitUntil};
pub use movingimage::MovingimageProvider;
pub use okru::OkruProvider;
pub use tus::{TusProvider, mime_type};

/// What the engine tells a provider about the file being delivered.
#[derive(Debug, Clone)]
pub struct UploadRequest<'a> {
    /// The job's tag: this installation's id and the job id
    /// (`<installation>-<job>`), unique across every hotfolder sharing a
    /// provider account or destination. Remote objects carry it so a crash
    /// inside create can be recovered by looking for it.
    pub tag: &'a str,
    /// The file's name.
    pub file_name: &'a str,
    /// Path relative to the watch folder (kept by the folder provider).
    pub relpath: &'a Path,
    /// Total bytes.
    pub size: u64,
    /// Rendered metadata (title, description, tags, public, provider keys).
    pub metadata: &'a BTreeMap<String, serde_json::Value>,
    /// Bytes per request, fixed for this job.
    pub chunk_size: u64,
}

/// Everything a provider needs to resume an upload, persisted by the engine
/// before the first byte goes out. Credentials are never put here, but an
/// upload URL can work as one (movingimage's embeds a token), so its Debug
/// output redacts it.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The remote object's id, once known.
    pub remote_id: Option<String>,
    /// Where bytes go (an upload URL, or the partial file for `folder`).
    pub upload_url: Option<String>,
    /// Provider-specific state (e.g. chunk count, server chosen).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// With `parallel: N`: the ranges of the file sent side by side, each
    /// with its own acknowledged offset. Empty for a sequential upload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<Lane>,
}

/// One range of a file sent beside others (`parallel: N`), checkpointed on
/// its own so a crash resumes every lane where its server confirmed it.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lane {
    /// Offset in the file of the lane's first byte (a chunk boundary).
    pub start: u64,
    /// Offset one past its last byte.
    pub end: u64,
    /// Offset in the file up to which the server acknowledged this lane.
    pub acked: u64,
    /// The lane's own upload, where the protocol gives each part one (a
    /// tus partial upload, made by `create`); may work as a credential,
    /// like `upload_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_url: Option<String>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("acked", &self.acked)
            .field(
                "upload_url",
                &self.upload_url.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Lane {
    /// Split `0..end` into at most `parallel` lanes of whole chunks, as even
    /// as chunks allow (the first lanes take one chunk more). Fewer than two
    /// chunks make no lanes: a sequential upload does as well.
    pub fn plan(end: u64, chunk_size: u64, parallel: usize) -> Vec<Lane> {
        let chunk_size = chunk_size.max(1);
        let chunks = end.div_ceil(chunk_size);
        let lanes = chunks.min(parallel as u64);
        if lanes < 2 {
            return Vec::new();
        }
        let (each, extra) = (chunks / lanes, chunks % lanes);
        let mut start = 0;
        (0..lanes)
            .map(|i| {
                let count = each + u64::from(i < extra);
                let lane_end = (start + count * chunk_size).min(end);
                let lane = Lane {
                    start,
                    end: lane_end,
                    acked: start,
                    ..Lane::default()
                };
                start = lane_end;
                lane
            })
            .collect()
    }

    /// Every byte of the lane acknowledged.
    pub fn done(&self) -> bool {
        self.acked >= self.end
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("remote_id", &self.remote_id)
            .field(
                "upload_url",
                &self.upload_url.as_ref().map(|_| "<redacted>"),
            )
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl Session {
    /// A session that so far knows only the remote object's id.
    pub fn for_remote(id: String) -> Self {
        Session {
            remote_id: Some(id),
            ..Session::default()
        }
    }

    /// The remote id, or a `Gone` error naming the provider (a session
    /// without one cannot be resumed: a new object is needed).
    pub fn remote_id_or_gone(&self, provider: &str) -> Result<String, ProviderError> {
        self.remote_id.clone().ok_or_else(|| {
            ProviderError::new(
                ErrorKind::Gone,
                format!("the job has no {provider} video id"),
            )
        })
    }
}

/// Where the remote side stands, as the provider can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteOffset {
    /// The server confirms this many bytes.
    At(u64),
    /// The protocol has no offset query: trust the persisted acknowledgement.
    Unknown,
    /// The remote object is gone (expired, deleted): start a new one.
    Gone,
}

/// What a lookup for an object made by an interrupted create found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The object tagged with this job: resume it.
    Found(Session),
    /// No such object: nothing was created, create now.
    NotFound,
    /// This provider cannot look objects up by tag.
    Unsupported,
}

/// What a finished delivery produced; copied into the receipt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The remote id (for `folder`, the delivered path).
    pub remote_id: String,
    /// A URL for the delivered object, where there is one.
    pub url: Option<String>,
    /// Any further links or facts the provider returned.
    #[serde(default)]
    pub links: serde_json::Map<String, serde_json::Value>,
}

/// How the engine should react to a failed provider call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Try again after backoff (connection errors, timeouts, 5xx, 429).
    Transient,
    /// Do not retry: the job fails at once.
    Permanent,
    /// Credentials expired: authenticate again once, then retry.
    Reauthenticate,
    /// The upload URL or token expired: renew it and continue.
    RenewUpload,
    /// The remote object is gone: create a new one.
    Gone,
    /// The server's offset differs from ours: ask it and continue.
    OffsetMismatch,
    /// This provider type has no uploader in this build.
    Unavailable,
}

/// A failed provider call, with the facts an error report needs. Its Debug
/// is written by hand so a request body or token can never reach a log.
#[derive(Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    /// What the engine should do.
    pub kind: ErrorKind,
    /// One sentence for people, secrets removed.
    pub message: String,
    /// HTTP status, where there was one.
    pub status: Option<u16>,
    /// An excerpt of the answer body, secrets removed.
    pub excerpt: Option<String>,
    /// The server's requested wait.
    pub retry_after: Option<Duration>,
    /// The failed call never reached a server (no connection was made), so
    /// it cannot have created anything.
    pub unsent: bool,
}

impl std::fmt::Debug for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl ProviderError {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            message: message.into(),
            status: None,
            excerpt: None,
            retry_after: None,
            unsent: false,
        }
    }

    /// A local I/O failure: transient unless it can never succeed as things stand.
    pub fn io(what: &str, path: &Path, error: &std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match error.kind() {
            Io::PermissionDenied | Io::ReadOnlyFilesystem | Io::InvalidInput => {
                ErrorKind::Permanent
            }
            _ => ErrorKind::Transient,
        };
        ProviderError::new(kind, format!("{what} {}: {error}", path.display()))
    }
}

/// What a delivered video's visibility will be, for `check`: every
/// provider with such a setting keeps uploads private unless the rule or
/// the sidecar says `public: true` (a studio must never publish unreleased
/// footage by accident). `None` for providers without one.
pub fn visibility(
    config: &ProviderConfig,
    metadata: &BTreeMap<String, serde_json::Value>,
) -> Option<String> {
    let public = metadata
        .get("public")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let private = match &config.kind {
        ProviderKind::Apivideo {
            upload_token: Some(_),
            ..
        } => return Some("set by the upload token's own settings on api.video".into()),
        ProviderKind::Apivideo { .. } => "private (public: false)",
        ProviderKind::Okru { .. } => "FRIENDS (privacy; public: true makes it PUBLIC)",
        ProviderKind::Movingimage { .. } => "not published (autoPublish: false)",
        _ => return None,
    };
    Some(if public {
        "public (public: true)".into()
    } else {
        private.into()
    })
}

/// The contract every backend fulfils. Calls may be cancelled at any await
/// point (shutdown); a provider must leave its persisted session valid then.
#[allow(async_fn_in_trait)]
pub trait Uploader {
    /// Create the remote object (or local partial file) and return the
    /// session to persist before any byte is sent.
    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError>;

    /// After a crash inside `create`, look for the object tagged with this
    /// job before creating another (SPEC §4, "Nothing twice").
    async fn find_created(&self, _request: &UploadRequest<'_>) -> Result<Lookup, ProviderError> {
        Ok(Lookup::Unsupported)
    }

    /// Words that let a person find the object a create call makes for this
    /// request, where no lookup exists (SPEC §4: the possible orphan of a
    /// crash inside create is named in the log and the receipt).
    fn describe_created(&self, request: &UploadRequest<'_>) -> String {
        format!("a remote object tagged hotfolder_job={}", request.tag)
    }

    /// True when the next [`Uploader::offset`] for this session will create
    /// a remote object of its own (the second leg of a multi-step create,
    /// such as Gcore's tus upload): the engine records that intent first,
    /// as it does for `create`.
    fn creates_on_offset(&self, _session: &Session) -> bool {
        false
    }

    /// Ask where the remote side stands. `acknowledged` is the offset the
    /// engine persisted; protocols without a query answer [`RemoteOffset::Unknown`].
    async fn offset(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError>;

    /// Send one chunk; answer the offset the provider acknowledged.
    async fn send(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError>;

    /// With lanes: where the server stands on one lane, as an offset in
    /// the file; [`RemoteOffset::Unknown`] trusts the persisted
    /// acknowledgement (the part in flight at a crash is sent again).
    async fn lane_offset(
        &self,
        _session: &Session,
        _lane: &Lane,
    ) -> Result<RemoteOffset, ProviderError> {
        Ok(RemoteOffset::Unknown)
    }

    /// True when a lane gone on the server can be made again on its own
    /// ([`Uploader::reopen_lane`]) rather than the whole upload.
    fn reopens_lanes(&self) -> bool {
        false
    }

    /// With lanes: the lane's server lost it (a tus partial upload expired
    /// or deleted): make the lane a new upload of its own, from its start.
    /// Where lanes have no upload of their own the whole object is gone,
    /// which the default says.
    async fn reopen_lane(
        &self,
        _request: &UploadRequest<'_>,
        _lane: &mut Lane,
    ) -> Result<(), ProviderError> {
        Err(ProviderError::new(
            ErrorKind::Gone,
            "the remote upload was gone",
        ))
    }

    /// With lanes: send one chunk of `lane`, beside chunks of other lanes;
    /// answer the offset in the file the server acknowledged.
    async fn send_lane(
        &self,
        _session: &Session,
        _request: &UploadRequest<'_>,
        _lane: &Lane,
        _chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        Err(ProviderError::new(
            ErrorKind::Permanent,
            "this provider cannot send parts in parallel",
        ))
    }

    /// Every lane is acknowledged: join them into the one remote object
    /// (tus's final concatenation), so the session then reads as a
    /// sequential upload whose bytes all arrived. Protocols whose lanes are
    /// parts of one object already (api.video) keep the default.
    async fn join_lanes(
        &self,
        _session: &mut Session,
        _request: &UploadRequest<'_>,
    ) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Renew an expired upload URL or token inside the session. Protocols
    /// without renewal keep the default, which changes nothing.
    async fn renew(
        &self,
        _session: &mut Session,
        _request: &UploadRequest<'_>,
    ) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Every byte is acknowledged: finalise (set metadata, publish, verify)
    /// and report the delivery. `sha256` is the content's hash.
    async fn finalize(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        sha256: &str,
    ) -> Result<Delivery, ProviderError>;

    /// Give up the remote object (source changed, or replaced); deletes it
    /// where the protocol allows.
    async fn abandon(&self, session: &Session) -> Result<(), ProviderError>;

    /// The delivery is durably recorded by the engine: drop whatever the
    /// provider kept only to make a repeated `finalize` idempotent (the
    /// folder provider's marker), so nothing of ours stays behind. Called
    /// again after a crash; best effort.
    async fn release(&self, _session: &Session) {}
}

/// A configured provider, ready to upload.
pub enum Provider {
    /// Local or mounted directory.
    Folder(FolderProvider),
    /// Any tus server.
    Tus(Box<TusProvider>),
    /// OK.ru.
    Okru(Box<OkruProvider>),
    /// api.video.
    Apivideo(Box<ApiVideoProvider>),
    /// Gcore Video Streaming.
    Gcore(Box<GcoreProvider>),
    /// movingimage VideoManager Pro.
    Movingimage(Box<MovingimageProvider>),
    /// A provider that cannot upload: its type is not in this build, or its
    /// settings could not be turned into a client.
    Unavailable {
        /// Why, for the job's error report.
        reason: String,
    },
}

impl Provider {
    /// Build the provider named in config.
    pub fn from_config(config: &ProviderConfig) -> Self {
        let built = match &config.kind {
            ProviderKind::Folder { path } => {
                Ok(Provider::Folder(FolderProvider::new(path.clone())))
            }
            ProviderKind::Tus { endpoint, headers } => {
                let headers: Vec<(String, String)> = headers
                    .iter()
                    .map(|(name, value)| (name.clone(), value.expose().to_string()))
                    .collect();
                let endpoint = config.base_url.as_deref().unwrap_or(endpoint);
                TusProvider::new(endpoint, &headers, config.timeout)
                    .map(|p| Provider::Tus(Box::new(p.with_parallel(config.parallel))))
            }
            ProviderKind::Okru {
                application_key,
                application_secret_key,
                access_token,
                group_id,
            } => OkruProvider::new(
                config.base_url.as_deref(),
                application_key,
                application_secret_key.expose(),
                access_token.expose(),
                group_id.as_deref(),
                config.timeout,
            )
            .map(|p| Provider::Okru(Box::new(p))),
            ProviderKind::Apivideo {
                api_key,
                upload_token,
                environment,
                upload_mode,
            } => {
                let base = config.base_url.clone().unwrap_or_else(|| {
                    if environment == "production" {
                        apivideo::PRODUCTION
                    } else {
                        apivideo::SANDBOX
                    }
                    .to_string()
                });
                let credentials = match (api_key, upload_token) {
                    (Some(key), _) => ApiVideoCredentials::ApiKey(key.expose().to_string()),
                    (None, Some(token)) => {
                        ApiVideoCredentials::UploadToken(token.expose().to_string())
                    }
                    (None, None) => ApiVideoCredentials::ApiKey(String::new()),
                };
                let mode = if upload_mode == "parts" {
                    UploadMode::Parts
                } else {
                    UploadMode::Bytes
                };
                ApiVideoProvider::new(&base, credentials, mode, config.timeout)
                    .map(|p| Provider::Apivideo(Box::new(p.with_parallel(config.parallel))))
            }
            ProviderKind::Gcore {
                api_key,
                wait_until,
            } => {
                let wait_until = match wait_until.as_str() {
                    "ready" => WaitUntil::Ready,
                    "viewable" => WaitUntil::Viewable,
                    _ => WaitUntil::Uploaded,
                };
                GcoreProvider::new(
                    config.base_url.as_deref(),
                    api_key.expose(),
                    wait_until,
                    config.timeout,
                )
                .map(|p| Provider::Gcore(Box::new(p)))
            }
            ProviderKind::Movingimage {
                username,
                password,
                video_manager_id,
                auth_url,
            } => MovingimageProvider::new(
                config.base_url.as_deref(),
                auth_url,
                username,
                password.expose(),
                video_manager_id,
                config.timeout,
            )
            .map(|p| Provider::Movingimage(Box::new(p))),
        };
        built.unwrap_or_else(|e| Provider::Unavailable {
            reason: format!("provider {}: {}", config.name, e.message),
        })
    }

    fn unavailable(reason: &str) -> ProviderError {
        ProviderError::new(ErrorKind::Unavailable, reason.to_string())
    }
}

macro_rules! forward {
    ($self:ident, $p:ident => $call:expr) => {
        match $self {
            Provider::Folder($p) => $call.await,
            Provider::Tus($p) => $call.await,
            Provider::Okru($p) => $call.await,
            Provider::Apivideo($p) => $call.await,
            Provider::Gcore($p) => $call.await,
            Provider::Movingimage($p) => $call.await,
            Provider::Unavailable { reason } => Err(Provider::unavailable(reason)),
        }
    };
}

impl Uploader for Provider {
    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        forward!(self, p => p.create(request))
    }

    async fn find_created(&self, request: &UploadRequest<'_>) -> Result<Lookup, ProviderError> {
        forward!(self, p => p.find_created(request))
    }

    fn describe_created(&self, request: &UploadRequest<'_>) -> String {
        match self {
            Provider::Folder(p) => p.describe_created(request),
            Provider::Tus(p) => p.describe_created(request),
            Provider::Okru(p) => p.describe_created(request),
            Provider::Apivideo(p) => p.describe_created(request),
            Provider::Gcore(p) => p.describe_created(request),
            Provider::Movingimage(p) => p.describe_created(request),
            Provider::Unavailable { .. } => format!("a remote object for job {}", request.tag),
        }
    }

    fn creates_on_offset(&self, session: &Session) -> bool {
        match self {
            Provider::Gcore(p) => p.creates_on_offset(session),
            _ => false,
        }
    }

    fn reopens_lanes(&self) -> bool {
        match self {
            Provider::Tus(p) => p.reopens_lanes(),
            _ => false,
        }
    }

    async fn offset(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        forward!(self, p => p.offset(session, request, acknowledged))
    }

    async fn send(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        forward!(self, p => p.send(session, request, chunk))
    }

    async fn lane_offset(
        &self,
        session: &Session,
        lane: &Lane,
    ) -> Result<RemoteOffset, ProviderError> {
        forward!(self, p => p.lane_offset(session, lane))
    }

    async fn send_lane(
        &self,
        session: &Session,
        request: &UploadRequest<'_>,
        lane: &Lane,
        chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        forward!(self, p => p.send_lane(session, request, lane, chunk))
    }

    async fn reopen_lane(
        &self,
        request: &UploadRequest<'_>,
        lane: &mut Lane,
    ) -> Result<(), ProviderError> {
        forward!(self, p => p.reopen_lane(request, lane))
    }

    async fn join_lanes(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
    ) -> Result<(), ProviderError> {
        forward!(self, p => p.join_lanes(session, request))
    }

    async fn renew(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
    ) -> Result<(), ProviderError> {
        forward!(self, p => p.renew(session, request))
    }

    async fn finalize(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        forward!(self, p => p.finalize(session, request, sha256))
    }

    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        forward!(self, p => p.abandon(session))
    }

    async fn release(&self, session: &Session) {
        if let Provider::Folder(p) = self {
            p.release(session).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lane;

    #[test]
    fn lanes_are_whole_chunks_as_even_as_chunks_allow() {
        let spans = |lanes: Vec<Lane>| -> Vec<(u64, u64)> {
            lanes.iter().map(|l| (l.start, l.end)).collect()
        };
        // 10 chunks (the last short) in 4 lanes: 3, 3, 2 and 2 chunks.
        assert_eq!(
            spans(Lane::plan(38, 4, 4)),
            [(0, 12), (12, 24), (24, 32), (32, 38)]
        );
        // More lanes than chunks: one chunk each.
        assert_eq!(spans(Lane::plan(10, 4, 8)), [(0, 4), (4, 8), (8, 10)]);
        // One chunk, or parallel 1: no lanes (a sequential upload).
        assert!(Lane::plan(4, 4, 4).is_empty());
        assert!(Lane::plan(0, 4, 4).is_empty());
        assert!(Lane::plan(100, 4, 1).is_empty());
        let lanes = Lane::plan(100, 4, 3);
        assert!(lanes.iter().all(|l| l.acked == l.start && !l.done()));
        assert_eq!(lanes.last().map(|l| l.end), Some(100));
    }
}
