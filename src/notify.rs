//! Webhooks: tell someone when a file is done, failed, or being retried.
//!
//! Each event is written to the job store's outbox by the same durable
//! write that records the job's step (an outbox, so a `kill -9` loses no
//! notification), then POSTed by a task of its own, retried with the
//! shared backoff until the receiver takes it (at least once: the
//! `event_id` stays the same across redeliveries, so a receiver can drop
//! repeats). A receiver that keeps failing never holds up filing or other
//! jobs; it shows in `status`, `/metrics` and `/api/webhooks`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Config, NotifyConfig, NotifyEvent, NotifyFormat};
use crate::state::{Job, JobStore, Store, StoreError};

/// How long a receiver has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Deliveries sent at once.
const AT_ONCE: usize = 4;

/// How long a delivery being sent is kept from other senders (another
/// node of a fleet) before it counts as abandoned.
pub const SENDING_FOR: Duration = Duration::from_secs(60);

/// One event for one webhook, as the outbox keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    /// `{event_id}/{webhook}`: raising the same event again (a step redone
    /// after a crash) finds it there instead of adding another.
    pub key: String,
    /// The event's id, the same for every delivery of it.
    pub event_id: String,
    /// Which event.
    pub event: NotifyEvent,
    /// The webhook's key ([`NotifyConfig::key`]).
    pub webhook: String,
    /// The webhook's scheme and host, for a person.
    pub host: String,
    /// The event document (the JSON body; the other formats are made from it).
    pub document: serde_json::Value,
    /// Tries so far.
    pub attempts: u32,
    /// Not before then.
    pub next_at: jiff::Timestamp,
    /// Why the last try failed (a status or an error kind; never the URL).
    pub last_error: Option<String>,
}

impl Notification {
    /// Its receiver refused or missed a try (it is tried again): what
    /// status, the page and `/metrics` call failing.
    pub fn is_failing(&self) -> bool {
        self.attempts > 0
    }
}

/// A waiting event as status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitingView {
    /// The event's id.
    pub event_id: String,
    /// Which event.
    pub event: NotifyEvent,
    /// The job.
    pub job: u64,
    /// The webhook's scheme and host.
    pub webhook: String,
    /// Tries so far.
    pub attempts: u32,
    /// Next try.
    pub next_at: jiff::Timestamp,
    /// Why the last try failed.
    pub last_error: Option<String>,
}

impl WaitingView {
    /// The view of a waiting event.
    pub fn of(n: &Notification) -> Self {
        WaitingView {
            event_id: n.event_id.clone(),
            event: n.event,
            job: n.document["job"].as_u64().unwrap_or(0),
            webhook: n.host.clone(),
            attempts: n.attempts,
            next_at: n.next_at,
            last_error: n.last_error.clone(),
        }
    }
}

/// The event of a job as a document: what a receipt or an error report says.
fn document(config: &Config, job: &Job, event: NotifyEvent, event_id: &str) -> serde_json::Value {
    let delivery = job.delivery.as_ref();
    let error = job.last_error.as_ref();
    let failure = matches!(event, NotifyEvent::Failed | NotifyEvent::Retried);
    json!({
        "event_id": event_id,
        "event": event.as_str(),
        "job": job.id,
        "watch": job.watch,
        "file": job.relpath.to_string_lossy(),
        "provider": job.provider,
        "state": job.state.as_str(),
        "remote_id": delivery.map(|d| d.remote_id.as_str()),
        "url": delivery.and_then(|d| d.url.as_deref()),
        "sha256": job.sha256,
        "bytes": job.signature.size,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "duplicate_of": job.duplicate_of,
        "filed_to": job.filed_to,
        "report": job.report,
        "replaced": job.replaced,
        "reason": if failure { error.map(|e| e.reason.as_str()) } else { None },
        "status": if failure { error.and_then(|e| e.status) } else { None },
        "excerpt": if failure { error.and_then(|e| e.excerpt.as_deref()) } else { None },
        "retry_with": (event == NotifyEvent::Failed).then(|| crate::jobs::retry_command(config, job.id)),
        "at": jiff::Timestamp::now(),
    })
}

/// The one line a chat shows.
fn chat_text(document: &serde_json::Value) -> String {
    let field = |k: &str| document[k].as_str().unwrap_or("").to_string();
    let file = format!("{}/{}", field("watch"), field("file"));
    match document["event"].as_str() {
        Some("done") => format!(
            "hotfolder: done: {file} delivered to {} ({})",
            field("provider"),
            document["url"]
                .as_str()
                .or(document["remote_id"].as_str())
                .unwrap_or("an earlier upload of the same content")
        ),
        Some("failed") => format!(
            "hotfolder: FAILED: {file} to {}: {} (retry: `{}`)",
            field("provider"),
            field("reason"),
            field("retry_with")
        ),
        _ => format!(
            "hotfolder: retrying {file} to {} after attempt {}: {}",
            field("provider"),
            document["attempts"],
            field("reason")
        ),
    }
}

/// Sends the outbox's deliveries.
pub struct Notifier {
    store: Store,
    /// The webhooks and the backoff in force, replaced at a reload.
    settings: crate::reload::Shared<Settings>,
    /// Set at a reload: look once for waiting events whose webhook is gone.
    sweep: std::sync::atomic::AtomicBool,
    client: reqwest::Client,
    wake: tokio::sync::Notify,
    /// Deliveries the receivers took.
    pub delivered: AtomicU64,
    /// Tries that failed.
    pub failed_tries: AtomicU64,
}

/// What a config says about sending.
struct Settings {
    /// Every webhook of the config by its key.
    webhooks: BTreeMap<String, NotifyConfig>,
    /// The backoff between tries of one delivery.
    retry: crate::config::RetryConfig,
}

impl Settings {
    fn of(config: &Config) -> Self {
        Settings {
            webhooks: config
                .notify
                .iter()
                .chain(config.rules.iter().flat_map(|r| r.notify.iter()))
                .map(|w| (w.key(), w.clone()))
                .collect(),
            retry: config.retry,
        }
    }
}

impl Notifier {
    /// The webhooks of `config` (top level and every rule's).
    pub fn new(config: &Config, store: Store) -> Self {
        Notifier {
            store,
            settings: crate::reload::Shared::new(Settings::of(config)),
            sweep: std::sync::atomic::AtomicBool::new(false),
            // A redirect would turn the POST into a GET (an event counted as
            // taken that never was) and carry the headers to another host.
            client: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            wake: tokio::sync::Notify::new(),
            delivered: AtomicU64::new(0),
            failed_tries: AtomicU64::new(0),
        }
    }

    /// Take the webhooks of a reloaded `config`. A waiting delivery to a
    /// webhook it no longer has is dropped when its turn comes (logged).
    pub fn reconfigure(&self, config: &Config) {
        self.settings.set(Arc::new(Settings::of(config)));
        self.sweep.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Drop the waiting events whose webhook is no longer configured (after
    /// a reload; due or not, so none lingers in status or `/metrics`).
    async fn sweep_removed_webhooks(&self) {
        let settings = self.settings.get();
        let waiting = match self.store.outbox(usize::MAX).await {
            Ok(waiting) => waiting,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook outbox");
                return;
            }
        };
        for delivery in waiting {
            if !settings.webhooks.contains_key(&delivery.webhook) {
                tracing::warn!(event_id = %delivery.event_id, webhook = %delivery.host, "this webhook is no longer in the config; its delivery is dropped");
                let _ = self.store.outbox_remove(&delivery.key).await;
            }
        }
    }

    /// Whether any webhook is configured.
    pub fn is_empty(&self) -> bool {
        self.settings.get().webhooks.is_empty()
    }

    /// Record `event` of `job` in the outbox, once per webhook that wants
    /// it (the top-level ones and its rule's). Written without waiting for
    /// the disk: the caller's durable write of the job's step, which comes
    /// next, carries it.
    ///
    /// # Errors
    /// The store's failure.
    pub async fn raise(
        &self,
        config: &Config,
        job: &mut Job,
        event: NotifyEvent,
    ) -> Result<(), StoreError> {
        let rule =
            crate::config::Rule::of_job(&config.rules, job.rule, job.rule_fingerprint.as_deref());
        let wanted: Vec<&NotifyConfig> = config
            .notify
            .iter()
            .chain(rule.into_iter().flat_map(|r| r.notify.iter()))
            .filter(|w| w.events.contains(&event))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        job.events_raised += 1;
        let event_id = format!(
            "{}-{}-{}-{}",
            self.store.installation(),
            job.id,
            job.events_raised,
            event.as_str()
        );
        let document = document(config, job, event, &event_id);
        for webhook in wanted {
            let key = webhook.key();
            let delivery = Notification {
                key: format!("{event_id}/{key}"),
                event_id: event_id.clone(),
                event,
                webhook: key,
                host: webhook.host(),
                document: document.clone(),
                attempts: 0,
                next_at: jiff::Timestamp::now(),
                last_error: None,
            };
            self.store.outbox_add(&delivery, job).await?;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Send due deliveries until `shutdown`; wakes when one is raised, and
    /// every second for those whose backoff ran out.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            if self.sweep.swap(false, Ordering::SeqCst) {
                self.sweep_removed_webhooks().await;
            }
            let due = if self.is_empty() {
                // Nothing to send to (until a reload adds a webhook).
                Ok(Vec::new())
            } else {
                self.store.outbox_due(AT_ONCE * 4).await
            };
            match due {
                Ok(due) => {
                    let sends = due.into_iter().map(|d| self.send(d));
                    futures_util::stream::iter(sends)
                        .buffer_unordered(AT_ONCE)
                        .for_each(|()| async {})
                        .await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the webhook outbox"),
            }
            tokio::select! {
                () = crate::shutdown::stopped(&mut shutdown) => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One try of one delivery; the outbox learns how it went.
    async fn send(&self, mut delivery: Notification) {
        let settings = self.settings.get();
        let Some(webhook) = settings.webhooks.get(&delivery.webhook) else {
            tracing::warn!(event_id = %delivery.event_id, webhook = %delivery.host, "this webhook is no longer in the config; its delivery is dropped");
            let _ = self.store.outbox_remove(&delivery.key).await;
            return;
        };
        delivery.attempts += 1;
        let outcome = self.post(webhook, &delivery).await;
        match outcome {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event = delivery.event.as_str(), event_id = %delivery.event_id, webhook = %delivery.host, attempts = delivery.attempts, "webhook delivered");
                if let Err(e) = self.store.outbox_remove(&delivery.key).await {
                    tracing::warn!(error = %e, "cannot remove a delivered webhook event; it may be sent again");
                }
            }
            Err(why) => {
                self.failed_tries.fetch_add(1, Ordering::Relaxed);
                let backoff = crate::retry::Backoff::new(settings.retry);
                let delay = backoff.delay(delivery.attempts.min(30), None);
                tracing::warn!(event = delivery.event.as_str(), event_id = %delivery.event_id, webhook = %delivery.host, attempts = delivery.attempts, error = %why, retry_in = ?delay, "webhook not delivered; will try again");
                delivery.last_error = Some(why);
                delivery.next_at = jiff::Timestamp::now()
                    .checked_add(jiff::SignedDuration::try_from(delay).unwrap_or_default())
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                if let Err(e) = self.store.outbox_update(&delivery).await {
                    tracing::warn!(error = %e, "cannot record a webhook's failed try");
                }
            }
        }
    }

    /// POST the delivery; `Err` says why it was not taken (no secret in it).
    async fn post(&self, webhook: &NotifyConfig, delivery: &Notification) -> Result<(), String> {
        let body = match webhook.format {
            NotifyFormat::Json => serde_json::to_vec(&delivery.document),
            NotifyFormat::Slack => {
                serde_json::to_vec(&json!({ "text": chat_text(&delivery.document) }))
            }
        }
        .map_err(|e| format!("cannot encode the event: {e}"))?;
        let mut request = self
            .client
            .post(webhook.url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Hotfolder-Event", delivery.event.as_str())
            .header("X-Hotfolder-Event-Id", &delivery.event_id)
            .header(
                "X-Hotfolder-Delivery-Attempt",
                delivery.attempts.to_string(),
            );
        if let Some(secret) = &webhook.secret {
            request = request.header("X-Hotfolder-Signature", signature(secret.expose(), &body));
        }
        for (name, value) in &webhook.headers {
            request = request.header(name.as_str(), value.expose());
        }
        let answer = request.body(body).send().await.map_err(|e| {
            if e.is_timeout() {
                format!("no answer within {}s", TIMEOUT.as_secs())
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                "the request failed".to_string()
            }
        })?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err(format!(
                "answered HTTP {}, a redirect, which is not followed; put the final URL in the config",
                status.as_u16()
            ))
        } else {
            Err(format!("answered HTTP {}", status.as_u16()))
        }
    }
}

/// `sha256=<hex>`: HMAC-SHA256 of `body` keyed with `secret`, which the
/// receiver computes again to know the request came from us, unaltered.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: this never fails.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_chat_line_names_the_file_and_what_happened() {
        let doc = json!({"event": "failed", "watch": "drop", "file": "a b.mp4", "provider": "vod",
            "reason": "HTTP 403", "retry_with": "hotfolder retry 7"});
        assert_eq!(
            chat_text(&doc),
            "hotfolder: FAILED: drop/a b.mp4 to vod: HTTP 403 (retry: `hotfolder retry 7`)"
        );
    }
}
