//! Pause and resume: an operator stops the uploads of one provider, one
//! watch or everything (maintenance, a provider's outage, a link needed for
//! something else) without stopping the daemon. A paused scope finishes the
//! chunk in flight, checkpoints it and takes no new upload; files keep being
//! detected and queued, and jobs that already delivered are still filed.
//! Pauses are kept in the job store, so they survive a restart (and, in a
//! fleet, hold for every node).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Config;
use crate::state::{JobStore, Store, StoreError};

/// The store's setting that holds the paused scopes (a JSON list).
const SETTING: &str = "pauses";

/// What a pause covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every upload.
    All,
    /// The uploads to one provider (by its name in the config).
    Provider(String),
    /// The uploads of files from one watch (by its name).
    Watch(String),
}

impl Scope {
    /// The scope a command line or an API request names: a provider, a
    /// watch, or (neither) everything.
    ///
    /// # Errors
    /// [`PauseError::Ambiguous`] when both are given.
    pub fn named(provider: Option<String>, watch: Option<String>) -> Result<Self, PauseError> {
        match (provider, watch) {
            (Some(_), Some(_)) => Err(PauseError::Ambiguous),
            (Some(p), None) => Ok(Scope::Provider(p)),
            (None, Some(w)) => Ok(Scope::Watch(w)),
            (None, None) => Ok(Scope::All),
        }
    }

    /// Whether this scope covers a job of `watch` uploading to `provider`.
    pub fn covers(&self, watch: &str, provider: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Provider(p) => p == provider,
            Scope::Watch(w) => w == watch,
        }
    }

    /// Refuse a scope that names no provider or watch of `config`: a typo
    /// would otherwise pause nothing and look as if it worked.
    ///
    /// # Errors
    /// [`PauseError::Unknown`] naming the known ones.
    pub fn check(&self, config: &Config) -> Result<(), PauseError> {
        let (kind, name, known): (&str, &str, Vec<&str>) = match self {
            Scope::All => return Ok(()),
            Scope::Provider(p) => (
                "provider",
                p,
                config.providers.keys().map(String::as_str).collect(),
            ),
            Scope::Watch(w) => (
                "watch",
                w,
                config.watches.iter().map(|w| w.name.as_str()).collect(),
            ),
        };
        if known.contains(&name) {
            Ok(())
        } else {
            Err(PauseError::Unknown {
                kind,
                name: name.to_string(),
                known: known.join(", "),
            })
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("everything"),
            Scope::Provider(p) => write!(f, "provider {p}"),
            Scope::Watch(w) => write!(f, "watch {w}"),
        }
    }
}

/// Why a pause or resume was refused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Both a provider and a watch were named.
    #[error("name a provider or a watch, not both (or neither, for everything)")]
    Ambiguous,
    /// The name is not in the config.
    #[error("no {kind} named {name:?} in the config (known: {known})")]
    Unknown {
        /// `provider` or `watch`.
        kind: &'static str,
        /// The name given.
        name: String,
        /// The names the config has.
        known: String,
    },
    /// The store could not keep it.
    #[error("cannot record the pause: {0}")]
    Store(#[from] StoreError),
}

/// The scopes paused now, shared by every job task of a daemon; a change
/// wakes the jobs waiting on it. Cheap to clone.
#[derive(Clone)]
pub struct Pauses {
    scopes: Arc<watch::Sender<BTreeSet<Scope>>>,
    /// Jobs a pause stopped: their tasks ended (a waiting task would hold
    /// a slot that other, unpaused work needs); they are offered again
    /// when the paused scopes change.
    parked: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Default for Pauses {
    fn default() -> Self {
        Pauses::new(BTreeSet::new())
    }
}

impl Pauses {
    /// Start with these scopes paused.
    pub fn new(scopes: BTreeSet<Scope>) -> Self {
        Pauses {
            scopes: Arc::new(watch::Sender::new(scopes)),
            parked: Arc::default(),
        }
    }

    /// The scopes paused now.
    pub fn current(&self) -> BTreeSet<Scope> {
        self.scopes.borrow().clone()
    }

    /// The paused scope that holds a job of `watch` uploading to
    /// `provider`, if any.
    pub fn holding(&self, watch: &str, provider: &str) -> Option<Scope> {
        self.scopes
            .borrow()
            .iter()
            .find(|s| s.covers(watch, provider))
            .cloned()
    }

    /// Take these scopes as the paused ones (another node changed them).
    pub fn replace(&self, scopes: BTreeSet<Scope>) {
        self.scopes.send_if_modified(|now| {
            let changed = *now != scopes;
            *now = scopes;
            changed
        });
    }

    /// Set job `id` aside until the paused scopes change.
    pub fn park(&self, id: u64) {
        if let Ok(mut parked) = self.parked.lock() {
            parked.push(id);
        }
    }

    /// The jobs set aside so far (they are no longer set aside).
    pub fn take_parked(&self) -> Vec<u64> {
        self.parked
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// A receiver that sees every change of the paused scopes.
    pub fn changes(&self) -> watch::Receiver<BTreeSet<Scope>> {
        self.scopes.subscribe()
    }
}

/// The paused scopes the store holds.
///
/// # Errors
/// Database failure, or a setting that is not a list of scopes.
pub async fn load(store: &Store) -> Result<BTreeSet<Scope>, StoreError> {
    parse(store.setting(SETTING).await?.as_deref())
}

/// The scopes a stored setting lists (none when it is not set).
fn parse(stored: Option<&str>) -> Result<BTreeSet<Scope>, StoreError> {
    match stored {
        None => Ok(BTreeSet::new()),
        Some(text) => serde_json::from_str(text).map_err(|source| StoreError::Decode {
            key: SETTING.into(),
            source,
        }),
    }
}

/// Pause (`paused`) or resume `scope`: checked against the config, kept in
/// the store, then applied to `live` (the running daemon's, if any).
/// Resuming one provider while everything is paused leaves everything
/// paused: each scope is paused and resumed on its own. Answers the
/// scopes paused afterwards.
///
/// # Errors
/// An unknown name, or the store's failure.
pub async fn change(
    store: &Store,
    config: &Config,
    live: Option<&Pauses>,
    scope: Scope,
    paused: bool,
) -> Result<BTreeSet<Scope>, PauseError> {
    scope.check(config)?;
    let scopes = update(store, live, |scopes| {
        let changed = if paused {
            scopes.insert(scope.clone())
        } else {
            scopes.remove(&scope)
        };
        if changed {
            tracing::info!(scope = %scope, "{}", if paused { "paused" } else { "resumed" });
        }
        changed
    })
    .await?;
    Ok(scopes)
}

/// Resume the paused providers and watches that `config` no longer has (a
/// reload removed them): their jobs would otherwise wait for a `resume`
/// that can no longer name them. Answers the scopes resumed.
///
/// # Errors
/// The store's failure.
pub async fn forget_unknown(
    store: &Store,
    config: &Config,
    live: Option<&Pauses>,
) -> Result<Vec<Scope>, StoreError> {
    let mut forgotten = Vec::new();
    update(store, live, |scopes| {
        forgotten = scopes
            .iter()
            .filter(|s| s.check(config).is_err())
            .cloned()
            .collect();
        scopes.retain(|s| s.check(config).is_ok());
        !forgotten.is_empty()
    })
    .await?;
    Ok(forgotten)
}

/// Apply `edit` to the stored scopes (it answers whether it changed them),
/// then give the result to `live`. Written only if nobody wrote in between
/// (another node, another `hotfolder pause`); else read and edited again.
async fn update(
    store: &Store,
    live: Option<&Pauses>,
    mut edit: impl FnMut(&mut BTreeSet<Scope>) -> bool,
) -> Result<BTreeSet<Scope>, StoreError> {
    // One change at a time in this process, so that the running daemon's
    // view is replaced in the order the changes were stored.
    static CHANGING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = CHANGING.lock().await;
    let scopes = loop {
        let stored = store.setting(SETTING).await?;
        let mut scopes = parse(stored.as_deref())?;
        if !edit(&mut scopes) {
            break scopes;
        }
        let text = serde_json::to_string(&scopes).map_err(|source| StoreError::Decode {
            key: SETTING.into(),
            source,
        })?;
        if store
            .swap_setting(SETTING, stored.as_deref(), &text)
            .await?
        {
            break scopes;
        }
    };
    if let Some(live) = live {
        live.replace(scopes.clone());
    }
    Ok(scopes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_covers_its_own_jobs_only() {
        assert!(Scope::All.covers("w", "p"));
        assert!(Scope::Provider("p".into()).covers("w", "p"));
        assert!(!Scope::Provider("p".into()).covers("p", "q"));
        assert!(Scope::Watch("w".into()).covers("w", "q"));
        assert!(!Scope::Watch("w".into()).covers("v", "w"));
    }

    #[test]
    fn a_parked_job_is_handed_back_once() {
        let pauses = Pauses::new([Scope::Provider("p".into())].into());
        assert_eq!(pauses.holding("w", "p"), Some(Scope::Provider("p".into())));
        assert_eq!(pauses.holding("w", "q"), None);
        let changes = pauses.changes();
        pauses.park(7);
        pauses.replace([Scope::Watch("other".into())].into());
        assert!(changes.has_changed().unwrap_or(false));
        assert_eq!(pauses.take_parked(), vec![7]);
        assert!(pauses.take_parked().is_empty());
    }
}
