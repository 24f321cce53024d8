//! Discovery and readiness. Events are hints, scans are truth: notify wakes
//! the scanner for the paths it names, a full scan runs at start and every
//! `rescan_every` (or `poll_every` in poll mode), and a file is offered only
//! when its size, mtime and ctime stayed unchanged across observations
//! spanning `stable_for`. Watching knows nothing of providers.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use crate::config::{WatchConfig, WatchMode};
use crate::route::SIDECAR_EXTENSIONS;
use crate::state::FileSignature;

/// A file that is complete and may be routed.
#[derive(Debug, Clone)]
pub struct ReadyFile {
    /// Watch name.
    pub watch: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Path relative to the watch folder.
    pub relpath: PathBuf,
    /// The version observed stable.
    pub signature: FileSignature,
    /// Modification time (for templates).
    pub mtime: SystemTime,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct WatchCounters {
    /// Files offered as ready.
    pub detected: AtomicU64,
    /// Candidates that vanished before they were stable.
    pub vanished: AtomicU64,
    /// Full scans done.
    pub scans: AtomicU64,
    /// Zero-byte files left in place (a version of a file counts once).
    pub skipped_empty: AtomicU64,
}

/// Name filters of one watch.
struct Filters {
    ignore: GlobSet,
    include: Option<GlobSet>,
    exclude: GlobSet,
    min_size: u64,
    require_marker: bool,
}

fn glob_set(patterns: &[String]) -> GlobSet {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        if let Ok(glob) = Glob::new(pattern) {
            builder.add(glob);
        }
    }
    builder.build().unwrap_or_else(|_| GlobSet::empty())
}

impl Filters {
    fn new(config: &WatchConfig) -> Self {
        Filters {
            ignore: glob_set(&config.ignore),
            include: (!config.include.is_empty()).then(|| glob_set(&config.include)),
            exclude: glob_set(&config.exclude),
            min_size: config.min_size,
            require_marker: config.require_marker,
        }
    }

    /// Any component of the relative path matches `ignore` (hidden folders too).
    fn ignored(&self, relpath: &Path) -> bool {
        relpath.iter().any(|part| self.ignore.is_match(part))
    }

    fn wanted(&self, relpath: &Path) -> bool {
        !self.ignored(relpath)
            && !self.exclude.is_match(relpath)
            && self
                .include
                .as_ref()
                .is_none_or(|inc| inc.is_match(relpath))
    }
}

/// What a stat of a candidate showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Observation {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Observation {
    fn of(meta: &std::fs::Metadata) -> Self {
        Observation {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

struct Candidate {
    seen: Observation,
    since: Instant,
    observations: u32,
}

/// The discovery state of one watch.
pub struct Scanner {
    config: WatchConfig,
    root: PathBuf,
    filters: Filters,
    skip_roots: Vec<PathBuf>,
    candidates: HashMap<PathBuf, Candidate>,
    offered: HashMap<PathBuf, Observation>,
    warned: HashSet<PathBuf>,
    counters: Arc<WatchCounters>,
}

impl Scanner {
    /// A scanner for `config`; `skip_roots` are folders never entered
    /// (every watch's done/failed folders).
    pub fn new(
        config: WatchConfig,
        skip_roots: Vec<PathBuf>,
        counters: Arc<WatchCounters>,
    ) -> Self {
        let root = config
            .path
            .canonicalize()
            .unwrap_or_else(|_| config.path.clone());
        Scanner {
            filters: Filters::new(&config),
            root,
            config,
            skip_roots,
            candidates: HashMap::new(),
            offered: HashMap::new(),
            warned: HashSet::new(),
            counters,
        }
    }

    fn warn_once(&mut self, path: &Path, message: &str) {
        if self.warned.insert(path.to_path_buf()) {
            tracing::warn!(watch = %self.config.name, path = %path.display(), "{message}");
        }
    }

    /// Walk the whole tree, observing every file.
    pub fn full_scan(&mut self) {
        self.counters.scans.fetch_add(1, Ordering::Relaxed);
        let mut seen = HashSet::new();
        let root = self.root.clone();
        self.scan_dir(&root, &mut seen);
        // Files gone since the last scan.
        self.offered.retain(|path, _| seen.contains(path));
        let vanished: Vec<PathBuf> = self
            .candidates
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in vanished {
            self.forget(&path);
        }
        // Operators (and tests) can tell from this line that every file
        // present now has been looked at at least once.
        tracing::debug!(watch = %self.config.name, files = seen.len(), "full scan done");
    }

    fn scan_dir(&mut self, dir: &Path, seen: &mut HashSet<PathBuf>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.warn_once(
                    dir,
                    &format!("cannot list folder: {e}; check its permissions"),
                );
                return;
            }
        };
        let mut files = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_symlink() {
                self.warn_once(&path, "symbolic link ignored (links are never followed)");
            } else if file_type.is_dir() {
                if self.config.recursive && self.dir_allowed(&path) {
                    self.scan_dir(&path, seen);
                }
            } else if file_type.is_file() {
                files.push(path);
            }
        }
        let names: HashSet<PathBuf> = files.iter().cloned().collect();
        for path in files {
            if is_sidecar(&path, |sibling| names.contains(sibling)) {
                continue;
            }
            seen.insert(path.clone());
            self.observe(&path);
        }
    }

    fn dir_allowed(&self, dir: &Path) -> bool {
        if self.skip_roots.iter().any(|skip| dir.starts_with(skip)) {
            return false;
        }
        dir.strip_prefix(&self.root)
            .is_ok_and(|rel| !self.filters.ignored(rel))
    }

    /// Look at one path named by an event (file or new folder).
    pub fn observe_event_path(&mut self, path: &Path) {
        if !path.starts_with(&self.root) || self.skip_roots.iter().any(|s| path.starts_with(s)) {
            return;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                if self.config.recursive && self.dir_allowed(path) {
                    let mut seen = HashSet::new();
                    self.scan_dir(path, &mut seen);
                }
            }
            Ok(meta) if meta.is_file() => {
                if !is_sidecar(path, |sibling| sibling.is_file()) {
                    self.observe(path);
                }
            }
            Ok(_) => {}
            Err(_) => {
                self.offered.remove(path);
                if self.candidates.contains_key(path) {
                    self.forget(path);
                }
            }
        }
    }

    fn forget(&mut self, path: &Path) {
        self.candidates.remove(path);
        self.counters.vanished.fetch_add(1, Ordering::Relaxed);
        tracing::info!(watch = %self.config.name, path = %path.display(), "file disappeared before it was complete; forgotten");
    }

    /// Record one observation of a file.
    fn observe(&mut self, path: &Path) {
        let Ok(relpath) = path.strip_prefix(&self.root) else {
            return;
        };
        if relpath.to_str().is_none() {
            self.warn_once(
                path,
                "file name is not valid UTF-8; rename it to have it taken",
            );
            return;
        }
        if !self.filters.wanted(relpath) {
            return;
        }
        if !self.config.recursive && relpath.components().count() > 1 {
            return;
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => meta,
            _ => return,
        };
        let now = Observation::of(&meta);
        if self.offered.get(path) == Some(&now) {
            return;
        }
        self.offered.remove(path);
        match self.candidates.get_mut(path) {
            Some(candidate) if candidate.seen == now => candidate.observations += 1,
            Some(candidate) => {
                *candidate = Candidate {
                    seen: now,
                    since: Instant::now(),
                    observations: 1,
                };
            }
            None => {
                tracing::debug!(watch = %self.config.name, path = %path.display(), "new candidate; waiting until it is stable");
                self.candidates.insert(
                    path.to_path_buf(),
                    Candidate {
                        seen: now,
                        since: Instant::now(),
                        observations: 1,
                    },
                );
            }
        }
    }

    /// Re-stat every candidate; offer the ones that stayed unchanged for
    /// `stable_for` (and whose marker exists, when required).
    pub fn check_candidates(&mut self) -> Vec<ReadyFile> {
        let paths: Vec<PathBuf> = self.candidates.keys().cloned().collect();
        let mut ready = Vec::new();
        for path in paths {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_file() => meta,
                _ => {
                    self.forget(&path);
                    continue;
                }
            };
            self.observe(&path);
            let Some(candidate) = self.candidates.get(&path) else {
                continue;
            };
            let stable =
                candidate.observations >= 2 && candidate.since.elapsed() >= self.config.stable_for;
            if stable && candidate.seen.size == 0 {
                // Zero bytes is never a finished video: left where it is,
                // said once, and taken when it grows.
                let seen = candidate.seen;
                self.candidates.remove(&path);
                self.offered.insert(path.clone(), seen);
                self.counters.skipped_empty.fetch_add(1, Ordering::Relaxed);
                tracing::info!(watch = %self.config.name, path = %path.display(), "zero-byte file left in place: it is never a finished video (it is taken once it has content)");
                continue;
            }
            if !stable || candidate.seen.size < self.filters.min_size {
                continue;
            }
            if self.filters.require_marker && !has_marker(&path) {
                continue;
            }
            // A `clip.json` seen before its `clip.mp4` arrived was a
            // candidate of its own; now it is a sidecar that travels with
            // the video and must not be delivered by itself.
            if is_sidecar(&path, Path::is_file) {
                self.candidates.remove(&path);
                continue;
            }
            let seen = candidate.seen;
            self.candidates.remove(&path);
            self.offered.insert(path.clone(), seen);
            let Ok(relpath) = path.strip_prefix(&self.root).map(Path::to_path_buf) else {
                continue;
            };
            self.counters.detected.fetch_add(1, Ordering::Relaxed);
            ready.push(ReadyFile {
                watch: self.config.name.clone(),
                relpath,
                signature: FileSignature::of(&meta),
                mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path,
            });
        }
        ready
    }

    /// Forget that a path was offered, so it is offered again when stable
    /// (used when a job is retried or superseded).
    pub fn reoffer(&mut self, path: &Path) {
        self.offered.remove(path);
    }

    /// How often candidates are re-checked.
    pub fn check_every(&self) -> Duration {
        (self.config.stable_for / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// `<file>.ready` or `<file>.done` beside the file.
fn has_marker(path: &Path) -> bool {
    ["ready", "done"].iter().any(|ext| {
        let mut name = path.as_os_str().to_owned();
        name.push(".");
        name.push(ext);
        Path::new(&name).exists()
    })
}

/// A `.json`/`.yaml`/`.yml` file beside a video of the same stem travels with
/// that video and is never taken on its own; `.ready`/`.done` markers neither.
fn is_sidecar(path: &Path, exists: impl Fn(&Path) -> bool) -> bool {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return false;
    };
    let Some(stem) = path.file_stem() else {
        return false;
    };
    if ext == "ready" || ext == "done" {
        return exists(&path.with_extension(""));
    }
    if !SIDECAR_EXTENSIONS.contains(&ext) {
        return false;
    }
    let Some(dir) = path.parent() else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let other = entry.path();
        other != path
            && other.file_stem() == Some(stem)
            && other
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| !SIDECAR_EXTENSIONS.contains(&e))
            && exists(&other)
    })
}

/// Messages into a running watch.
#[derive(Debug)]
pub enum WatchCommand {
    /// Offer this path again once stable (its job was superseded or retried).
    Reoffer(PathBuf),
}

/// Run one watch until shutdown, sending ready files to `out`.
pub async fn run(
    config: WatchConfig,
    skip_roots: Vec<PathBuf>,
    out: mpsc::Sender<ReadyFile>,
    mut commands: mpsc::UnboundedReceiver<WatchCommand>,
    mut shutdown: watch::Receiver<bool>,
    counters: Arc<WatchCounters>,
) {
    let mode = config.mode;
    let mut rescan_every = match mode {
        WatchMode::Poll => Some(config.poll_every),
        WatchMode::Auto => Some(config.rescan_every),
        WatchMode::Events => None,
    };
    let name = config.name.clone();
    let mut scanner = Scanner::new(config, skip_roots, counters);
    let (event_tx, mut events) = mpsc::channel::<Hint>(HINTS_QUEUED);
    let rescan_owed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _watcher = if mode == WatchMode::Poll {
        None
    } else {
        match start_notify(
            &scanner.root,
            scanner.config.recursive,
            event_tx,
            Arc::clone(&rescan_owed),
        ) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                // Without events, only scans find files: scan at the pace
                // of poll mode (events mode would otherwise never scan).
                let every = scanner.config.poll_every;
                tracing::warn!(watch = %name, error = %e, poll_every = ?every, "filesystem events unavailable; polling instead");
                rescan_every = Some(rescan_every.map_or(every, |r| r.min(every)));
                None
            }
        }
    };
    off_the_runtime(|| scanner.full_scan());
    let mut check = tokio::time::interval(scanner.check_every());
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rescan_period = rescan_every.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut rescan =
        tokio::time::interval_at(tokio::time::Instant::now() + rescan_period, rescan_period);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return,
            _ = check.tick() => {
                if rescan_owed.swap(false, Ordering::Relaxed) {
                    tracing::info!(watch = %name, "more filesystem events came than the queue holds; scanning the whole folder now");
                    off_the_runtime(|| scanner.full_scan());
                }
                for file in off_the_runtime(|| scanner.check_candidates()) {
                    tracing::debug!(watch = %name, file = %file.relpath.display(), "ready");
                    if out.send(file).await.is_err() {
                        return;
                    }
                }
            }
            _ = rescan.tick() => off_the_runtime(|| scanner.full_scan()),
            Some(hint) = events.recv() => {
                let hints: Vec<Hint> = std::iter::once(hint)
                    .chain(std::iter::from_fn(|| events.try_recv().ok()))
                    .collect();
                off_the_runtime(|| {
                    let mut rescan_now = false;
                    for hint in hints {
                        match hint {
                            Hint::Path(path) => scanner.observe_event_path(&path),
                            Hint::Rescan(why) => {
                                if !rescan_now {
                                    tracing::info!(watch = %name, reason = why, "filesystem events were lost; scanning the whole folder now");
                                }
                                rescan_now = true;
                            }
                        }
                    }
                    if rescan_now {
                        scanner.full_scan();
                    }
                });
            }
            Some(command) = commands.recv() => match command {
                WatchCommand::Reoffer(path) => {
                    scanner.reoffer(&path);
                    scanner.observe_event_path(&path);
                }
            },
        }
    }
}

/// Run directory scans and stats (which block on a slow NAS) without
/// holding up the runtime's other tasks: on the daemon's multi-threaded
/// runtime the worker thread hands its other tasks over first.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Filesystem events waiting for the watch task, at most. Events are only
/// hints: when more arrive than fit, the rest are dropped and the folder is
/// scanned instead, so memory stays flat under a drop of any size.
const HINTS_QUEUED: usize = 4096;

/// What the filesystem tells a watch.
#[derive(Debug, PartialEq)]
enum Hint {
    /// Something happened at this path: look at it.
    Path(PathBuf),
    /// Events were lost (the kernel's queue overflowed, the watcher failed,
    /// or the queue to the watch was full): only a full scan is sure.
    Rescan(&'static str),
}

/// Turn one notify callback into hints, never blocking and never losing a
/// loss: an overflow or an error becomes a rescan; a hint that finds the
/// queue full sets `rescan_owed`, which the watch task checks at every
/// candidate check (so a rescan follows within a second).
fn forward(
    result: notify::Result<notify::Event>,
    hints: &mpsc::Sender<Hint>,
    rescan_owed: &std::sync::atomic::AtomicBool,
) {
    let send = |hint: Hint| {
        if hints.try_send(hint).is_err() {
            rescan_owed.store(true, Ordering::Relaxed);
        }
    };
    match result {
        Err(_) => send(Hint::Rescan("the event watcher reported an error")),
        Ok(event) if event.need_rescan() => {
            send(Hint::Rescan("the kernel's event queue overflowed"))
        }
        // Access events (our own scans open folders) would feed back into scans.
        Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => {}
        Ok(event) => {
            for path in event.paths {
                send(Hint::Path(path));
            }
        }
    }
}

fn start_notify(
    root: &Path,
    recursive: bool,
    hints: mpsc::Sender<Hint>,
    rescan_owed: Arc<std::sync::atomic::AtomicBool>,
) -> notify::Result<notify::RecommendedWatcher> {
    if crate::failpoint::active("watch::no_events") {
        return Err(notify::Error::generic("events disabled by a failpoint"));
    }
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        forward(result, &hints, &rescan_owed);
    })?;
    let mode = if recursive {
        notify::RecursiveMode::Recursive
    } else {
        notify::RecursiveMode::NonRecursive
    };
    watcher.watch(root, mode)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_events_become_a_rescan() {
        use notify::event::{EventKind, Flag};
        let owed = std::sync::atomic::AtomicBool::new(false);
        let (tx, mut rx) = mpsc::channel(2);
        let overflow = notify::Event::new(EventKind::Other).set_flag(Flag::Rescan);
        forward(Ok(overflow), &tx, &owed);
        assert!(matches!(rx.try_recv(), Ok(Hint::Rescan(_))));
        forward(Err(notify::Error::generic("boom")), &tx, &owed);
        assert!(matches!(rx.try_recv(), Ok(Hint::Rescan(_))));
        // A full queue: the paths that do not fit are owed as a rescan,
        // sent with the next event once there is room.
        let create = |p: &str| {
            Ok(
                notify::Event::new(EventKind::Create(notify::event::CreateKind::File))
                    .add_path(PathBuf::from(p)),
            )
        };
        for p in ["/a", "/b", "/c"] {
            forward(create(p), &tx, &owed);
        }
        assert!(
            owed.load(Ordering::Relaxed),
            "the dropped path is owed as a rescan"
        );
        assert_eq!(rx.try_recv().ok(), Some(Hint::Path("/a".into())));
        assert_eq!(rx.try_recv().ok(), Some(Hint::Path("/b".into())));
    }

    fn watch_config(path: &Path, stable_for: Duration) -> WatchConfig {
        let text = format!(
            "watches:\n  - name: w\n    path: {}\n    stable_for: {}ms\n    min_size: 2\n    include: [\"*.mp4\"]\n    exclude: [\"proxies/**\"]\nproviders:\n  o: {{ type: folder, path: /tmp/o }}\n",
            path.display(),
            stable_for.as_millis()
        );
        crate::config::load_str(&path.join("c.yaml"), &text)
            .unwrap()
            .watches
            .remove(0)
    }

    #[test]
    fn filters_and_stability() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("proxies")).unwrap();
        std::fs::create_dir_all(root.join(".hidden")).unwrap();
        std::fs::write(root.join("a.mp4"), b"abc").unwrap();
        std::fs::write(root.join("a.json"), b"{}").unwrap();
        std::fs::write(root.join("tiny.mp4"), b"a").unwrap();
        std::fs::write(root.join("x.mp4.part"), b"abc").unwrap();
        std::fs::write(root.join("proxies/p.mp4"), b"abc").unwrap();
        std::fs::write(root.join(".hidden/h.mp4"), b"abc").unwrap();
        std::fs::write(root.join("notes.txt"), b"abc").unwrap();
        let config = watch_config(root, Duration::from_millis(30));
        let mut scanner = Scanner::new(config, vec![], Arc::default());
        scanner.full_scan();
        assert!(
            scanner.check_candidates().is_empty(),
            "one observation is no proof"
        );
        std::thread::sleep(Duration::from_millis(40));
        let ready = scanner.check_candidates();
        let names: Vec<_> = ready.iter().map(|r| r.relpath.clone()).collect();
        assert_eq!(names, vec![PathBuf::from("a.mp4")]);
        // Offered once only.
        scanner.full_scan();
        std::thread::sleep(Duration::from_millis(40));
        assert!(scanner.check_candidates().is_empty());
        // A change makes it a candidate again.
        std::fs::write(root.join("a.mp4"), b"abcd").unwrap();
        scanner.full_scan();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(scanner.check_candidates().len(), 1);
    }

    #[test]
    fn vanished_candidates_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gone.mp4"), b"abc").unwrap();
        let counters = Arc::new(WatchCounters::default());
        let mut scanner = Scanner::new(
            watch_config(dir.path(), Duration::from_secs(5)),
            vec![],
            Arc::clone(&counters),
        );
        scanner.full_scan();
        std::fs::remove_file(dir.path().join("gone.mp4")).unwrap();
        assert!(scanner.check_candidates().is_empty());
        assert_eq!(counters.vanished.load(Ordering::Relaxed), 1);
    }
}
