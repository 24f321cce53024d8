//! `hotfolder sandbox`: strict local simulators of the provider protocols,
//! written from PROTOCOLS.md independently of the provider (client) code, so
//! a misreading on one side is caught by the other. It never imports
//! `crate::providers`. Faults on command: 500s before the body is read,
//! connections dropped mid-body, 429 with `Retry-After`, short lifetimes,
//! a bandwidth cap; deterministic with `--seed`. What it receives is kept
//! on disk under `--data` so tests can compare bytes.

mod apivideo;
mod body;
mod faults;
mod gcore;
mod movingimage;
mod okru;
mod records;
mod tokens;
mod tus;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use faults::Faults;

/// Command-line options of `hotfolder sandbox`.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxOptions {
    /// Address to listen on; port 0 picks a free port (the address is printed).
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: SocketAddr,
    /// Folder keeping what the sandbox received (default: a new temporary folder).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Probability (0..1) that a request gets a 500 before its body is read.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Probability (0..1) that a request's connection is dropped mid-body.
    #[arg(long, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Every Nth request gets 429 with `Retry-After: 1` (0: never).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_every: u64,
    /// The `Retry-After` value those 429s carry, as sent (servers have sent
    /// absurd ones: `1e30`).
    #[arg(long, default_value = "1")]
    pub retry_after: String,
    /// Probability (0..1) that a request is handled (the video created, the
    /// chunk stored) and then answered 502 Bad Gateway, as a proxy in front
    /// of a service does when the service's answer is lost.
    #[arg(long, default_value_t = 0.0)]
    pub gateway_rate: f64,
    /// Lifetime of tokens and upload URLs; tus uploads expire after this long without activity.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub token_ttl: Option<Duration>,
    /// Bandwidth cap for request bodies, in bytes per second (units allowed: 50MiB).
    #[arg(long)]
    pub throttle: Option<crate::config::ByteSize>,
    /// Seed for the fault dice, for reproducible runs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Require `Authorization: Bearer TOKEN` on tus requests (401 otherwise).
    #[arg(long)]
    pub tus_token: Option<String>,
    /// The api.video API key the simulator accepts.
    #[arg(long, default_value = "sandbox-api-key")]
    pub apivideo_api_key: String,
    /// The api.video delegated upload token the simulator accepts.
    #[arg(long, default_value = "sandbox-upload-token")]
    pub apivideo_upload_token: String,
    /// The Gcore API key the simulator accepts.
    #[arg(long, default_value = "sandbox-gcore-key")]
    pub gcore_api_key: String,
    /// The movingimage user name the simulator accepts.
    #[arg(long, default_value = "sandbox-user")]
    pub mi_username: String,
    /// The movingimage password the simulator accepts.
    #[arg(long, default_value = "sandbox-password")]
    pub mi_password: String,
    /// The movingimage video manager id the simulator serves.
    #[arg(long, default_value = "1234")]
    pub mi_video_manager_id: String,
    /// movingimage storage quota in bytes (code 1101 past it; units allowed).
    #[arg(long)]
    pub mi_quota: Option<crate::config::ByteSize>,
    /// The OK.ru application key the simulator accepts.
    #[arg(long, default_value = "sandbox-app-key")]
    pub okru_application_key: String,
    /// The OK.ru application secret key the simulator signs with.
    #[arg(long, default_value = "sandbox-secret-key")]
    pub okru_secret_key: String,
    /// The OK.ru access token the simulator accepts.
    #[arg(long, default_value = "sandbox-access-token")]
    pub okru_access_token: String,
}

/// A per-connection trigger: a handler that wants to simulate a dropped
/// connection notifies it, and the connection task drops the socket.
#[derive(Clone)]
pub struct ConnectionReset(pub Arc<Notify>);

impl ConnectionReset {
    /// Drop this request's connection now; never returns normally.
    pub async fn drop_connection(&self) -> axum::response::Response {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// State shared by every simulator.
pub struct Sandbox {
    /// Where received data is kept.
    pub data: PathBuf,
    /// The fault dice and counters.
    pub faults: Faults,
    /// Options as given.
    pub options: SandboxOptions,
    /// tus uploads.
    pub tus: tus::Uploads,
    /// OK.ru videos.
    pub okru: okru::Videos,
    /// api.video videos and tokens.
    pub apivideo: apivideo::ApiVideo,
    /// Gcore videos and upload tokens.
    pub gcore: gcore::Gcore,
    /// movingimage videos, tokens and upload URLs.
    pub movingimage: movingimage::Movingimage,
}

/// Run the sandbox until `shutdown` resolves; `ready` receives the bound
/// address once it listens.
///
/// # Errors
/// I/O errors binding the address or preparing the data folder.
pub async fn run(
    options: SandboxOptions,
    ready: impl FnOnce(SocketAddr, &std::path::Path),
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let data = match &options.data {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("hotfolder-sandbox-{}", std::process::id())),
    };
    std::fs::create_dir_all(data.join("tus"))?;
    std::fs::create_dir_all(data.join("okru"))?;
    std::fs::create_dir_all(data.join("apivideo"))?;
    std::fs::create_dir_all(data.join("gcore"))?;
    std::fs::create_dir_all(data.join("movingimage"))?;
    let listener = TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    let sandbox = Arc::new(Sandbox {
        faults: Faults::new(&options),
        tus: tus::Uploads::load(&data.join("tus")),
        okru: okru::Videos::load(&data.join("okru")),
        apivideo: apivideo::ApiVideo::load(&data.join("apivideo")),
        gcore: gcore::Gcore::load(&data.join("gcore")),
        movingimage: movingimage::Movingimage::load(&data.join("movingimage")),
        data: data.clone(),
        options,
    });
    let router = Router::new()
        .merge(tus::routes())
        .merge(okru::routes())
        .merge(apivideo::routes())
        .merge(gcore::routes())
        .merge(movingimage::routes())
        .route("/_sandbox/stats", axum::routing::get(faults::stats))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&sandbox),
            faults::inject,
        ))
        // Chunks are streamed to disk, never buffered: no body size limit.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(Arc::clone(&sandbox));
    ready(address, &data);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let reset = ConnectionReset(Arc::new(Notify::new()));
        let service =
            TowerToHyperService::new(router.clone().layer(axum::Extension(reset.clone())));
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = reset.0.notified() => {} // dropping the connection closes the socket mid-request
            }
        });
    }
}
