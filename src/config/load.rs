//! Reading the YAML file into [`Config`]: parse, resolve, check. Every error
//! names `file:line:column` and the key, and says what to do.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::positions::PositionIndex;
use super::values::{ByteSize, Dur, Flag, Num, Secret, Text, interpolate};
use super::*;
use crate::bandwidth::Schedule;

/// A configuration problem, located in the file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line (0 when the file could not be read at all).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Key path such as `watches[0].path` (empty for syntax errors).
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

// ---------------------------------------------------------------- raw shape

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<Text>,
    workers: Option<Num<usize>>,
    shutdown_timeout: Option<Dur>,
    #[serde(default)]
    log: RawLog,
    http: Option<RawHttp>,
    store: Option<RawStore>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    watches: Vec<RawWatch>,
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    unmatched: Unmatched,
    bandwidth: Option<Schedule>,
    #[serde(default)]
    notify: Vec<RawNotify>,
}

/// One webhook.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    url: Option<Secret>,
    url_file: Option<Text>,
    events: Option<Vec<Text>>,
    secret: Option<Secret>,
    secret_file: Option<Text>,
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
    format: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Text>,
    #[serde(default)]
    format: LogFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    kind: Text,
    url: Option<Secret>,
    url_file: Option<Text>,
    node: Option<Text>,
    lease: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<Text>,
    token: Option<Secret>,
    token_file: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<Num<u32>>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
}

impl RawRetry {
    fn over(&self, base: RetryConfig) -> RetryConfig {
        RetryConfig {
            max_attempts: self.max_attempts.map_or(base.max_attempts, |n| n.0),
            initial_backoff: self.initial_backoff.map_or(base.initial_backoff, |d| d.0),
            max_backoff: self.max_backoff.map_or(base.max_backoff, |d| d.0),
        }
    }
}

/// Settings a watch may override; also the shape of `defaults:`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    stable_for: Option<Dur>,
    rescan_every: Option<Dur>,
    ignore: Option<Vec<Text>>,
    after_success: Option<AfterSuccess>,
    receipts: Option<Flag>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    name: Text,
    path: Text,
    recursive: Option<Flag>,
    mode: Option<WatchMode>,
    poll_every: Option<Dur>,
    stable_for: Option<Dur>,
    rescan_every: Option<Dur>,
    ignore: Option<Vec<Text>>,
    include: Option<Vec<Text>>,
    exclude: Option<Vec<Text>>,
    min_size: Option<ByteSize>,
    require_marker: Option<Flag>,
    done_dir: Option<Text>,
    failed_dir: Option<Text>,
    after_success: Option<AfterSuccess>,
    receipts: Option<Flag>,
}

/// Every provider key of every type; which ones apply is checked per type.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(rename = "type")]
    kind: Text,
    base_url: Option<Text>,
    max_concurrent: Option<Num<usize>>,
    timeout: Option<Dur>,
    retry: Option<RawRetry>,
    chunk_size: Option<ByteSize>,
    parallel: Option<Num<usize>>,
    bandwidth: Option<Schedule>,
    // folder
    path: Option<Text>,
    // okru
    application_key: Option<Text>,
    application_secret_key: Option<Secret>,
    application_secret_key_file: Option<Text>,
    access_token: Option<Secret>,
    access_token_file: Option<Text>,
    group_id: Option<Text>,
    // apivideo, gcore
    api_key: Option<Secret>,
    api_key_file: Option<Text>,
    upload_token: Option<Secret>,
    upload_token_file: Option<Text>,
    environment: Option<Text>,
    upload_mode: Option<Text>,
    wait_until: Option<Text>,
    // movingimage
    username: Option<Text>,
    password: Option<Secret>,
    password_file: Option<Text>,
    video_manager_id: Option<Text>,
    auth_url: Option<Text>,
    // tus
    endpoint: Option<Text>,
    headers: Option<BTreeMap<String, Secret>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    matcher: RawMatch,
    provider: Text,
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    duplicates: Duplicates,
    #[serde(default)]
    notify: Vec<RawNotify>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    watch: Option<Text>,
    glob: Option<Text>,
    min_size: Option<ByteSize>,
    max_size: Option<ByteSize>,
}

// ---------------------------------------------------------------- loading

/// Read, resolve and check the config file.
///
/// # Errors
/// A [`ConfigError`] naming the file, line, column and key.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!(
            "cannot read the config file: {e}; pass the right one with -c FILE or $HOTFOLDER_CONFIG"
        ),
    })?;
    let config = load_str(file, &text)?;
    check_filesystem(&config, &PositionIndex::build(&text))?;
    Ok(config)
}

/// Parse and resolve config text (no filesystem checks); `file` names it in
/// errors and anchors relative paths.
///
/// # Errors
/// A [`ConfigError`] naming the line, column and key.
pub fn load_str(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let index = PositionIndex::build(text);
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| yaml_error(file, &index, &e))?;
    let mut resolver = Resolver {
        file,
        base: file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        index: &index,
    };
    if !resolver.base.is_absolute()
        && let Ok(cwd) = std::env::current_dir()
    {
        resolver.base = cwd.join(&resolver.base);
    }
    resolver.resolve(raw)
}

fn yaml_error(file: &Path, index: &PositionIndex, error: &serde_yaml::Error) -> ConfigError {
    let (line, column) = error.location().map_or((1, 1), |l| (l.line(), l.column()));
    // The location is printed as file:line:column already. A syntax error
    // may carry a second, earlier position ("while scanning a quoted scalar
    // at line 1 column 12"): that one says where the problem starts; keep it.
    let message = without_position(&error.to_string(), line, column);
    // serde_yaml prefixes the key path ("watches[0]: missing field `path`")
    // except for top-level keys.
    let (path, message) = match message.split_once(": ") {
        Some((path, rest)) if !path.contains([' ', '"']) => {
            (Some(path.to_string()), rest.to_string())
        }
        _ => (None, message),
    };
    // An unknown or missing field is named in the key path itself
    // (`watches[0].stabel_for`), so the operator sees which key to fix.
    let field = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix)?.split('`').next())
        .map(str::to_string);
    let key = match (path, field) {
        (Some(path), Some(field)) => format!("{path}.{field}"),
        (Some(path), None) => path,
        (None, Some(field)) => field,
        (None, None) => index.key_at(line, column).unwrap_or_default(),
    };
    let hint = if message.starts_with("unknown field") {
        "; check the spelling against docs/CONFIG.md"
    } else if message.starts_with("missing field") {
        "; add it (see config.example.yaml)"
    } else if index.is_empty() {
        // The document does not parse at all: no key to name, so say what kind of problem it is.
        "; this is a YAML syntax error: check the indentation, quotes and brackets here and just above"
    } else {
        ""
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        key,
        message: format!("{message}{hint}"),
    }
}

/// `message` without " at line L column C" for this very position.
fn without_position(message: &str, line: usize, column: usize) -> String {
    let here = format!(" at line {line} column {column}");
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(&here) {
        let after = &rest[at + here.len()..];
        out.push_str(&rest[..at]);
        // " at line 8 column 1" is also the start of " at line 8 column 12".
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&here);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

struct Resolver<'a> {
    file: &'a Path,
    base: PathBuf,
    index: &'a PositionIndex,
}

/// Most parts one file is sent in at once.
const MAX_PARALLEL: usize = 32;

/// `parallel: N` only where the protocol lets parts of one file travel
/// side by side (docs/providers/ says why for each type).
fn check_parallel(
    loader: &Resolver,
    key: &str,
    parallel: usize,
    kind: &ProviderKind,
) -> Result<(), ConfigError> {
    if !(1..=MAX_PARALLEL).contains(&parallel) {
        return Err(loader.error(key, format!("must be 1 to {MAX_PARALLEL}")));
    }
    if parallel == 1 {
        return Ok(());
    }
    let refusal = match kind {
        ProviderKind::Tus { .. } => return Ok(()),
        ProviderKind::Apivideo {
            upload_token: Some(_),
            ..
        } => {
            "with a delegated upload_token the first chunk creates the video, so parts cannot start side by side; use api_key, or parallel: 1"
        }
        ProviderKind::Apivideo { upload_mode, .. } if upload_mode != "parts" => {
            "api.video takes parts side by side only as numbered parts: add upload_mode: parts"
        }
        ProviderKind::Apivideo { .. } => return Ok(()),
        ProviderKind::Folder { .. } => {
            "the folder provider writes one file on a local or mounted disk; remove parallel"
        }
        ProviderKind::Okru { .. } => {
            "OK.ru's upload protocol takes chunks one after another (docs/providers/okru.md); remove parallel"
        }
        ProviderKind::Gcore { .. } => {
            "Gcore's upload servers do not offer tus concatenation (docs/providers/gcore.md); remove parallel"
        }
        ProviderKind::Movingimage { .. } => {
            "movingimage's upload takes chunks one after another (docs/providers/movingimage.md); remove parallel"
        }
    };
    Err(loader.error(key, refusal))
}

fn default_chunk_size(kind: &str) -> u64 {
    match kind {
        "okru" => 16 << 20,
        "apivideo" => 50 << 20,
        "gcore" => 10_000_000,
        "movingimage" => 8 << 20,
        "tus" => 32 << 20,
        _ => 8 << 20,
    }
}

/// Keys that only some provider types take.
const TYPE_KEYS: &[(&str, &[&str])] = &[
    ("folder", &["path"]),
    (
        "okru",
        &[
            "application_key",
            "application_secret_key",
            "application_secret_key_file",
            "access_token",
            "access_token_file",
            "group_id",
        ],
    ),
    (
        "apivideo",
        &[
            "api_key",
            "api_key_file",
            "upload_token",
            "upload_token_file",
            "environment",
            "upload_mode",
        ],
    ),
    ("gcore", &["api_key", "api_key_file", "wait_until"]),
    (
        "movingimage",
        &[
            "username",
            "password",
            "password_file",
            "video_manager_id",
            "auth_url",
        ],
    ),
    ("tus", &["endpoint", "headers"]),
];

impl Resolver<'_> {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let position = self.index.find(key);
        ConfigError {
            file: self.file.to_path_buf(),
            line: position.line,
            column: position.column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        let joined = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        };
        normalize(&joined)
    }

    /// A secret given inline or as `<key>_file`.
    fn secret(
        &self,
        key: &str,
        inline: Option<Secret>,
        file: Option<&Text>,
    ) -> Result<Option<Secret>, ConfigError> {
        match (inline, file) {
            (Some(_), Some(_)) => Err(self.error(
                &format!("{key}_file"),
                format!(
                    "give either `{}` or `{}_file`, not both",
                    leaf(key),
                    leaf(key)
                ),
            )),
            (Some(secret), None) => Ok(Some(secret)),
            (None, Some(path)) => {
                let path = self.path(path);
                let contents = std::fs::read_to_string(&path).map_err(|e| {
                    self.error(
                        &format!("{key}_file"),
                        format!("cannot read secret file {}: {e}", path.display()),
                    )
                })?;
                Ok(Some(Secret::new(contents.trim())))
            }
            (None, None) => Ok(None),
        }
    }

    fn required_secret(
        &self,
        key: &str,
        inline: Option<Secret>,
        file: Option<&Text>,
    ) -> Result<Secret, ConfigError> {
        self.secret(key, inline, file)?.ok_or_else(|| {
            self.error(
                key,
                format!("missing `{0}` (or `{0}_file`); add it", leaf(key)),
            )
        })
    }

    fn required_text(&self, key: &str, value: Option<Text>) -> Result<String, ConfigError> {
        match value {
            Some(text) if !text.trim().is_empty() => Ok(text.0),
            _ => Err(self.error(key, format!("missing `{}`; add it", leaf(key)))),
        }
    }

    fn resolve(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let workers = raw.workers.map_or(4, |n| n.0);
        if workers == 0 {
            return Err(self.error("workers", "must be at least 1"));
        }
        let defaults = &raw.defaults;
        let default_retry = defaults
            .retry
            .as_ref()
            .map_or_else(RetryConfig::default, |r| r.over(RetryConfig::default()));
        check_retry(self, "defaults.retry", &default_retry)?;

        let http = match raw.http {
            None => None,
            Some(http) => Some(HttpConfig {
                listen: http
                    .listen
                    .map_or_else(|| "127.0.0.1:8787".to_string(), |t| t.0),
                token: self.secret("http.token", http.token, http.token_file.as_ref())?,
            }),
        };
        if let Some(http) = &http
            && http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(self.error(
                "http.listen",
                format!("{:?} is not an address such as 127.0.0.1:8787", http.listen),
            ));
        }

        let store = self.store(raw.store)?;

        let mut watches = Vec::new();
        for (i, watch) in raw.watches.into_iter().enumerate() {
            watches.push(self.watch(i, watch, defaults)?);
        }
        for (i, watch) in watches.iter().enumerate() {
            if watches[..i].iter().any(|w| w.name == watch.name) {
                return Err(self.error(
                    &format!("watches[{i}].name"),
                    format!(
                        "watch name {:?} is used twice; names must be unique",
                        watch.name
                    ),
                ));
            }
        }

        let mut providers = BTreeMap::new();
        for (name, provider) in raw.providers {
            let resolved = self.provider(&name, provider, workers, default_retry)?;
            providers.insert(name, resolved);
        }

        let notify = self.notify("notify", raw.notify)?;
        let mut rules = Vec::new();
        for (i, rule) in raw.rules.into_iter().enumerate() {
            rules.push(self.rule(i, rule, &watches, &providers)?);
        }
        // Deliveries are kept by webhook URL: one URL is one webhook.
        let mut seen = std::collections::BTreeSet::new();
        let all_hooks =
            notify
                .iter()
                .map(|h| ("notify".to_string(), h))
                .chain(rules.iter().flat_map(|r| {
                    r.notify
                        .iter()
                        .map(move |h| (format!("rules[{}].notify", r.index), h))
                }));
        for (key, hook) in all_hooks {
            if !seen.insert(hook.url.expose().to_string()) {
                return Err(self.error(
                    &key,
                    "the same webhook URL appears twice; give it once (top level for every job, or in one rule)",
                ));
            }
        }

        let config = Config {
            file: self.file.to_path_buf(),
            state_dir: self.path(raw.state_dir.as_deref().unwrap_or("./state")),
            workers,
            shutdown_timeout: raw
                .shutdown_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            log: LogConfig {
                level: raw.log.level.map_or_else(|| "info".into(), |t| t.0),
                format: raw.log.format,
            },
            http,
            store,
            watches,
            providers,
            rules,
            unmatched: raw.unmatched,
            bandwidth: raw.bandwidth,
            notify,
            retry: default_retry,
        };
        self.check_folders(&config)?;
        Ok(config)
    }

    fn store(&self, raw: Option<RawStore>) -> Result<StoreConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(StoreConfig::Sled);
        };
        let only_for_postgres = [
            ("url", raw.url.is_some()),
            ("url_file", raw.url_file.is_some()),
            ("node", raw.node.is_some()),
            ("lease", raw.lease.is_some()),
        ];
        match raw.kind.trim() {
            "sled" => {
                if let Some((key, _)) = only_for_postgres.iter().find(|(_, set)| *set) {
                    return Err(self.error(
                        &format!("store.{key}"),
                        "is a setting of `type: postgres`; the sled store (one box) lives in state_dir",
                    ));
                }
                Ok(StoreConfig::Sled)
            }
            "postgres" => {
                let url = self
                    .secret("store.url", raw.url, raw.url_file.as_ref())?
                    .ok_or_else(|| {
                        self.error(
                            "store.url",
                            "a postgres store needs `url: postgres://USER@HOST/DB` (or url_file)",
                        )
                    })?;
                let scheme_ok = ["postgres://", "postgresql://"]
                    .iter()
                    .any(|scheme| url.expose().starts_with(scheme));
                if !scheme_ok {
                    return Err(self.error(
                        "store.url",
                        "is not a PostgreSQL URL: it starts with postgres:// (postgres://USER@HOST:5432/DB)",
                    ));
                }
                if let Err(e) = url.expose().parse::<sqlx::postgres::PgConnectOptions>() {
                    // sqlx's message never quotes the URL (it may hold a password).
                    return Err(self.error(
                        "store.url",
                        format!(
                            "is not a PostgreSQL URL such as postgres://USER@HOST:5432/DB ({e})"
                        ),
                    ));
                }
                let node = match raw.node {
                    Some(node) => node.0.trim().to_string(),
                    None => host_name(),
                };
                if node.is_empty() || node.len() > 63 {
                    return Err(self.error(
                        "store.node",
                        "a node name is 1 to 63 characters, unique in the fleet",
                    ));
                }
                let lease = raw.lease.map_or(Duration::from_secs(30), |d| d.0);
                if lease < Duration::from_secs(2) {
                    return Err(self.error("store.lease", "must be at least 2s"));
                }
                Ok(StoreConfig::Postgres { url, node, lease })
            }
            other => Err(self.error(
                "store.type",
                format!("unknown store type {other:?}; use sled (one box) or postgres (a fleet)"),
            )),
        }
    }

    fn watch(
        &self,
        i: usize,
        raw: RawWatch,
        defaults: &RawDefaults,
    ) -> Result<WatchConfig, ConfigError> {
        let key = |k: &str| format!("watches[{i}].{k}");
        let name = raw.name.0.trim().to_string();
        if name.is_empty() || name.contains(['/', '\\']) {
            return Err(self.error(
                &key("name"),
                "a watch needs a non-empty name without slashes",
            ));
        }
        if raw.path.trim().is_empty() {
            return Err(self.error(&key("path"), "a watch needs a path"));
        }
        let path = self.path(&raw.path);
        let sibling = |kind: &str| {
            path.parent()
                .unwrap_or(Path::new("/"))
                .join(kind)
                .join(&name)
        };
        let globs = |list: Option<Vec<Text>>| -> Vec<String> {
            list.unwrap_or_default().into_iter().map(|t| t.0).collect()
        };
        // A value inherited from `defaults` is wrong where it was written.
        let origin = |own: bool, k: &str| {
            if own { key(k) } else { format!("defaults.{k}") }
        };
        let ignore_key = origin(raw.ignore.is_some(), "ignore");
        let stable_key = origin(raw.stable_for.is_some(), "stable_for");
        let rescan_key = origin(raw.rescan_every.is_some(), "rescan_every");
        let ignore = match raw.ignore.or_else(|| defaults.ignore.clone()) {
            Some(list) => globs(Some(list)),
            None => DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect(),
        };
        let watch = WatchConfig {
            recursive: raw.recursive.is_none_or(|f| f.0),
            mode: raw.mode.unwrap_or_default(),
            poll_every: raw.poll_every.map_or(Duration::from_secs(5), |d| d.0),
            stable_for: raw
                .stable_for
                .or(defaults.stable_for)
                .map_or(Duration::from_secs(10), |d| d.0),
            rescan_every: raw
                .rescan_every
                .or(defaults.rescan_every)
                .map_or(Duration::from_secs(60), |d| d.0),
            ignore,
            include: globs(raw.include),
            exclude: globs(raw.exclude),
            min_size: raw.min_size.map_or(0, |s| s.0),
            require_marker: raw.require_marker.is_some_and(|f| f.0),
            done_dir: raw
                .done_dir
                .map_or_else(|| sibling("done"), |p| self.path(&p)),
            failed_dir: raw
                .failed_dir
                .map_or_else(|| sibling("failed"), |p| self.path(&p)),
            after_success: raw
                .after_success
                .or(defaults.after_success)
                .unwrap_or_default(),
            receipts: raw.receipts.or(defaults.receipts).is_none_or(|f| f.0),
            name,
            path,
        };
        for (list, field) in [
            (&watch.ignore, ignore_key),
            (&watch.include, key("include")),
            (&watch.exclude, key("exclude")),
        ] {
            for (j, glob) in list.iter().enumerate() {
                if let Err(e) = globset::Glob::new(glob) {
                    return Err(self.error(
                        &format!("{field}[{j}]"),
                        format!("{glob:?} is not a valid glob: {}", e.kind()),
                    ));
                }
            }
        }
        if watch.stable_for.is_zero() {
            return Err(self.error(&stable_key, "must be more than 0s"));
        }
        if watch.poll_every.is_zero() {
            return Err(self.error(&key("poll_every"), "must be more than 0s"));
        }
        if watch.rescan_every.is_zero() {
            return Err(self.error(&rescan_key, "must be more than 0s"));
        }
        Ok(watch)
    }

    fn provider(
        &self,
        name: &str,
        raw: RawProvider,
        workers: usize,
        default_retry: RetryConfig,
    ) -> Result<ProviderConfig, ConfigError> {
        let key = |k: &str| format!("providers.{name}.{k}");
        let kind_name = raw.kind.trim().to_string();
        let Some((_, own_keys)) = TYPE_KEYS.iter().find(|(t, _)| *t == kind_name) else {
            return Err(self.error(
                &key("type"),
                format!(
                    "unknown provider type {kind_name:?}; use one of folder, okru, apivideo, gcore, movingimage, tus"
                ),
            ));
        };
        let present = [
            ("path", raw.path.is_some()),
            ("application_key", raw.application_key.is_some()),
            (
                "application_secret_key",
                raw.application_secret_key.is_some(),
            ),
            (
                "application_secret_key_file",
                raw.application_secret_key_file.is_some(),
            ),
            ("access_token", raw.access_token.is_some()),
            ("access_token_file", raw.access_token_file.is_some()),
            ("group_id", raw.group_id.is_some()),
            ("api_key", raw.api_key.is_some()),
            ("api_key_file", raw.api_key_file.is_some()),
            ("upload_token", raw.upload_token.is_some()),
            ("upload_token_file", raw.upload_token_file.is_some()),
            ("environment", raw.environment.is_some()),
            ("upload_mode", raw.upload_mode.is_some()),
            ("wait_until", raw.wait_until.is_some()),
            ("username", raw.username.is_some()),
            ("password", raw.password.is_some()),
            ("password_file", raw.password_file.is_some()),
            ("video_manager_id", raw.video_manager_id.is_some()),
            ("auth_url", raw.auth_url.is_some()),
            ("endpoint", raw.endpoint.is_some()),
            ("headers", raw.headers.is_some()),
        ];
        for (field, is_set) in present {
            if is_set && !own_keys.contains(&field) {
                return Err(self.error(
                    &key(field),
                    format!(
                        "`{field}` does not apply to a provider of type {kind_name}; remove it"
                    ),
                ));
            }
        }
        let retry = raw
            .retry
            .as_ref()
            .map_or(default_retry, |r| r.over(default_retry));
        check_retry(self, &key("retry"), &retry)?;
        let chunk_size = raw
            .chunk_size
            .map_or_else(|| default_chunk_size(&kind_name), |s| s.0);
        if chunk_size == 0 {
            return Err(self.error(&key("chunk_size"), "must be more than 0"));
        }
        let one_of = |field: &str, value: Option<Text>, allowed: &[&str]| {
            let value = value.map_or_else(|| allowed[0].to_string(), |t| t.0);
            if allowed.contains(&value.as_str()) {
                Ok(value)
            } else {
                Err(self.error(
                    &key(field),
                    format!("{value:?} is not one of {}", allowed.join(", ")),
                ))
            }
        };
        let kind = match kind_name.as_str() {
            "folder" => ProviderKind::Folder {
                path: self.path(&self.required_text(&key("path"), raw.path)?),
            },
            "okru" => ProviderKind::Okru {
                application_key: self
                    .required_text(&key("application_key"), raw.application_key)?,
                application_secret_key: self.required_secret(
                    &key("application_secret_key"),
                    raw.application_secret_key,
                    raw.application_secret_key_file.as_ref(),
                )?,
                access_token: self.required_secret(
                    &key("access_token"),
                    raw.access_token,
                    raw.access_token_file.as_ref(),
                )?,
                group_id: raw.group_id.map(|t| t.0),
            },
            "apivideo" => {
                let api_key =
                    self.secret(&key("api_key"), raw.api_key, raw.api_key_file.as_ref())?;
                let upload_token = self.secret(
                    &key("upload_token"),
                    raw.upload_token,
                    raw.upload_token_file.as_ref(),
                )?;
                if api_key.is_some() == upload_token.is_some() {
                    return Err(self.error(
                        &key("api_key"),
                        "api.video needs exactly one of `api_key` (or `api_key_file`) and `upload_token` (or `upload_token_file`)",
                    ));
                }
                if chunk_size < 5 << 20 {
                    return Err(self.error(
                        &key("chunk_size"),
                        format!(
                            "api.video chunks must be at least 5MiB (got {}); raise chunk_size",
                            ByteSize(chunk_size)
                        ),
                    ));
                }
                if chunk_size > 128 << 20 {
                    return Err(self.error(
                        &key("chunk_size"),
                        "api.video chunks must be at most 128MiB; lower chunk_size",
                    ));
                }
                ProviderKind::Apivideo {
                    api_key,
                    upload_token,
                    environment: one_of("environment", raw.environment, &["sandbox", "production"])?,
                    upload_mode: one_of("upload_mode", raw.upload_mode, &["bytes", "parts"])?,
                }
            }
            "gcore" => ProviderKind::Gcore {
                api_key: self.required_secret(
                    &key("api_key"),
                    raw.api_key,
                    raw.api_key_file.as_ref(),
                )?,
                wait_until: one_of("wait_until", raw.wait_until, &["uploaded", "viewable", "ready"])?,
            },
            "movingimage" => ProviderKind::Movingimage {
                username: self.required_text(&key("username"), raw.username)?,
                password: self.required_secret(
                    &key("password"),
                    raw.password,
                    raw.password_file.as_ref(),
                )?,
                video_manager_id: self
                    .required_text(&key("video_manager_id"), raw.video_manager_id)?,
                auth_url: raw.auth_url.map_or_else(
                    || {
                        "https://login.movingimage.com/auth/realms/platform/protocol/openid-connect/token"
                            .to_string()
                    },
                    |t| t.0,
                ),
            },
            _ => {
                let endpoint = self.required_text(&key("endpoint"), raw.endpoint)?;
                check_url(self, &key("endpoint"), &endpoint)?;
                ProviderKind::Tus {
                    endpoint,
                    headers: raw.headers.unwrap_or_default(),
                }
            }
        };
        let base_url = raw.base_url.map(|t| t.0);
        if let Some(url) = &base_url {
            check_url(self, &key("base_url"), url)?;
        }
        let max_concurrent = raw.max_concurrent.map_or(workers, |n| n.0);
        if max_concurrent == 0 {
            return Err(self.error(&key("max_concurrent"), "must be at least 1"));
        }
        let parallel = raw.parallel.map_or(1, |n| n.0);
        check_parallel(self, &key("parallel"), parallel, &kind)?;
        Ok(ProviderConfig {
            name: name.to_string(),
            base_url,
            max_concurrent,
            timeout: raw.timeout.map_or(Duration::from_secs(120), |d| d.0),
            retry,
            chunk_size,
            parallel,
            bandwidth: raw.bandwidth.clone(),
            kind,
        })
    }

    fn rule(
        &self,
        i: usize,
        raw: RawRule,
        watches: &[WatchConfig],
        providers: &BTreeMap<String, ProviderConfig>,
    ) -> Result<Rule, ConfigError> {
        let key = |k: &str| format!("rules[{i}].{k}");
        let provider = raw.provider.0;
        if !providers.contains_key(&provider) {
            let known: Vec<&str> = providers.keys().map(String::as_str).collect();
            return Err(self.error(
                &key("provider"),
                format!(
                    "no provider named {provider:?}; define it under `providers:` (defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let watch = raw.matcher.watch.map(|t| t.0);
        if let Some(name) = &watch
            && !watches.iter().any(|w| &w.name == name)
        {
            return Err(self.error(
                &key("match.watch"),
                format!("no watch named {name:?}; use a name from `watches:`"),
            ));
        }
        let glob = raw.matcher.glob.map(|t| t.0);
        if let Some(pattern) = &glob
            && let Err(e) = globset::Glob::new(pattern)
        {
            return Err(self.error(
                &key("match.glob"),
                format!("{pattern:?} is not a valid glob: {}", e.kind()),
            ));
        }
        let mut metadata = raw.metadata;
        for (name, value) in metadata.iter_mut() {
            interpolate_json(value)
                .map_err(|m| self.error(&key(&format!("metadata.{name}")), m))?;
        }
        let notify = self.notify(&key("notify"), raw.notify)?;
        Ok(Rule {
            notify,
            index: i,
            watch,
            glob,
            min_size: raw.matcher.min_size.map(|s| s.0),
            max_size: raw.matcher.max_size.map(|s| s.0),
            provider,
            metadata,
            duplicates: raw.duplicates,
            fingerprint: String::new(),
        }
        .with_fingerprint())
    }

    /// Webhooks under `key` (`notify`, `rules[N].notify`).
    fn notify(&self, key: &str, raw: Vec<RawNotify>) -> Result<Vec<NotifyConfig>, ConfigError> {
        let mut out = Vec::new();
        for (i, raw) in raw.into_iter().enumerate() {
            let key = format!("{key}[{i}]");
            let url = self
                .secret(&format!("{key}.url"), raw.url, raw.url_file.as_ref())?
                .ok_or_else(|| self.error(&key, "a webhook needs a `url` (or `url_file`)"))?;
            match url::Url::parse(url.expose()) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
                _ => {
                    return Err(
                        self.error(&format!("{key}.url"), "is not an http:// or https:// URL")
                    );
                }
            }
            let events = match raw.events {
                None => NotifyEvent::ALL.to_vec(),
                Some(names) => {
                    let mut events = Vec::new();
                    for (j, name) in names.iter().enumerate() {
                        let event = NotifyEvent::ALL
                            .into_iter()
                            .find(|e| e.as_str() == name.trim())
                            .ok_or_else(|| {
                                self.error(
                                    &format!("{key}.events[{j}]"),
                                    format!(
                                        "{:?} is not an event; use done, failed or retried",
                                        name.0
                                    ),
                                )
                            })?;
                        events.push(event);
                    }
                    events
                }
            };
            let format = match raw.format.as_deref().map(str::trim) {
                None | Some("json") => NotifyFormat::Json,
                Some("slack") => NotifyFormat::Slack,
                Some(other) => {
                    return Err(self.error(
                        &format!("{key}.format"),
                        format!("{other:?} is not a format; use json or slack"),
                    ));
                }
            };
            for (name, value) in &raw.headers {
                let valid = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(value.expose()).is_ok();
                if !valid {
                    return Err(self.error(
                        &format!("{key}.headers.{name}"),
                        "is not a valid HTTP header (name: letters, digits and -; value: visible characters)",
                    ));
                }
            }
            let secret = self.secret(
                &format!("{key}.secret"),
                raw.secret,
                raw.secret_file.as_ref(),
            )?;
            out.push(NotifyConfig {
                url,
                events,
                secret,
                headers: raw.headers,
                format,
            });
        }
        Ok(out)
    }

    /// done/failed folders must not be inside a watched tree unless excluded
    /// (the scanner skips them anyway, but an operator would be surprised).
    fn check_folders(&self, config: &Config) -> Result<(), ConfigError> {
        for (i, watch) in config.watches.iter().enumerate() {
            for (field, dir) in [
                ("done_dir", &watch.done_dir),
                ("failed_dir", &watch.failed_dir),
            ] {
                for other in &config.watches {
                    let Ok(rel) = dir.strip_prefix(&other.path) else {
                        continue;
                    };
                    if rel.as_os_str().is_empty() {
                        return Err(self.error(
                            &format!("watches[{i}].{field}"),
                            format!(
                                "{} is the watched folder itself; choose a folder outside it",
                                dir.display()
                            ),
                        ));
                    }
                    let rel = rel.to_string_lossy().replace('\\', "/");
                    let excluded = other.exclude.iter().any(|pattern| {
                        globset::Glob::new(pattern).is_ok_and(|g| {
                            let m = g.compile_matcher();
                            m.is_match(&rel) || m.is_match(format!("{rel}/x"))
                        })
                    });
                    if !excluded && (other.recursive || !rel.contains('/')) {
                        return Err(self.error(
                            &format!("watches[{i}].{field}"),
                            format!(
                                "{} is inside watch {:?} ({}); move it outside or add \"{rel}/**\" to that watch's exclude",
                                dir.display(),
                                other.name,
                                other.path.display()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

fn check_retry(r: &Resolver, key: &str, retry: &RetryConfig) -> Result<(), ConfigError> {
    if retry.max_attempts == 0 {
        return Err(r.error(&format!("{key}.max_attempts"), "must be at least 1"));
    }
    if retry.initial_backoff > retry.max_backoff {
        return Err(r.error(
            &format!("{key}.initial_backoff"),
            "is larger than max_backoff; lower it or raise max_backoff",
        ));
    }
    Ok(())
}

fn check_url(r: &Resolver, key: &str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(r.error(key, format!("{url:?} is not an http:// or https:// URL"))),
    }
}

fn interpolate_json(value: &mut serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::String(s) => *s = interpolate(s)?,
        serde_json::Value::Array(items) => {
            for item in items {
                interpolate_json(item)?;
            }
        }
        serde_json::Value::Object(map) => {
            for item in map.values_mut() {
                interpolate_json(item)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The default `ignore` list: temporary copy names and hidden files.
pub const DEFAULT_IGNORE: &[&str] = &[
    "*.part",
    "*.tmp",
    "*.crdownload",
    "*.filepart",
    ".*",
    "~*",
    "Thumbs.db",
];

/// Lexically remove `.` and `..` so that containment checks work on paths
/// that do not exist yet.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Checks that touch the filesystem: watch folders must exist.
fn check_filesystem(config: &Config, index: &PositionIndex) -> Result<(), ConfigError> {
    for (i, watch) in config.watches.iter().enumerate() {
        let key = format!("watches[{i}].path");
        let problem = match std::fs::metadata(&watch.path) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => format!("{} is not a folder", watch.path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                "watch folder {} does not exist; create it or fix the path",
                watch.path.display()
            ),
            Err(e) => format!("cannot open watch folder {}: {e}", watch.path.display()),
        };
        let position = index.find(&key);
        return Err(ConfigError {
            file: config.file.clone(),
            line: position.line,
            column: position.column,
            key,
            message: problem,
        });
    }
    Ok(())
}

/// This machine's host name: the default node name in a fleet.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        load_str(Path::new("/etc/hf/test.yaml"), text)
    }

    const MINIMAL: &str = "watches:\n  - name: a\n    path: /srv/drop/a\nproviders:\n  out: { type: folder, path: /srv/out }\nrules:\n  - match: {}\n    provider: out\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.workers, 4);
        assert_eq!(c.state_dir, PathBuf::from("/etc/hf/state"));
        let w = &c.watches[0];
        assert_eq!(w.stable_for, Duration::from_secs(10));
        assert_eq!(w.done_dir, PathBuf::from("/srv/drop/done/a"));
        assert_eq!(w.failed_dir, PathBuf::from("/srv/drop/failed/a"));
        assert!(w.ignore.contains(&".*".to_string()));
        assert_eq!(c.providers["out"].chunk_size, 8 << 20);
    }

    #[test]
    fn unknown_key_is_located() {
        let text = MINIMAL.replace(
            "    path: /srv/drop/a\n",
            "    path: /srv/drop/a\n    stabel_for: 3s\n",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (4, "watches[0].stabel_for"),
            "{e}"
        );
        assert!(e.message.contains("stabel_for"), "{e}");
        assert!(e.to_string().starts_with("/etc/hf/test.yaml:4:"), "{e}");
    }

    #[test]
    fn unknown_provider_in_rule_is_located() {
        let e = parse(&MINIMAL.replace("provider: out", "provider: nowhere")).unwrap_err();
        assert_eq!((e.line, e.column), (8, 5), "{e}");
        assert_eq!(e.key, "rules[0].provider");
        assert!(e.message.contains("nowhere"));
    }

    #[test]
    fn wrong_type_and_bad_size() {
        let e = parse(&format!("workers: many\n{MINIMAL}")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (1, "workers"), "{e}");
        let e = parse(&MINIMAL.replace(
            "path: /srv/drop/a",
            "path: /srv/drop/a\n    min_size: 3 parsecs",
        ))
        .unwrap_err();
        assert_eq!(e.key, "watches[0].min_size", "{e}");
    }

    #[test]
    fn done_dir_inside_watch_needs_exclude() {
        let text = MINIMAL.replace(
            "path: /srv/drop/a",
            "path: /srv/drop/a\n    done_dir: /srv/drop/a/done",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "watches[0].done_dir", "{e}");
        let ok = text.replace("done_dir:", "exclude: [\"done/**\"]\n    done_dir:");
        parse(&ok).unwrap();
    }

    #[test]
    fn provider_keys_checked_per_type() {
        let e = parse(&MINIMAL.replace("path: /srv/out", "path: /srv/out, endpoint: http://x/"))
            .unwrap_err();
        assert_eq!(e.key, "providers.out.endpoint", "{e}");
        let text = format!("{MINIMAL}  - match: {{}}\n    provider: av\n").replace(
            "providers:\n",
            "providers:\n  av: { type: apivideo, api_key: k, chunk_size: 1MiB }\n",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "providers.av.chunk_size", "{e}");
        let e = parse(&MINIMAL.replace("type: folder", "type: dropbox")).unwrap_err();
        assert_eq!(e.key, "providers.out.type", "{e}");
    }

    #[test]
    fn secrets_from_files_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "  s3cret\n").unwrap();
        let text = MINIMAL.replace(
            "providers:\n",
            &format!(
                "providers:\n  g:\n    type: gcore\n    api_key_file: {}\n",
                key_file.display()
            ),
        );
        let c = parse(&text).unwrap();
        match &c.providers["g"].kind {
            ProviderKind::Gcore { api_key, .. } => assert_eq!(api_key.expose(), "s3cret"),
            other => panic!("wrong kind {other:?}"),
        }
        let shown = serde_json::to_string(&c).unwrap();
        assert!(!shown.contains("s3cret"));
        let e =
            parse(&MINIMAL.replace("/srv/out", "\"${HOTFOLDER_TEST_SURELY_UNSET}\"")).unwrap_err();
        assert!(e.message.contains("HOTFOLDER_TEST_SURELY_UNSET"), "{e}");
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(e.key, "providers.out.path", "{e}");
    }
}
