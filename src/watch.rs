//! Discovery and readiness. Events are hints, scans are truth: notify wakes
//! the scanner for the paths it names, a full scan runs at start and every
//! `rescan_every` (or `poll_every` in poll mode), and a file is offered only
//! when its size, mtime and ctime stayed unchanged across observations
//! spanning `stable_for`. Which paths may become jobs at all is decided by
//! [`crate::admission`], the same decision `check` shows. Watching knows
//! nothing of providers.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use crate::admission::{Filters, NotTaken, SkipCounts, travels_with_another};
use crate::config::{WatchConfig, WatchMode};
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
    /// Which look at the candidates found it ready (numbered across all
    /// watches): the files of one look come in several messages, and share
    /// what is worked out for them (a folder listed for sidecars).
    pub look: u64,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct WatchCounters {
    /// Files offered as ready.
    pub detected: AtomicU64,
    /// Candidates that vanished before they were stable (not counting
    /// files the daemon moved itself).
    pub vanished: AtomicU64,
    /// Full scans done.
    pub scans: AtomicU64,
    /// Files left in place, by reason (a version of a file counts once).
    pub skipped: SkipCounts,
}

/// Source paths that jobs hold: a file the daemon is working on (or is
/// about to move back into the watch folder for a retry) is not a new
/// candidate, and when it moves away that is not a file that "vanished".
#[derive(Debug, Default)]
pub struct HeldSources(Mutex<Held>);

/// Held paths as a scan names them, and how each job named them (the name a
/// scan uses cannot be worked out again once the folder is gone).
#[derive(Debug, Default)]
struct Held {
    scanned: HashSet<PathBuf>,
    given: HashMap<PathBuf, PathBuf>,
    /// Folders as a scan names them, by how jobs name them: a drop's
    /// thousands of files share a few folders, each resolved once (a
    /// `readlink` per component of its path; one that cannot be resolved is
    /// not kept). Emptied when it grows past
    /// [`RESOLVED_FOLDERS`]. A folder replaced by a link meanwhile could
    /// name a held file wrongly: a scan then offers it, and the job that
    /// already covers it keeps it from being taken twice.
    folders: HashMap<PathBuf, PathBuf>,
}

/// Folders [`Held`] keeps resolved at most.
const RESOLVED_FOLDERS: usize = 4096;

impl HeldSources {
    /// A job holds `path` from now on.
    pub fn hold(&self, path: &Path) {
        let Ok(mut held) = self.0.lock() else {
            return;
        };
        let scanned = match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => {
                if held.folders.len() >= RESOLVED_FOLDERS {
                    held.folders.clear();
                }
                let folder = match held.folders.get(parent) {
                    Some(folder) => folder.clone(),
                    // Kept only once resolved: a folder that cannot be
                    // (gone, for now) is tried again next time.
                    None => match parent.canonicalize() {
                        Ok(folder) => {
                            held.folders.insert(parent.to_path_buf(), folder.clone());
                            folder
                        }
                        Err(_) => parent.to_path_buf(),
                    },
                };
                folder.join(name)
            }
            _ => path.to_path_buf(),
        };
        held.scanned.insert(scanned.clone());
        held.given.insert(path.to_path_buf(), scanned);
    }

    /// The job that held `path` is finished with it.
    pub fn release(&self, path: &Path) {
        if let Ok(mut held) = self.0.lock() {
            let scanned = held.given.remove(path).unwrap_or_else(|| as_scanned(path));
            held.scanned.remove(&scanned);
        }
    }

    /// Does a job hold `path` (as a scan names it)?
    pub fn holds(&self, path: &Path) -> bool {
        self.0.lock().is_ok_and(|held| held.scanned.contains(path))
    }

    /// How many paths are held (for tests of the bookkeeping).
    pub fn len(&self) -> usize {
        self.0.lock().map_or(0, |held| held.given.len())
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `path` as a scan names it: under the canonical watch folder (the config
/// may name the folder through a link). The file itself may not exist yet.
fn as_scanned(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map_or_else(|_| path.to_path_buf(), |p| p.join(name)),
        _ => path.to_path_buf(),
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

impl Candidate {
    /// When it will have been unchanged for `stable_for`.
    fn due(&self, stable_for: Duration) -> Instant {
        Self::due_from(self.since, stable_for)
    }

    /// When a candidate seen unchanged `since` is due.
    fn due_from(since: Instant, stable_for: Duration) -> Instant {
        since + stable_for
    }
}

/// The discovery state of one watch.
pub struct Scanner {
    config: WatchConfig,
    root: PathBuf,
    filters: Filters,
    /// Every watch's done and failed folders, as of the latest reload.
    skip_roots: SkipRoots,
    candidates: HashMap<PathBuf, Candidate>,
    /// Versions already offered (or left in place for a reason told once).
    offered: HashMap<PathBuf, Observation>,
    /// Paths left in place and the reason told (each told once).
    skipped: HashMap<PathBuf, &'static str>,
    held: Arc<HeldSources>,
    counters: Arc<WatchCounters>,
    /// The earliest time a candidate will have been unchanged for
    /// `stable_for` (none waits, or the ones past it wait for something
    /// else: a marker). Only ever early, never late: a candidate that
    /// changes or goes leaves it as it was, which costs one look too many.
    next_due: Option<Instant>,
    /// Its latest look at the candidates (see [`ReadyFile::look`]).
    look: u64,
}

/// Looks at the candidates so far, by every watch: each look has a number
/// of its own, also across a watch started again by a reload (so that what
/// was worked out for an earlier look is never taken for a new one's).
static LOOKS: AtomicU64 = AtomicU64::new(0);

/// Folders no watch enters (every watch's done and failed folders): a
/// reload that adds a watch changes them for the watches that run on.
pub type SkipRoots = crate::reload::Shared<Vec<PathBuf>>;

impl Scanner {
    /// A scanner for `config`; `skip_roots` are folders never entered
    /// (every watch's done/failed folders); `held` are the sources jobs hold.
    pub fn new(
        config: WatchConfig,
        skip_roots: SkipRoots,
        held: Arc<HeldSources>,
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
            skipped: HashMap::new(),
            held,
            counters,
            next_due: None,
            look: 0,
        }
    }

    /// Leave `path` in place for `why`: told once at `info` (`warn` when
    /// someone has to act), counted once by reason, told again only when
    /// the reason changes.
    fn skip(&mut self, path: &Path, why: &NotTaken) {
        let Some(reason) = why.reason() else {
            return;
        };
        if self.skipped.get(path) == Some(&reason) {
            return;
        }
        self.skipped.insert(path.to_path_buf(), reason);
        self.counters.skipped.add(reason);
        if matches!(why, NotTaken::NotUtf8) {
            tracing::warn!(watch = %self.config.name, path = %path.display(), reason, "not taken: {why}");
        } else {
            tracing::info!(watch = %self.config.name, path = %path.display(), reason, "not taken: {why}");
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
        self.skipped.retain(|path, _| seen.contains(path));
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

    /// Every path this scan looked at goes into `seen` (left-in-place ones
    /// too, so that what is remembered of them lasts while they exist).
    fn scan_dir(&mut self, dir: &Path, seen: &mut HashSet<PathBuf>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(watch = %self.config.name, path = %dir.display(), error = %e, "cannot list folder; check its permissions");
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
                seen.insert(path.clone());
                self.skip(&path, &NotTaken::Symlink);
            } else if file_type.is_dir() {
                if self
                    .skip_roots
                    .get()
                    .iter()
                    .any(|skip| path.starts_with(skip))
                {
                    continue;
                }
                seen.insert(path.clone());
                match self.folder_verdict(&path) {
                    Ok(()) => self.scan_dir(&path, seen),
                    Err(why) => self.skip(&path, &why),
                }
            } else if file_type.is_file() {
                files.push(path);
            }
        }
        let names: HashSet<PathBuf> = files.iter().cloned().collect();
        for path in files {
            seen.insert(path.clone());
            if travels_with_another(&path, |sibling| names.contains(sibling)).is_ok() {
                self.observe(&path);
            }
        }
    }

    fn folder_verdict(&self, dir: &Path) -> Result<(), NotTaken> {
        match dir.strip_prefix(&self.root) {
            Ok(rel) if rel.as_os_str().is_empty() => Ok(()),
            Ok(rel) => self.filters.folder(rel),
            Err(_) => Err(NotTaken::Directory),
        }
    }

    /// Look at one path named by an event (file or new folder).
    pub fn observe_event_path(&mut self, path: &Path) {
        if !path.starts_with(&self.root)
            || self.skip_roots.get().iter().any(|s| path.starts_with(s))
        {
            return;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => match self.folder_verdict(path) {
                Ok(()) => {
                    let mut seen = HashSet::new();
                    self.scan_dir(path, &mut seen);
                }
                Err(why) => self.skip(path, &why),
            },
            Ok(meta) if meta.is_file() => {
                if travels_with_another(path, Path::is_file).is_ok() {
                    self.observe(path);
                }
            }
            Ok(meta) if meta.file_type().is_symlink() => self.skip(path, &NotTaken::Symlink),
            Ok(_) => {}
            Err(_) => {
                self.offered.remove(path);
                self.skipped.remove(path);
                if self.candidates.contains_key(path) {
                    self.forget(path);
                }
            }
        }
    }

    /// A candidate is gone: counted and said, unless a job moved it.
    fn forget(&mut self, path: &Path) {
        self.candidates.remove(path);
        if self.held.holds(path) {
            return;
        }
        self.counters.vanished.fetch_add(1, Ordering::Relaxed);
        tracing::info!(watch = %self.config.name, path = %path.display(), "file disappeared before it was complete; forgotten");
    }

    /// Record one observation of a file.
    fn observe(&mut self, path: &Path) {
        if !self.observable(path) {
            return;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => self.record(path, &meta),
            _ => {}
        }
    }

    /// Whether `path` is one to observe: a name the filters take, that no
    /// job holds.
    fn observable(&mut self, path: &Path) -> bool {
        let Ok(relpath) = path.strip_prefix(&self.root) else {
            return false;
        };
        if let Err(why) = self.filters.name(relpath) {
            self.skip(path, &why);
            return false;
        }
        if self.held.holds(path) {
            // A job has it: neither a new candidate nor, when it moves, a loss.
            self.candidates.remove(path);
            return false;
        }
        true
    }

    /// Record an observation of the file at `path`, `meta` as just read.
    fn record(&mut self, path: &Path, meta: &std::fs::Metadata) {
        let now = Observation::of(meta);
        if self.offered.get(path) == Some(&now) {
            return;
        }
        self.offered.remove(path);
        self.skipped.remove(path);
        let since = Instant::now();
        match self.candidates.get_mut(path) {
            Some(candidate) if candidate.seen == now => {
                candidate.observations += 1;
                return;
            }
            Some(candidate) => {
                *candidate = Candidate {
                    seen: now,
                    since,
                    observations: 1,
                };
            }
            None => {
                tracing::debug!(watch = %self.config.name, path = %path.display(), "new candidate; waiting until it is stable");
                self.candidates.insert(
                    path.to_path_buf(),
                    Candidate {
                        seen: now,
                        since,
                        observations: 1,
                    },
                );
            }
        }
        let due = Candidate::due_from(since, self.config.stable_for);
        self.next_due = Some(self.next_due.map_or(due, |next| next.min(due)));
    }

    /// Stat every candidate whose `stable_for` is up; offer the ones that
    /// stayed unchanged all along (and whose marker exists, when required).
    /// The others are not looked at until then.
    pub fn check_candidates(&mut self) -> Vec<ReadyFile> {
        // Every candidate due by now is looked at in this pass.
        let started = Instant::now();
        self.look = LOOKS.fetch_add(1, Ordering::Relaxed) + 1;
        let paths: Vec<PathBuf> = self.candidates.keys().cloned().collect();
        let mut ready = Vec::new();
        for path in paths {
            // Not looked at again until its time is up: whatever changes a
            // file changes its ctime, so one look then tells whether it
            // stayed unchanged all along (an event re-observes a file that
            // changes meanwhile). A look per candidate and pass was a
            // `stat` per file every stable_for / 4 during a drop.
            if self
                .candidates
                .get(&path)
                .is_some_and(|c| c.due(self.config.stable_for) > Instant::now())
            {
                continue;
            }
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_file() => meta,
                _ => {
                    self.forget(&path);
                    continue;
                }
            };
            // Observed with what was just read: one `stat` per candidate
            // looked at.
            if self.observable(&path) {
                self.record(&path, &meta);
            }
            let Some(candidate) = self.candidates.get(&path) else {
                continue;
            };
            let stable =
                candidate.observations >= 2 && candidate.since.elapsed() >= self.config.stable_for;
            if !stable {
                continue;
            }
            let seen = candidate.seen;
            // A `clip.json` seen before its `clip.mp4` arrived was a
            // candidate of its own; now it is a sidecar that travels with
            // the video and must not be delivered by itself.
            if travels_with_another(&path, Path::is_file).is_err() {
                self.candidates.remove(&path);
                continue;
            }
            if let Err(why) = self.filters.size(seen.size) {
                // Left where it is, said once, looked at again when it changes.
                self.candidates.remove(&path);
                self.offered.insert(path.clone(), seen);
                self.skip(&path, &why);
                continue;
            }
            if self.filters.marker(&path).is_err() {
                continue;
            }
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
                look: self.look,
            });
        }
        // Those still waiting for their time (some may have come due
        // during a long pass); one due before the pass began was looked at
        // and waits for a marker, looked for at the periodic look.
        self.next_due = self
            .candidates
            .values()
            .map(|c| c.due(self.config.stable_for))
            .filter(|&due| due > started)
            .min();
        ready
    }

    /// Forget that a path was offered, so it is offered again when stable
    /// (used when a job is retried or superseded).
    pub fn reoffer(&mut self, path: &Path) {
        self.offered.remove(path);
    }

    /// The longest gap between two looks at the candidates (a marker that
    /// appears, a rescan owed); a candidate's own time brings a look sooner
    /// (see [`Self::next_check`]).
    pub fn check_every(&self) -> Duration {
        (self.config.stable_for / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// When to look at the candidates next, the last look having ended at
    /// `last`: when the first of them has been unchanged for `stable_for`
    /// (and [`GATHER`] more), so a file is taken when its time is up (a look every
    /// [`Self::check_every`] alone took it up to that much later); at least
    /// [`CHECK_GAP`] after the last look, and at most `check_every` (a
    /// marker that appears, a rescan owed).
    pub fn next_check(&self, last: Instant) -> Instant {
        let periodic = last + self.check_every();
        self.next_due.map_or(periodic, |due| {
            (due + GATHER).max(last + CHECK_GAP).min(periodic)
        })
    }
}

/// Messages into a running watch.
#[derive(Debug)]
pub enum WatchCommand {
    /// Offer this path again once stable (its job was superseded or retried).
    Reoffer(PathBuf),
}

/// The least time between two looks at the candidates.
pub const CHECK_GAP: Duration = Duration::from_millis(50);

/// How long past the first candidate's time a look waits: files seen in
/// one scan or one burst of events come due microseconds apart, and are
/// taken in one look (so that they share a batch) instead of the first
/// alone and the rest a [`CHECK_GAP`] later.
pub const GATHER: Duration = Duration::from_millis(25);

/// Files found ready together are sent together, at most this many in one
/// message: their jobs are taken together and can share a batch.
pub const READY_AT_ONCE: usize = 256;

/// Run one watch until shutdown, sending ready files to `out`, those found
/// ready in one look together.
pub async fn run(
    config: WatchConfig,
    skip_roots: SkipRoots,
    out: mpsc::Sender<Vec<ReadyFile>>,
    mut commands: mpsc::UnboundedReceiver<WatchCommand>,
    mut shutdown: watch::Receiver<bool>,
    held: Arc<HeldSources>,
    counters: Arc<WatchCounters>,
) {
    let mode = config.mode;
    let mut rescan_every = match mode {
        WatchMode::Poll => Some(config.poll_every),
        WatchMode::Auto => Some(config.rescan_every),
        WatchMode::Events => None,
    };
    let name = config.name.clone();
    let mut scanner = Scanner::new(config, skip_roots, held, counters);
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
    // The candidates are looked at when the first is due (see
    // `Scanner::next_check`), which any event or scan may bring forward.
    let mut last_look = Instant::now();
    let check = tokio::time::sleep_until(scanner.next_check(last_look).into());
    tokio::pin!(check);
    let rescan_period = rescan_every.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut rescan =
        tokio::time::interval_at(tokio::time::Instant::now() + rescan_period, rescan_period);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::shutdown::stopped(&mut shutdown) => return,
            () = &mut check => {
                if rescan_owed.swap(false, Ordering::Relaxed) {
                    tracing::info!(watch = %name, "more filesystem events came than the queue holds; scanning the whole folder now");
                    off_the_runtime(|| scanner.full_scan());
                }
                let mut ready = off_the_runtime(|| scanner.check_candidates());
                while !ready.is_empty() {
                    let rest = ready.split_off(ready.len().min(READY_AT_ONCE));
                    for file in &ready {
                        tracing::debug!(watch = %name, file = %file.relpath.display(), "ready");
                    }
                    if out.send(std::mem::replace(&mut ready, rest)).await.is_err() {
                        return;
                    }
                }
                last_look = Instant::now();
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
        check.as_mut().reset(scanner.next_check(last_look).into());
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

    /// What the daemon works out for a look (a folder listed for
    /// sidecars) is kept for the rest of that look: a watch started again
    /// (by a reload) must not number its looks as the one before did.
    #[test]
    fn looks_are_never_numbered_alike_even_by_a_watch_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = watch_config(dir.path(), Duration::from_millis(30));
        let mut before = Scanner::new(
            config.clone(),
            SkipRoots::default(),
            Arc::default(),
            Arc::default(),
        );
        before.check_candidates();
        let mut again = Scanner::new(config, SkipRoots::default(), Arc::default(), Arc::default());
        again.check_candidates();
        assert_ne!(before.look, again.look);
        let first = again.look;
        again.check_candidates();
        assert!(again.look > first, "each look has a number of its own");
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
        let mut scanner =
            Scanner::new(config, SkipRoots::default(), Arc::default(), Arc::default());
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
    fn a_held_path_is_released_after_its_folder_is_gone() {
        // The config names the watch through a link; scans use the real path.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("real/sub")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let path = dir.path().join("link/sub/a.mp4");
        let scanned = dir.path().join("real/sub/a.mp4");
        let held = HeldSources::default();
        held.hold(&path);
        assert!(held.holds(&scanned));
        std::fs::remove_dir(dir.path().join("real/sub")).unwrap();
        held.release(&path);
        assert!(held.is_empty());
        assert!(
            !held.holds(&scanned),
            "released although its folder is gone"
        );
    }

    #[test]
    fn candidates_are_looked_at_when_their_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("clip.mp4"), b"abc").unwrap();
        let stable_for = Duration::from_secs(1);
        let mut scanner = Scanner::new(
            watch_config(dir.path(), stable_for),
            SkipRoots::default(),
            Arc::default(),
            Arc::default(),
        );
        let before = Instant::now();
        scanner.full_scan();
        let after = Instant::now();
        // Nothing is due for a second: a look now and then meanwhile.
        assert_eq!(scanner.next_check(after), after + scanner.check_every());
        // The look after one at 0.9 s is at the file's time, not a
        // quarter of stable_for later.
        let last = before + Duration::from_millis(900);
        let next = scanner.next_check(last);
        assert!(
            next >= before + stable_for && next <= after + stable_for + GATHER,
            "looked at {:?} after it was seen, not when its {stable_for:?} was up",
            next - before
        );
        // Deadlines past already are looked at no sooner than a gap after
        // the last look: a drop's thousands of deadlines, microseconds
        // apart, are not a look each.
        let late = after + Duration::from_secs(5);
        assert_eq!(scanner.next_check(late), late + CHECK_GAP);
        // Taken, the file leaves nothing due but the periodic look.
        std::thread::sleep((after + stable_for).saturating_duration_since(Instant::now()));
        assert_eq!(scanner.check_candidates().len(), 1);
        let now = Instant::now();
        assert_eq!(scanner.next_check(now), now + scanner.check_every());
    }

    #[test]
    fn vanished_candidates_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gone.mp4"), b"abc").unwrap();
        let counters = Arc::new(WatchCounters::default());
        let stable_for = Duration::from_millis(50);
        let mut scanner = Scanner::new(
            watch_config(dir.path(), stable_for),
            SkipRoots::default(),
            Arc::default(),
            Arc::clone(&counters),
        );
        scanner.full_scan();
        std::fs::remove_file(dir.path().join("gone.mp4")).unwrap();
        // Looked at when its time is up (no event tells a scanner alone).
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.vanished.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            assert!(scanner.check_candidates().is_empty());
            std::thread::sleep(stable_for / 4);
        }
        assert_eq!(counters.vanished.load(Ordering::Relaxed), 1);
    }
}
