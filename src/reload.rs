//! Live reload: what a config read again while the daemon runs may change,
//! and what it may not.
//!
//! A reload (`SIGHUP`, `POST /api/reload`, `hotfolder reload`) loads the
//! file exactly as a start does; a config that does not load is refused
//! and the running one stays. One that loads replaces watches, rules,
//! providers, limits and webhooks. Keys bound when the process started
//! (where the state lives, the HTTP address, logging) keep their running
//! values until a restart, and the answer names them, so an operator is
//! never left believing a change took effect when it did not.

use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;

/// A value the daemon replaces at a reload while others keep reading it
/// (the API's and the control socket's view of the config). Cheap to clone.
#[derive(Debug)]
pub struct Shared<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T: Default> Default for Shared<T> {
    fn default() -> Self {
        Shared::new(T::default())
    }
}

impl<T> Shared<T> {
    /// Shared from now on.
    pub fn new(value: T) -> Self {
        Shared(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The value now; a reload after this does not change what was read.
    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(value) => Arc::clone(&value),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replace the value.
    pub fn set(&self, value: Arc<T>) {
        match self.0.write() {
            Ok(mut slot) => *slot = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Changes {
    /// The file read again.
    pub file: std::path::PathBuf,
    /// Changes in force now, e.g. "watch drop2 added".
    pub applied: Vec<String>,
    /// Keys whose new value waits for a restart (the running value stays).
    pub needs_restart: Vec<String>,
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied.is_empty() && self.needs_restart.is_empty() {
            write!(f, "nothing changed")?;
        } else if self.applied.is_empty() {
            write!(f, "nothing changed that applies now")?;
        } else {
            write!(f, "{}", self.applied.join("; "))?;
        }
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; needs a restart to take effect (running on the old value): {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The answer to a reload: what changed, or why the file was refused
/// (`file:line:column: ...`; the running config stays).
pub type Outcome = Result<Changes, String>;

/// How the API and the control socket ask the daemon to reload.
pub type Asker = mpsc::UnboundedSender<oneshot::Sender<Outcome>>;

/// Ask the daemon behind `asker` to reload and wait for its answer.
pub async fn ask(asker: Option<&Asker>) -> Outcome {
    let Some(asker) = asker else {
        return Err("this process does not reload its config".to_string());
    };
    let (answer, answered) = oneshot::channel();
    asker
        .send(answer)
        .map_err(|_| "the daemon is stopping".to_string())?;
    answered
        .await
        .map_err(|_| "the daemon is stopping".to_string())?
}

/// Compare the running config with the one just loaded: keys that need a
/// restart are set back to their running values in `new` (and named), and
/// every other difference is listed.
pub fn compare(running: &Config, new: &mut Config) -> Changes {
    let mut changes = Changes {
        file: new.file.clone(),
        ..Changes::default()
    };
    // Bound when the process started: the running value stays.
    macro_rules! keep_running {
        ($($key:ident),*) => {$(
            if new.$key != running.$key {
                changes.needs_restart.push(stringify!($key).into());
                new.$key = running.$key.clone();
            }
        )*};
    }
    keep_running!(state_dir, store, http, log);
    let applied = &mut changes.applied;
    named_changes(
        applied,
        "watch",
        running.watches.iter().map(|w| (&w.name, w)),
        new.watches.iter().map(|w| (&w.name, w)),
    );
    named_changes(
        applied,
        "provider",
        running.providers.iter(),
        new.providers.iter(),
    );
    if new.rules != running.rules {
        applied.push("rules changed".into());
    }
    if new.unmatched != running.unmatched {
        applied.push(format!("unmatched is now {:?}", new.unmatched).to_lowercase());
    }
    if new.workers != running.workers {
        applied.push(format!(
            "workers {} → {} (uploads under way keep their slots)",
            running.workers, new.workers
        ));
    }
    if new.bandwidth != running.bandwidth {
        applied.push(match &new.bandwidth {
            Some(schedule) => format!("bandwidth is now {schedule}"),
            None => "bandwidth limit removed".into(),
        });
    }
    if new.notify != running.notify {
        applied.push("webhooks changed".into());
    }
    if new.retry != running.retry {
        applied.push("defaults.retry changed".into());
    }
    if new.shutdown_timeout != running.shutdown_timeout {
        applied.push(format!(
            "shutdown_timeout is now {}",
            humantime::format_duration(new.shutdown_timeout)
        ));
    }
    changes
}

/// "KIND NAME added / removed / changed" for two name-keyed lists.
fn named_changes<'a, T: PartialEq + 'a>(
    applied: &mut Vec<String>,
    kind: &str,
    running: impl Iterator<Item = (&'a String, &'a T)>,
    new: impl Iterator<Item = (&'a String, &'a T)>,
) {
    let running: Vec<_> = running.collect();
    let new: Vec<_> = new.collect();
    for (name, value) in &new {
        match running.iter().find(|(n, _)| n == name) {
            None => applied.push(format!("{kind} {name} added")),
            Some((_, old)) if old != value => applied.push(format!("{kind} {name} changed")),
            Some(_) => {}
        }
    }
    for (name, _) in &running {
        if !new.iter().any(|(n, _)| n == name) {
            applied.push(format!("{kind} {name} removed"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(text: &str) -> Config {
        crate::config::load_str(Path::new("/etc/hotfolder/h.yaml"), text).expect("config")
    }

    const BASE: &str = "state_dir: /var/lib/hotfolder\n\
watches: [{ name: drop, path: /srv/drop }]\n\
providers: { archive: { type: folder, path: /srv/out } }\n\
rules: [{ match: {}, provider: archive }]\n";

    #[test]
    fn restart_only_keys_keep_their_running_values_and_are_named() {
        let running = load(BASE);
        let text = BASE.replace("/var/lib/hotfolder", "/var/lib/other")
            + "http: { listen: \"127.0.0.1:9999\" }\n";
        let mut new = load(&text);
        let changes = compare(&running, &mut new);
        assert_eq!(changes.needs_restart, vec!["state_dir", "http"]);
        assert!(changes.applied.is_empty(), "{changes:?}");
        assert_eq!(new.state_dir, running.state_dir);
        assert!(new.http.is_none());
    }

    #[test]
    fn watches_providers_rules_and_limits_are_listed() {
        let running = load(BASE);
        let text = BASE
            .replace(
                "watches: [{ name: drop, path: /srv/drop }]",
                "watches: [{ name: drop, path: /srv/drop, stable_for: 9s }, { name: two, path: /srv/two }]",
            )
            .replace("/srv/out", "/srv/out2")
            .replace("match: {}", "match: { glob: \"*.mov\" }")
            + "bandwidth: 1MiB/s\nworkers: 2\n";
        let mut new = load(&text);
        let changes = compare(&running, &mut new);
        assert_eq!(
            changes.applied,
            vec![
                "watch drop changed",
                "watch two added",
                "provider archive changed",
                "rules changed",
                "workers 4 → 2 (uploads under way keep their slots)",
                "bandwidth is now 1MiB/s",
            ]
        );
        assert!(changes.needs_restart.is_empty());
        assert_eq!(
            compare(&running, &mut load(BASE)).to_string(),
            "nothing changed"
        );
    }
}
