//! The command line: clap arguments in one place, turned into calls on the
//! library. Errors are split by kind so `main` can pick the exit code:
//! 2 for usage and configuration, 1 for run-time failures.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, LogFormat};
use crate::control::{self, Request, Response};
use crate::jobs::{self, JobView};
use crate::pause::Scope;
use crate::route::{FileFacts, Router};
use crate::state::{JobState, JobStore, NodeView, Store};

/// hotfolder: watch folders, upload finished video files resumably, file them into done/ or failed/.
#[derive(Debug, Parser)]
#[command(name = "hotfolder", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The config file, for every command that reads one (not `sandbox`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFile {
    /// Config file (YAML).
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        env = "HOTFOLDER_CONFIG",
        default_value = "hotfolder.yaml"
    )]
    pub path: PathBuf,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground: watch, route, upload, file. Logs go to stderr.
    Run {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Validate the config and print it resolved (secrets masked); for each PATH, show whether the daemon takes it (and why not), and the watch, rule, provider, metadata and visibility it would get.
    Check {
        #[command(flatten)]
        config: ConfigFile,
        /// Files to dry-run through the daemon's decision and the routing rules.
        paths: Vec<PathBuf>,
    },
    /// One row per job: id, file, provider, state, progress, attempts, last error.
    Status {
        #[command(flatten)]
        config: ConfigFile,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Upload files once, with a progress bar; resumable (run it again after an interruption). No watching, no moving. The config needs only `providers:` and `state_dir`.
    Upload {
        #[command(flatten)]
        config: ConfigFile,
        /// Provider name from the config.
        #[arg(long)]
        provider: String,
        /// Files to upload.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Local simulators of the provider protocols, with fault injection, for trying a config and for tests.
    Sandbox(Box<crate::sandbox::SandboxOptions>),
    /// Put failed jobs back in the queue, moving their files back from failed/.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["jobs", "failed"])))]
    Retry {
        #[command(flatten)]
        config: ConfigFile,
        /// Job ids (see `hotfolder status`).
        #[arg(value_name = "JOB")]
        jobs: Vec<u64>,
        /// Retry every failed job.
        #[arg(long, conflicts_with = "jobs")]
        failed: bool,
    },
    /// Pause uploads (of one provider, one watch, or everything): each finishes the chunk in flight and waits; files keep being found and queued. Kept across restarts until `resume`.
    Pause {
        #[command(flatten)]
        config: ConfigFile,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Resume what `pause` paused (the same provider, watch, or everything).
    Resume {
        #[command(flatten)]
        config: ConfigFile,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Make the running daemon read its config file again (as SIGHUP does). A config that does not load is refused with where the mistake is, and the daemon keeps the one it runs.
    Reload {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// The job store itself.
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
}

/// Which uploads `pause` and `resume` act on: neither option means everything.
#[derive(Debug, clap::Args)]
pub struct ScopeArgs {
    /// Only the uploads to this provider (its name in the config).
    #[arg(long, value_name = "NAME", conflicts_with = "watch")]
    provider: Option<String>,
    /// Only the uploads of files from this watch (its name in the config).
    #[arg(long, value_name = "NAME")]
    watch: Option<String>,
}

/// `hotfolder store ...`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy a single box's history (finished jobs, delivered fingerprints) into the PostgreSQL store of a fleet, so the fleet keeps its duplicate detection. Stop the box first; its sled database is only read.
    Migrate {
        #[command(flatten)]
        config: ConfigFile,
        /// The box's state_dir (the folder holding its `db`).
        #[arg(long, value_name = "STATE_DIR")]
        from_sled: PathBuf,
    },
}

/// A failure, by the exit code it deserves.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Configuration problem: exit 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Wrong use of the command: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Anything at run time: exit 1.
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

/// Run the parsed command line.
///
/// # Errors
/// [`CliError`] with the exit code to use.
pub fn execute(cli: Cli) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Command::Sandbox(options) = cli.command {
        return runtime.block_on(sandbox(*options));
    }
    let load = |file: &ConfigFile| config::load(&file.path);
    match cli.command {
        Command::Sandbox(_) => Ok(()),
        Command::Upload {
            config,
            provider,
            files,
        } => {
            let config = load(&config)?;
            init_logging(&config);
            runtime.block_on(upload(config, &provider, &files))
        }
        Command::Run { config } => {
            let config = load(&config)?;
            config.require_watches()?;
            init_logging(&config);
            runtime.block_on(run(config))
        }
        Command::Check { config, paths } => check(&load(&config)?, &paths),
        Command::Status { config, json } => runtime.block_on(status(&load(&config)?, json)),
        Command::Retry {
            config,
            jobs,
            failed,
        } => runtime.block_on(retry(&load(&config)?, jobs, failed)),
        Command::Pause { config, scope } => {
            runtime.block_on(pause_or_resume(&load(&config)?, scope, true))
        }
        Command::Resume { config, scope } => {
            runtime.block_on(pause_or_resume(&load(&config)?, scope, false))
        }
        Command::Reload { config } => runtime.block_on(reload(&config.path)),
        Command::Store {
            action: StoreCommand::Migrate { config, from_sled },
        } => runtime.block_on(migrate_from_sled(&load(&config)?, &from_sled)),
    }
}

/// The log filter: `RUST_LOG` if set, else `log.level`. A bare level
/// (`debug`) is hotfolder's own, with dependencies at `warn` (sled's and
/// hyper's debug output would drown ours); a full directive
/// (`hotfolder=debug,reqwest=info`) is taken as written.
pub fn log_filter(level: &str, rust_log: Option<&str>) -> String {
    if let Some(directive) = rust_log.filter(|d| !d.trim().is_empty()) {
        return directive.to_string();
    }
    let bare = level.trim().to_ascii_lowercase();
    if matches!(bare.as_str(), "trace" | "debug" | "info" | "warn" | "error") {
        format!("warn,hotfolder={bare}")
    } else {
        level.to_string()
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let rust_log = std::env::var("RUST_LOG").ok();
    let directive = log_filter(&config.log.level, rust_log.as_deref());
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|e| {
        eprintln!("warning: log filter {directive:?} is not valid ({e}); using info");
        EnvFilter::new("warn,hotfolder=info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        // Colour only on a terminal: journals and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(|| OneLinePerEvent(std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A log writer that keeps each event on one line: a newline or carriage
/// return inside it (a file named `a\nb.mp4`, an error quoting one) is
/// written as `\n` / `\r`, so no file name can forge a log line. The
/// formatter hands over one whole event per write.
struct OneLinePerEvent<W>(W);

impl<W: std::io::Write> std::io::Write for OneLinePerEvent<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&one_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `event` with every line break but a final newline escaped.
fn one_line(event: &[u8]) -> Vec<u8> {
    let (body, end) = match event.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (event, &b""[..]),
    };
    let mut out = Vec::with_capacity(event.len() + 8);
    for &byte in body {
        match byte {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(byte),
        }
    }
    out.extend_from_slice(end);
    out
}

/// Resolves on the first SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot listen for signals; stop with kill -9 only");
            std::future::pending::<()>().await;
        }
    }
}

async fn run(config: Config) -> Result<(), CliError> {
    crate::daemon::run(config, stop_signal())
        .await
        .map_err(|e| CliError::Runtime(anyhow::Error::new(e)))
}

async fn sandbox(options: crate::sandbox::SandboxOptions) -> Result<(), CliError> {
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    let listen = options.listen;
    crate::sandbox::run(
        options,
        |address, data| {
            println!("sandbox listening on http://{address} (tus: http://{address}/tus/files/); data in {}", data.display());
            tracing::info!(%address, data = %data.display(), "sandbox listening");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
        stop_signal(),
    )
    .await
    .with_context(|| format!("sandbox on {listen}"))
    .map_err(CliError::Runtime)
}

async fn upload(config: Config, provider: &str, files: &[PathBuf]) -> Result<(), CliError> {
    if !config.providers.contains_key(provider) {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        return Err(CliError::Usage(format!(
            "no provider named {provider:?} in {}; defined: {}",
            config.file.display(),
            known.join(", ")
        )));
    }
    let outcomes = crate::oneshot::upload(config, provider, files, stop_signal()).await?;
    let mut missing = 0;
    for outcome in &outcomes {
        println!("{}: {}", outcome.file.display(), outcome.message);
        if !outcome.arrived {
            missing += 1;
        }
    }
    if missing > 0 {
        return Err(CliError::Runtime(anyhow::anyhow!(
            "{missing} of {} files did not arrive",
            outcomes.len()
        )));
    }
    Ok(())
}

fn check(config: &Config, paths: &[PathBuf]) -> Result<(), CliError> {
    let resolved = serde_yaml::to_string(config).context("cannot print the config")?;
    println!(
        "# {} is valid; resolved (secrets masked):\n{resolved}",
        config.file.display()
    );
    let router = Router::new(config);
    let mut unroutable = 0;
    for path in paths {
        match explain(config, &router, path) {
            Ok(text) => println!("{text}"),
            Err(text) => {
                unroutable += 1;
                println!("{}: {text}", path.display());
            }
        }
    }
    if unroutable > 0 {
        return Err(CliError::Usage(format!(
            "{unroutable} of {} paths would not be taken",
            paths.len()
        )));
    }
    Ok(())
}

fn explain(config: &Config, router: &Router, path: &Path) -> Result<String, String> {
    // The path as given, made absolute through its folder only: a link is
    // judged as the link it is, never as its target.
    let absolute = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            parent
                .canonicalize()
                .map(|p| p.join(name))
                .map_err(|e| format!("cannot open {}: {e}", parent.display()))?
        }
        _ => path
            .canonicalize()
            .map_err(|e| format!("cannot open: {e}"))?,
    };
    if std::fs::symlink_metadata(&absolute).is_err() {
        return Err("does not exist".into());
    }
    let (watch, relpath) = config
        .watches
        .iter()
        .find_map(|w| {
            let root = w.path.canonicalize().ok()?;
            absolute
                .strip_prefix(&root)
                .ok()
                .map(|rel| (w, rel.to_path_buf()))
        })
        .ok_or_else(|| "is not inside any watch folder".to_string())?;
    let skip_roots: Vec<PathBuf> = config
        .watches
        .iter()
        .flat_map(|w| [&w.done_dir, &w.failed_dir])
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .collect();
    crate::admission::judge(watch, &skip_roots, &absolute)
        .map_err(|why| format!("not taken by watch {}: {why}", watch.name))?;
    let meta = std::fs::metadata(&absolute).map_err(|e| format!("cannot read: {e}"))?;
    let facts = FileFacts {
        watch: &watch.name,
        relpath: &relpath,
        path: &absolute,
        size: meta.len(),
        mtime: meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH),
        sidecars: None,
    };
    match router.route(&facts) {
        Err(e) => Err(e.0),
        Ok(None) => Err(format!(
            "watch {}: no rule matches (unmatched: {:?})",
            watch.name,
            router.unmatched()
        )),
        Ok(Some(route)) => {
            let metadata = serde_json::to_string(&route.metadata).unwrap_or_default();
            let sidecar = route
                .sidecar
                .map(|s| format!("\n  sidecar: {}", s.display()))
                .unwrap_or_default();
            let visibility = config
                .providers
                .get(&route.provider)
                .and_then(|p| crate::providers::visibility(p, &route.metadata))
                .map(|v| format!("\n  visibility: {v}"))
                .unwrap_or_default();
            Ok(format!(
                "{}\n  watch: {}\n  rule: {}\n  provider: {}\n  metadata: {metadata}{sidecar}{visibility}",
                path.display(),
                watch.name,
                route.rule,
                route.provider
            ))
        }
    }
}

/// Open the store for an offline command, explaining a lock held by a daemon
/// that did not answer on its socket.
async fn open_store(config: &Config) -> Result<Store, CliError> {
    Store::open_configured(config)
        .await
        .map_err(|e| CliError::Runtime(anyhow::Error::new(e)))
}

/// Ask the daemon running on this state folder, keeping the answer
/// `expected` picks out; `Ok(None)` when no daemon answers (the caller
/// then reads the store itself). The daemon's error, or an answer of
/// another kind, is the command's error.
async fn ask_daemon<T>(
    config: &Config,
    request: &Request,
    expected: impl FnOnce(Response) -> Option<T>,
) -> Result<Option<T>, CliError> {
    let answer = control::ask(&config.state_dir, request)
        .await
        .context("the running daemon gave an unreadable answer")?;
    match answer {
        None => Ok(None),
        Some(Response::Error(e)) => Err(CliError::Runtime(anyhow::anyhow!("the daemon said: {e}"))),
        Some(other) => expected(other).map(Some).ok_or_else(|| {
            CliError::Runtime(anyhow::anyhow!("the daemon answered something else"))
        }),
    }
}

async fn status(config: &Config, json: bool) -> Result<(), CliError> {
    // Opened when no daemon answers, or for a fleet's nodes; at most once.
    let mut store = None;
    let rows = match ask_daemon(config, &Request::Status, |r| match r {
        Response::Jobs(rows) => Some(rows),
        _ => None,
    })
    .await?
    {
        Some(rows) => rows,
        None => jobs::status(store.insert(open_store(config).await?), None)
            .await
            .context("cannot read jobs")?,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("cannot print JSON")?
        );
    } else {
        print!("{}", table(&rows));
        let paused = match &store {
            Some(store) => crate::pause::load(store)
                .await
                .context("cannot read the paused scopes")?
                .into_iter()
                .collect(),
            None => ask_daemon(config, &Request::Pauses, |r| match r {
                Response::Paused(scopes) => Some(scopes),
                _ => None,
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default(),
        };
        let waiting = match &store {
            Some(store) => store
                .outbox(1000)
                .await
                .context("cannot read the webhook outbox")?
                .iter()
                .map(crate::notify::WaitingView::of)
                .collect(),
            None => ask_daemon(config, &Request::Webhooks, |r| match r {
                Response::Webhooks(waiting) => Some(waiting),
                _ => None,
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default(),
        };
        print!("{}", webhooks_table(&waiting));
        if !paused.is_empty() {
            let names: Vec<String> = paused.iter().map(ToString::to_string).collect();
            println!(
                "\npaused: {} (uploads wait; `hotfolder resume` lets them go on)",
                names.join(", ")
            );
        }
        // A fleet's nodes come from the shared database, which any number
        // of readers may open beside the daemons.
        if config.store.node().is_some() {
            let store = match store {
                Some(store) => store,
                None => open_store(config).await?,
            };
            let nodes = store
                .nodes()
                .await
                .context("cannot read the fleet's nodes")?;
            print!("\n{}", nodes_table(&nodes));
        }
    }
    Ok(())
}

/// Webhook events still waiting: how many, and the ones that failed a try
/// with the reason (the webhook by scheme and host only: a URL can be a
/// credential).
fn webhooks_table(waiting: &[crate::notify::WaitingView]) -> String {
    if waiting.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nwebhook events waiting: {} (they are tried again until taken)\n",
        waiting.len()
    );
    for w in waiting.iter().filter(|w| w.attempts > 0).take(10) {
        out.push_str(&format!(
            "  job {} {} to {}: {} tries, last: {}; next at {}\n",
            w.job,
            w.event.as_str(),
            w.webhook,
            w.attempts,
            w.last_error.as_deref().unwrap_or("-"),
            w.next_at.strftime("%H:%M:%S")
        ));
    }
    out
}

fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

fn progress_cell(row: &JobView) -> String {
    let percent = if row.size == 0 {
        100.0
    } else {
        row.bytes_acknowledged as f64 * 100.0 / row.size as f64
    };
    let mut cell = format!("{percent:.0}% of {}", human_bytes(row.size as f64));
    if let Some(rate) = row.bytes_per_second {
        cell.push_str(&format!(" {}/s", human_bytes(rate)));
    }
    if let Some(eta) = row.eta_seconds {
        cell.push_str(&format!(
            " ETA {}",
            humantime::format_duration(std::time::Duration::from_secs(eta as u64))
        ));
    }
    cell
}

/// Lay out `rows` under `header`, columns padded to their display width (a
/// CJK character takes two cells); the last column is left unpadded.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    use unicode_width::UnicodeWidthStr;
    let last = header.len().saturating_sub(1);
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(last) {
            widths[i] = widths[i].max(cell.width());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        for (i, col) in row.iter().enumerate() {
            out.push_str(col);
            if i < last {
                out.push_str(&" ".repeat(widths[i].saturating_sub(col.width()) + 2));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    }
    out
}

/// The `status` table. A NODE column appears when jobs run in a fleet.
pub fn table(rows: &[JobView]) -> String {
    let fleet = rows.iter().any(|r| r.node.is_some());
    let mut header = vec!["ID", "FILE", "PROVIDER", "STATE"];
    if fleet {
        header.push("NODE");
    }
    header.extend(["PROGRESS", "ATTEMPTS", "LAST ERROR"]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.id.to_string(),
                if r.watch.is_empty() {
                    r.file.clone()
                } else {
                    format!("{}/{}", r.watch, r.file)
                },
                r.provider.clone(),
                r.state.clone(),
            ];
            if fleet {
                row.push(r.node.clone().unwrap_or_else(|| "-".into()));
            }
            row.extend([
                progress_cell(r),
                r.attempts.to_string(),
                r.last_error.clone().unwrap_or_default(),
            ]);
            row
        })
        .collect();
    let mut out = columns(&header, &cells);
    if rows.is_empty() {
        out.push_str("(no jobs yet)\n");
    }
    out
}

/// The fleet's nodes under the jobs: who is alive and what each holds.
pub fn nodes_table(nodes: &[NodeView]) -> String {
    let cells: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                format!("{:.0} s ago", n.heartbeat_seconds_ago),
                n.started_at.clone(),
                n.jobs_held.to_string(),
            ]
        })
        .collect();
    columns(&["NODE", "HEARTBEAT", "STARTED", "JOBS HELD"], &cells)
}

async fn migrate_from_sled(config: &Config, state_dir: &Path) -> Result<(), CliError> {
    let crate::config::StoreConfig::Postgres { url, .. } = &config.store else {
        return Err(CliError::Usage(
            "the config's store is sled: `store migrate` moves a box's history into a fleet's database; give it the fleet's config, with store: { type: postgres, url: ... }".into(),
        ));
    };
    let fleet = crate::state::PgStore::open(url.expose())
        .await
        .map_err(|e| CliError::Runtime(anyhow::Error::new(e)))?;
    let moved = crate::state::migrate::from_sled(state_dir, &fleet)
        .await
        .map_err(|e| CliError::Runtime(anyhow::Error::new(e)))?;
    match moved {
        crate::state::Imported::Moved { jobs, fingerprints } => println!(
            "moved {jobs} finished jobs and {fingerprints} delivered fingerprints from {} into the fleet's database (with new job ids); the box's database was only read",
            state_dir.display()
        ),
        crate::state::Imported::AlreadyMoved { at } => println!(
            "the history in {} was already moved on {at}; nothing more to do",
            state_dir.display()
        ),
    }
    Ok(())
}

/// Pause or resume through the running daemon, or (none runs here) in the
/// store, where the daemon finds it at its start (and a fleet's nodes at
/// their next heartbeat).
async fn pause_or_resume(config: &Config, scope: ScopeArgs, paused: bool) -> Result<(), CliError> {
    let scope = Scope::named(scope.provider, scope.watch)
        .and_then(|scope| scope.check(config).map(|()| scope))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let request = Request::Pause {
        scope: scope.clone(),
        paused,
    };
    let answer = ask_daemon(config, &request, |r| match r {
        Response::Paused(scopes) => Some(scopes),
        _ => None,
    })
    .await?;
    let scopes: Vec<Scope> = match answer {
        Some(scopes) => scopes,
        None => {
            let store = open_store(config).await?;
            crate::pause::change(&store, config, None, scope.clone(), paused)
                .await
                .context("cannot record it")?
                .into_iter()
                .collect()
        }
    };
    println!("{} {scope}", if paused { "paused" } else { "resumed" });
    if !scopes.is_empty() {
        let names: Vec<String> = scopes.iter().map(ToString::to_string).collect();
        println!("paused now: {}", names.join(", "));
    }
    Ok(())
}

/// Ask the daemon whose config is `file` to read it again, and say what
/// changed. The daemon does the checking: the file may use variables only
/// its service sets (`EnvironmentFile=`), so this reads no more of it than
/// where the daemon listens. A refusal is a configuration error (exit 2),
/// as it is for a start.
async fn reload(file: &Path) -> Result<(), CliError> {
    let not_reloaded =
        |why: String| format!("{why}\nnot reloaded: the running daemon keeps the config it has");
    let loaded = crate::config::load(file);
    let state_dir = match &loaded {
        Ok(config) => config.state_dir.clone(),
        Err(e) => state_dir_of(file).ok_or_else(|| CliError::Usage(not_reloaded(e.to_string())))?,
    };
    let answer = control::ask(&state_dir, &Request::Reload)
        .await
        .context("the running daemon gave an unreadable answer")?;
    match answer {
        Some(Response::Reloaded(changes)) => {
            println!("reloaded {}: {changes}", changes.file.display());
            let same = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            if same(&changes.file) != same(file) {
                return Err(CliError::Usage(format!(
                    "the daemon runs on {}, not {}: it read its own file again; edit that one, or restart it with -c {}",
                    changes.file.display(),
                    file.display(),
                    file.display()
                )));
            }
            Ok(())
        }
        Some(Response::Error(why)) => Err(CliError::Usage(not_reloaded(why))),
        Some(_) => Err(CliError::Runtime(anyhow::anyhow!(
            "the daemon answered something else"
        ))),
        None => {
            let socket = control::socket_path(&state_dir);
            Err(match loaded {
                Err(e) => CliError::Usage(format!(
                    "{e}\n(and no daemon answers on {})",
                    socket.display()
                )),
                Ok(_) => CliError::Runtime(anyhow::anyhow!(
                    "no daemon answers on {}; is its state_dir another one (a changed state_dir needs a restart), or is it stopped? `hotfolder run` reads the config when it starts",
                    socket.display()
                )),
            })
        }
    }
}

/// `state_dir` of the config `file`, read alone (relative to the file's
/// folder, `./state` when not set), for finding the daemon when the rest
/// does not load here.
fn state_dir_of(file: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(file).ok()?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let raw = match yaml.get("state_dir") {
        None => "./state".to_string(),
        Some(value) => value.as_str()?.to_string(),
    };
    let dir = PathBuf::from(crate::config::values::interpolate(&raw).ok()?);
    if dir.is_absolute() {
        return Some(dir);
    }
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(base).ok()?;
    Some(base.join(dir))
}

async fn retry(config: &Config, ids: Vec<u64>, failed: bool) -> Result<(), CliError> {
    let request = Request::Retry {
        jobs: ids.clone(),
        failed,
    };
    let answer = ask_daemon(config, &request, |r| match r {
        Response::Retried { queued, errors } => Some((queued, errors)),
        _ => None,
    })
    .await?;
    let (queued, errors) = match answer {
        Some(answer) => answer,
        None => {
            let store = open_store(config).await?;
            let mut ids = ids;
            if failed {
                let all = store.all().await.context("cannot read jobs")?;
                ids.extend(
                    all.iter()
                        .filter(|j| j.state == JobState::Failed)
                        .map(|j| j.id),
                );
            }
            let mut queued = Vec::new();
            let mut errors = Vec::new();
            for id in ids {
                // No daemon runs here: a running node of the fleet takes
                // the job (a single box's daemon finds it at its start).
                let retried = match jobs::retry(&store, config, &Default::default(), id).await {
                    Ok(job) => store.release_claim(&job).await.map_err(Into::into),
                    Err(e) => Err(e),
                };
                match retried {
                    Ok(()) => queued.push(id),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            store
                .flush()
                .await
                .context("cannot flush the state database")?;
            (queued, errors)
        }
    };
    for id in &queued {
        println!("job {id} queued again");
    }
    if queued.is_empty() && errors.is_empty() {
        println!("no failed jobs");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Runtime(anyhow::anyhow!(errors.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn a_line_break_inside_an_event_is_escaped() {
        assert_eq!(
            super::one_line(b"new job file=two\nlines.mp4\r x\n"),
            b"new job file=two\\nlines.mp4\\r x\n".to_vec()
        );
        assert_eq!(super::one_line(b"plain\n"), b"plain\n".to_vec());
    }

    fn view(id: u64, file: &str, state: &str, last_error: Option<&str>) -> crate::jobs::JobView {
        crate::jobs::JobView {
            id,
            watch: "drop".into(),
            file: file.into(),
            provider: "archive".into(),
            state: state.into(),
            bytes_acknowledged: 0,
            size: 10,
            bytes_per_second: None,
            eta_seconds: None,
            attempts: 1,
            last_error: last_error.map(str::to_string),
            filed_to: None,
            remote_id: None,
            duplicate_of: None,
            node: None,
            bytes_sent: 0,
        }
    }

    #[test]
    fn the_status_table_aligns_wide_characters() {
        use unicode_width::UnicodeWidthStr;
        let table = super::table(&[
            view(1, "新闻/晚间新闻.mp4", "queued", None),
            view(2, "plain.mp4", "queued", None),
        ]);
        let provider_columns: Vec<usize> = table
            .lines()
            .map(|line| {
                let at = line
                    .find("archive")
                    .or_else(|| line.find("PROVIDER"))
                    .unwrap();
                line[..at].width()
            })
            .collect();
        assert!(
            provider_columns.windows(2).all(|w| w[0] == w[1]),
            "{provider_columns:?}\n{table}"
        );
    }

    #[test]
    fn a_bare_level_is_ours_and_a_directive_is_taken_as_written() {
        assert_eq!(log_filter("debug", None), "warn,hotfolder=debug");
        assert_eq!(log_filter(" INFO ", None), "warn,hotfolder=info");
        assert_eq!(
            log_filter("hotfolder=debug,reqwest=info", None),
            "hotfolder=debug,reqwest=info"
        );
        assert_eq!(log_filter("debug", Some("sled=trace")), "sled=trace");
        assert_eq!(log_filter("debug", Some("  ")), "warn,hotfolder=debug");
    }
}
