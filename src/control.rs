//! The daemon's control socket, `<state_dir>/control.sock` (owner-only):
//! sled lets one process hold the database, so while the daemon runs,
//! `status` and `retry` ask it here. One JSON request line, one JSON answer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::jobs::JobsHandle;
use crate::jobs::{self, JobView};
use crate::pause::Scope;
use crate::state::{JobState, JobStore};

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// All jobs.
    Status,
    /// Retry these jobs (or every failed one).
    Retry {
        /// Job ids.
        jobs: Vec<u64>,
        /// Every failed job.
        failed: bool,
    },
    /// Pause (`paused: true`) or resume a scope.
    Pause {
        /// What to pause or resume.
        scope: Scope,
        /// Pause, or resume.
        paused: bool,
    },
    /// The paused scopes.
    Pauses,
    /// Webhook events waiting for their receiver.
    Webhooks,
    /// Read the config file again.
    Reload,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Job rows.
    Jobs(Vec<JobView>),
    /// Retry results: ids queued, and one message per refusal.
    Retried {
        /// Queued again.
        queued: Vec<u64>,
        /// Refusals.
        errors: Vec<String>,
    },
    /// The scopes paused now.
    Paused(Vec<Scope>),
    /// Webhook events waiting.
    Webhooks(Vec<crate::notify::WaitingView>),
    /// The config was read again and is in force.
    Reloaded(crate::reload::Changes),
    /// The request failed.
    Error(String),
}

/// The socket path for a state folder.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Remove the socket file (on shutdown).
pub fn remove_socket(state_dir: &Path) {
    let _ = std::fs::remove_file(socket_path(state_dir));
}

/// Start answering on the socket.
///
/// # Errors
/// The socket path and the I/O error.
pub fn serve(
    ctx: JobsHandle,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, (PathBuf, std::io::Error)> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(&ctx.config.get().state_dir);
    // A stale socket from a killed daemon: the store lock proves no one else runs.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| (path.clone(), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| (path.clone(), e))?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = crate::shutdown::stopped(&mut shutdown) => return,
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        tokio::spawn(answer(ctx.clone(), stream));
                    }
                }
            }
        }
    }))
}

async fn answer(ctx: JobsHandle, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error(format!("bad request: {e}")),
        Ok(Request::Status) => match jobs::status(&ctx.store, Some(&ctx.progress)).await {
            Ok(rows) => Response::Jobs(rows),
            Err(e) => Response::Error(e.to_string()),
        },
        Ok(Request::Retry { jobs: ids, failed }) => retry(&ctx, ids, failed).await,
        Ok(Request::Pause { scope, paused }) => match ctx.change_pause(scope, paused).await {
            Ok(scopes) => Response::Paused(scopes.into_iter().collect()),
            Err(e) => Response::Error(e.to_string()),
        },
        Ok(Request::Pauses) => Response::Paused(ctx.pauses.current().into_iter().collect()),
        Ok(Request::Webhooks) => match ctx.store.outbox(1000).await {
            Ok(waiting) => {
                Response::Webhooks(waiting.iter().map(crate::notify::WaitingView::of).collect())
            }
            Err(e) => Response::Error(e.to_string()),
        },
        Ok(Request::Reload) => match crate::reload::ask(ctx.reload.as_ref()).await {
            Ok(changes) => Response::Reloaded(changes),
            Err(why) => Response::Error(why),
        },
    };
    if let Ok(mut bytes) = serde_json::to_vec(&response) {
        bytes.push(b'\n');
        let _ = write.write_all(&bytes).await;
    }
}

async fn retry(ctx: &JobsHandle, mut ids: Vec<u64>, failed: bool) -> Response {
    if failed {
        match ctx.store.all().await {
            Ok(all) => ids.extend(
                all.iter()
                    .filter(|j| j.state == JobState::Failed)
                    .map(|j| j.id),
            ),
            Err(e) => return Response::Error(e.to_string()),
        }
    }
    let mut queued = Vec::new();
    let mut errors = Vec::new();
    for id in ids {
        match jobs::retry(&ctx.store, &ctx.config.get(), &ctx.held, id).await {
            Ok(job) => {
                queued.push(id);
                ctx.queue(job);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Response::Retried { queued, errors }
}

/// Ask a running daemon; `Ok(None)` when none answers on the socket.
///
/// # Errors
/// A daemon that answers but not in the expected form.
pub async fn ask(state_dir: &Path, request: &Request) -> std::io::Result<Option<Response>> {
    let Ok(stream) = UnixStream::connect(socket_path(state_dir)).await else {
        return Ok(None);
    };
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(request)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(std::io::Error::other)
}
