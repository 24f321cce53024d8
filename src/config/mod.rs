//! The configuration: YAML read into typed, validated settings that every
//! other part reads and none writes. Loading is in three steps, as Vector
//! does it: parse (serde, positions kept for errors), resolve (defaults merged
//! into each watch, `*_file` secrets read, paths made absolute), and check
//! (pure rules first, then the few that touch the filesystem).

mod load;
mod positions;
pub mod values;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use load::{ConfigError, load, load_str};
pub use values::{ByteSize, Dur, Secret, parse_scalar};

/// The whole resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The file it was read from (relative paths inside it are relative to its folder).
    pub file: PathBuf,
    /// sled database, control socket and working files.
    pub state_dir: PathBuf,
    /// Uploads at once, all providers together.
    pub workers: usize,
    /// How long SIGTERM/SIGINT waits for in-flight work to checkpoint.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_timeout: Duration,
    /// Log level and format.
    pub log: LogConfig,
    /// Status API; `None` disables it.
    pub http: Option<HttpConfig>,
    /// Where jobs are kept: sled in `state_dir` (one box) or PostgreSQL (a fleet).
    pub store: StoreConfig,
    /// The watched folders, with defaults merged in.
    pub watches: Vec<WatchConfig>,
    /// Upload targets by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Routing rules, first match wins.
    pub rules: Vec<Rule>,
    /// What to do with a file no rule matches.
    pub unmatched: Unmatched,
    /// The limit on all uploads together (a rate or a weekly timetable).
    pub bandwidth: Option<crate::bandwidth::Schedule>,
    /// Webhooks told about every job's events.
    pub notify: Vec<NotifyConfig>,
    /// `defaults.retry`: the shared backoff (providers may override it;
    /// webhook deliveries use it).
    pub retry: RetryConfig,
}

/// A webhook: where to tell which events, signed with `secret`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifyConfig {
    /// Where events are POSTed. A secret: a chat's incoming-webhook URL
    /// is a credential.
    pub url: Secret,
    /// Which events it gets.
    pub events: Vec<NotifyEvent>,
    /// Key of the `X-Hotfolder-Signature` HMAC-SHA256 of the body.
    pub secret: Option<Secret>,
    /// Extra request headers (values are kept secret: often a token).
    pub headers: BTreeMap<String, Secret>,
    /// The body's form.
    pub format: NotifyFormat,
}

impl NotifyConfig {
    /// A short, stable name for this webhook that shows nothing of its URL
    /// (the outbox keys deliveries by it, status shows it).
    pub fn key(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.url.expose().as_bytes());
        hex::encode(&digest[..6])
    }

    /// Scheme and host of the URL only, for a person to recognise it.
    pub fn host(&self) -> String {
        url::Url::parse(self.url.expose()).map_or_else(
            |_| "(bad url)".into(),
            |u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")),
        )
    }
}

/// What a webhook is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyEvent {
    /// A file delivered (or found delivered already) and filed.
    Done,
    /// A job failed for good; its file is in failed/.
    Failed,
    /// An attempt failed and the job will try again.
    Retried,
}

impl NotifyEvent {
    /// Every event (a webhook without `events` gets all).
    pub const ALL: [NotifyEvent; 3] =
        [NotifyEvent::Done, NotifyEvent::Failed, NotifyEvent::Retried];

    /// Its name in config and bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Done => "done",
            NotifyEvent::Failed => "failed",
            NotifyEvent::Retried => "retried",
        }
    }
}

/// The body of a webhook's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// The event as a JSON document.
    Json,
    /// `{"text": "..."}`, which a Slack (or Mattermost, Teams-compatible)
    /// incoming-webhook URL takes as it is.
    Slack,
}

impl Config {
    /// The daemon watches folders; a config for one-shot uploads needs none
    /// (only providers and a state_dir), so the daemon asks for them here.
    ///
    /// # Errors
    /// A [`ConfigError`] on `watches` saying what to add.
    pub fn require_watches(&self) -> Result<(), ConfigError> {
        if !self.watches.is_empty() {
            return Ok(());
        }
        // Where `watches:` is (if it is there at all): the file again.
        let at = std::fs::read_to_string(&self.file)
            .map(|text| positions::PositionIndex::build(&text).find("watches"))
            .ok();
        Err(ConfigError {
            file: self.file.clone(),
            line: at.as_ref().map_or(0, |p| p.line),
            column: at.as_ref().map_or(0, |p| p.column),
            key: "watches".into(),
            message: "no watch configured: `hotfolder run` needs at least one folder under `watches:` (a config for `hotfolder upload` needs none)".into(),
        })
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `hotfolder=debug`.
    pub level: String,
    /// Human text or one JSON object per line for log shippers.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The job store.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StoreConfig {
    /// The embedded sled database in `state_dir`: one box.
    Sled,
    /// A PostgreSQL database shared by the nodes of a fleet.
    Postgres {
        /// Connection URL (may hold a password: a secret).
        url: Secret,
        /// This node's name, unique in the fleet (default: the host name).
        node: String,
        /// How long a node holds a job without renewing its claim.
        #[serde(serialize_with = "ser_duration")]
        lease: Duration,
    },
}

impl StoreConfig {
    /// This node's name in a fleet; `None` for the single-box store.
    pub fn node(&self) -> Option<&str> {
        match self {
            StoreConfig::Sled => None,
            StoreConfig::Postgres { node, .. } => Some(node),
        }
    }
}

/// The HTTP status API settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpConfig {
    /// Address to listen on; loopback unless the operator says otherwise.
    pub listen: String,
    /// Bearer token required by every route but `/healthz`.
    pub token: Option<Secret>,
}

/// How a watch learns of new files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// Filesystem events plus periodic full rescans.
    #[default]
    Auto,
    /// Filesystem events (and the scan at start) only.
    Events,
    /// Never rely on events: scan every `poll_every` (SMB/NFS shares).
    Poll,
}

/// What happens to a source file once delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AfterSuccess {
    /// Move to `done_dir`, keeping the relative path.
    #[default]
    Move,
    /// Delete the source.
    Delete,
    /// Leave it where it is (it is remembered and not taken again).
    Leave,
}

/// What happens to a file that no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Leave it in the watch folder untouched.
    #[default]
    Leave,
    /// Move it to `failed_dir` with an error report.
    Fail,
}

/// Whether content already delivered to the same provider is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Duplicates {
    /// Do not upload again; file it as done with a receipt naming the earlier upload.
    #[default]
    Skip,
    /// Upload anyway.
    Upload,
}

/// The shared retry policy's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryConfig {
    /// Tries without progress before a job fails.
    pub max_attempts: u32,
    /// First backoff ceiling; doubles per attempt.
    #[serde(serialize_with = "ser_duration")]
    pub initial_backoff: Duration,
    /// Largest backoff ceiling.
    #[serde(serialize_with = "ser_duration")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(600),
        }
    }
}

/// One watched folder with every default resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchConfig {
    /// Name used in rules, templates and status.
    pub name: String,
    /// Absolute path of the watched folder.
    pub path: PathBuf,
    /// Descend into subfolders.
    pub recursive: bool,
    /// Events, poll or both.
    pub mode: WatchMode,
    /// Scan interval in poll mode.
    #[serde(serialize_with = "ser_duration")]
    pub poll_every: Duration,
    /// Size, mtime and ctime unchanged this long means the file is complete.
    #[serde(serialize_with = "ser_duration")]
    pub stable_for: Duration,
    /// Full rescan interval (safety net for lost events).
    #[serde(serialize_with = "ser_duration")]
    pub rescan_every: Duration,
    /// Name globs never taken (temporary and hidden files).
    pub ignore: Vec<String>,
    /// Relative-path globs a file must match (empty: all).
    pub include: Vec<String>,
    /// Relative-path globs never taken.
    pub exclude: Vec<String>,
    /// Smaller files are left alone.
    pub min_size: u64,
    /// Wait for `<file>.ready` or `<file>.done` beside the file.
    pub require_marker: bool,
    /// Where delivered files go.
    pub done_dir: PathBuf,
    /// Where failed files go, with their error reports.
    pub failed_dir: PathBuf,
    /// What to do with the source after delivery.
    pub after_success: AfterSuccess,
    /// Write `<file>.receipt.json` beside files in done/.
    pub receipts: bool,
}

/// One named provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderConfig {
    /// The key under `providers:`.
    pub name: String,
    /// Replaces the documented API root (sandboxes and tests).
    pub base_url: Option<String>,
    /// Uploads at once to this provider (within `workers`).
    pub max_concurrent: usize,
    /// Per-request timeout.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// This provider's retry policy.
    pub retry: RetryConfig,
    /// Bytes per request; fixed per job when the job starts.
    pub chunk_size: u64,
    /// Parts of one file sent at once (`parallel: N`, tus concatenation or
    /// api.video parts); 1 sends chunk after chunk.
    pub parallel: usize,
    /// The limit on this provider's uploads together.
    pub bandwidth: Option<crate::bandwidth::Schedule>,
    /// Type-specific settings.
    #[serde(flatten)]
    pub kind: ProviderKind,
}

/// The provider types and their own keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProviderKind {
    /// Local or mounted directory.
    Folder {
        /// Destination directory.
        path: PathBuf,
    },
    /// OK.ru (Odnoklassniki).
    Okru {
        /// Application public key.
        application_key: String,
        /// Application secret key (signs requests).
        application_secret_key: Secret,
        /// User access token.
        access_token: Secret,
        /// Upload to this group instead of the user.
        group_id: Option<String>,
    },
    /// api.video.
    Apivideo {
        /// API key (exchanged for a bearer token).
        api_key: Option<Secret>,
        /// Delegated upload token, instead of an API key.
        upload_token: Option<Secret>,
        /// `sandbox` or `production` (ignored when base_url is set).
        environment: String,
        /// `bytes` or `parts`.
        upload_mode: String,
    },
    /// Gcore Video Streaming.
    Gcore {
        /// API key.
        api_key: Secret,
        /// `uploaded`, `viewable` or `ready`.
        wait_until: String,
    },
    /// movingimage VideoManager Pro.
    Movingimage {
        /// Account user name.
        username: String,
        /// Account password.
        password: Secret,
        /// Video manager id.
        video_manager_id: String,
        /// OIDC token endpoint.
        auth_url: String,
    },
    /// Any tus 1.0.0 server.
    Tus {
        /// Creation endpoint.
        endpoint: String,
        /// Extra headers on every request (values treated as secrets).
        headers: BTreeMap<String, Secret>,
    },
}

impl ProviderKind {
    /// The `type:` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            ProviderKind::Folder { .. } => "folder",
            ProviderKind::Okru { .. } => "okru",
            ProviderKind::Apivideo { .. } => "apivideo",
            ProviderKind::Gcore { .. } => "gcore",
            ProviderKind::Movingimage { .. } => "movingimage",
            ProviderKind::Tus { .. } => "tus",
        }
    }
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    /// Position in the list (for `check` output and status).
    pub index: usize,
    /// Only files from this watch.
    pub watch: Option<String>,
    /// Glob on the path relative to the watch.
    pub glob: Option<String>,
    /// Smallest size matched.
    pub min_size: Option<u64>,
    /// Largest size matched.
    pub max_size: Option<u64>,
    /// Provider name.
    pub provider: String,
    /// Metadata templates (title, description, tags, public, provider keys).
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Skip or upload content already delivered to this provider.
    pub duplicates: Duplicates,
    /// Webhooks told about the events of the jobs this rule routes (as
    /// well as the top-level ones).
    pub notify: Vec<NotifyConfig>,
    /// A short digest of everything the rule says but its position
    /// ([`Rule::said`]), worked out once when the rule is made: each job
    /// records it, and finding a job's rule compares it.
    #[serde(skip)]
    pub fingerprint: String,
}

impl Rule {
    /// The rule with its [`Rule::fingerprint`] worked out.
    pub fn with_fingerprint(self) -> Self {
        Rule {
            fingerprint: self.said(),
            ..self
        }
    }

    /// A short digest of everything the rule says but its position (its
    /// webhooks by their keys, which show nothing of their URLs): the same
    /// rule moved in the list keeps it, an edited one does not.
    pub fn said(&self) -> String {
        use sha2::Digest;
        let webhooks: Vec<String> = self.notify.iter().map(NotifyConfig::key).collect();
        let said = serde_json::json!([
            self.watch,
            self.glob,
            self.min_size,
            self.max_size,
            self.provider,
            self.metadata,
            self.duplicates,
            webhooks,
        ]);
        let digest = sha2::Sha256::digest(said.to_string().as_bytes());
        hex::encode(&digest[..8])
    }

    /// The rule of `rules` that routed a job: the one at `index` if it
    /// still says what it said then, else the one that does wherever it
    /// moved; none if it was edited or removed.
    pub fn of_job<'a>(
        rules: &'a [Rule],
        index: Option<usize>,
        fingerprint: Option<&str>,
    ) -> Option<&'a Rule> {
        let Some(fingerprint) = fingerprint else {
            // A job routed before fingerprints were kept.
            return index.and_then(|i| rules.get(i));
        };
        index
            .and_then(|i| rules.get(i))
            .filter(|r| r.fingerprint == fingerprint)
            .or_else(|| rules.iter().find(|r| r.fingerprint == fingerprint))
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<Rule> {
        let config = format!(
            "watches: [{{ name: drop, path: /tmp }}]\n\
             providers: {{ a: {{ type: folder, path: /tmp }}, b: {{ type: folder, path: /tmp }} }}\n\
             rules:\n{text}"
        );
        load_str(std::path::Path::new("/etc/h.yaml"), &config)
            .expect("config")
            .rules
    }

    #[test]
    fn a_jobs_rule_is_found_where_it_moved_and_not_once_edited() {
        let before = rules(
            "  - { match: { glob: \"*.mov\" }, provider: a }\n  - { match: {}, provider: b }\n",
        );
        let catch_all = before[1].fingerprint.clone();
        // A rule inserted above it: the index now names another rule.
        let after = rules(
            "  - { match: { glob: \"*.mxf\" }, provider: a }\n  - { match: { glob: \"*.mov\" }, provider: a }\n  - { match: {}, provider: b }\n",
        );
        let found = Rule::of_job(&after, Some(1), Some(&catch_all)).expect("found");
        assert_eq!((found.index, found.provider.as_str()), (2, "b"));
        // Edited: no rule says what it said.
        let edited = rules("  - { match: {}, provider: a }\n");
        assert!(Rule::of_job(&edited, Some(0), Some(&catch_all)).is_none());
        // A job routed before fingerprints: by index, as before.
        assert_eq!(
            Rule::of_job(&after, Some(0), None).map(|r| r.index),
            Some(0)
        );
    }
}
