//! The stop signal every long-running task listens to: a `watch` channel
//! that turns `true` once the daemon stops taking work.

use tokio::sync::watch;

/// Resolves once `signal` turns true (or its sender is gone).
pub async fn stopped(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|stop| *stop).await;
}
