//! Which paths of a watch folder become jobs: one decision, used by the
//! watch's scanner and by `hotfolder check`, so that `check` can never say a
//! file would be taken when the daemon leaves it. Every "no" is a
//! [`NotTaken`] that names the glob or setting responsible; the scanner logs
//! each one once and counts it by [`NotTaken::reason`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::WatchConfig;
use crate::route::SIDECAR_EXTENSIONS;

/// Why a path in a watch folder is not taken (now, or at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotTaken {
    /// `check` was given the watch folder itself.
    #[error("is the watch folder {0} itself; name a file inside it")]
    WatchRoot(String),
    /// Inside a done/ or failed/ folder: filed files are never taken again.
    #[error("is inside {0}, where hotfolder files what it has finished")]
    Filed(PathBuf),
    /// A folder: its files are looked at, never the folder itself.
    #[error("is a folder; the files inside it are looked at one by one")]
    Directory,
    /// Links are never followed (the target could be anything).
    #[error("is a symbolic link; links are never followed: put the file itself in the folder")]
    Symlink,
    /// A socket, a pipe, a device.
    #[error("is not a regular file")]
    NotAFile,
    /// Names must be UTF-8 for rules, templates and providers.
    #[error("its name is not valid UTF-8; rename it to have it taken")]
    NotUtf8,
    /// A path component matches an `ignore` glob.
    #[error(
        "{component:?} matches ignore: \"{pattern}\" (temporary and hidden names are never taken)"
    )]
    Ignored {
        /// The glob.
        pattern: String,
        /// The name that matched it.
        component: String,
    },
    /// The relative path matches an `exclude` glob.
    #[error("matches exclude: \"{0}\"")]
    Excluded(String),
    /// `include` is set and no glob of it matches.
    #[error("matches none of include: {0:?}")]
    NotIncluded(Vec<String>),
    /// In a subfolder of a watch with `recursive: false`.
    #[error("is in a subfolder and the watch has recursive: false")]
    Nested,
    /// A sidecar travels with its video and is never a job of its own.
    #[error("is the sidecar of {0}: it travels with that video")]
    Sidecar(String),
    /// A `.ready`/`.done` marker of another file.
    #[error("is the marker of {0}")]
    Marker(String),
    /// Zero bytes is never a finished video.
    #[error("has zero bytes: never a finished video; it is taken once it has content")]
    Empty,
    /// Smaller than the watch's `min_size`.
    #[error("is {size} bytes, below min_size: {min} bytes")]
    BelowMinSize {
        /// The file's size.
        size: u64,
        /// The setting.
        min: u64,
    },
    /// `require_marker` and neither marker exists yet.
    #[error("waits for {0}.ready or {0}.done (require_marker: true)")]
    NoMarkerYet(String),
}

impl NotTaken {
    /// The `reason` label of `hotfolder_files_skipped_total`; `None` for the
    /// paths that are no one's concern (sidecars and markers travel with
    /// their video; a file waiting for its marker is not skipped).
    pub fn reason(&self) -> Option<&'static str> {
        Some(match self {
            NotTaken::Symlink => "symlink",
            NotTaken::NotAFile => "not_a_file",
            NotTaken::NotUtf8 => "not_utf8",
            NotTaken::Ignored { .. } => "ignored",
            NotTaken::Excluded(_) => "excluded",
            NotTaken::NotIncluded(_) => "not_included",
            NotTaken::Nested => "nested",
            NotTaken::Empty => "empty",
            NotTaken::BelowMinSize { .. } => "below_min_size",
            NotTaken::WatchRoot(_)
            | NotTaken::Filed(_)
            | NotTaken::Directory
            | NotTaken::Sidecar(_)
            | NotTaken::Marker(_)
            | NotTaken::NoMarkerYet(_) => return None,
        })
    }

    /// Every reason label, so each counter is exported from the start.
    pub const REASONS: [&'static str; 9] = [
        "symlink",
        "not_a_file",
        "not_utf8",
        "ignored",
        "excluded",
        "not_included",
        "nested",
        "empty",
        "below_min_size",
    ];
}

/// Files skipped, by reason (the index in [`NotTaken::REASONS`]).
#[derive(Debug, Default)]
pub struct SkipCounts(Mutex<[u64; NotTaken::REASONS.len()]>);

impl SkipCounts {
    /// Count one skipped file.
    pub fn add(&self, reason: &str) {
        if let (Ok(mut counts), Some(slot)) = (
            self.0.lock(),
            NotTaken::REASONS.iter().position(|r| *r == reason),
        ) {
            counts[slot] += 1;
        }
    }

    /// `(reason, count)` for every reason, zeros included.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let counts = self.0.lock().map(|c| *c).unwrap_or_default();
        NotTaken::REASONS.iter().copied().zip(counts).collect()
    }
}

/// A glob list that can say which of its patterns matched.
struct Globs {
    set: GlobSet,
    patterns: Vec<String>,
}

impl Globs {
    fn new(patterns: &[String]) -> Self {
        let mut builder = GlobSetBuilder::new();
        let mut kept = Vec::new();
        // Patterns were validated when the config was loaded.
        for pattern in patterns {
            if let Ok(glob) = Glob::new(pattern) {
                builder.add(glob);
                kept.push(pattern.clone());
            }
        }
        match builder.build() {
            Ok(set) => Globs {
                set,
                patterns: kept,
            },
            Err(_) => Globs {
                set: GlobSet::empty(),
                patterns: Vec::new(),
            },
        }
    }

    fn first_match(&self, path: &Path) -> Option<&str> {
        let index = *self.set.matches(path).first()?;
        self.patterns.get(index).map(String::as_str)
    }
}

/// The name rules of one watch: ignore, exclude, include, recursive.
pub struct Filters {
    ignore: Globs,
    include: Option<Globs>,
    exclude: Globs,
    recursive: bool,
    /// The watch's `min_size`.
    pub min_size: u64,
    /// The watch's `require_marker`.
    pub require_marker: bool,
}

impl Filters {
    /// The filters `config` sets.
    pub fn new(config: &WatchConfig) -> Self {
        Filters {
            ignore: Globs::new(&config.ignore),
            include: (!config.include.is_empty()).then(|| Globs::new(&config.include)),
            exclude: Globs::new(&config.exclude),
            recursive: config.recursive,
            min_size: config.min_size,
            require_marker: config.require_marker,
        }
    }

    /// May a folder at `relpath` be entered? (Its own name is not ignored.)
    ///
    /// # Errors
    /// The [`NotTaken`] that keeps it out.
    pub fn folder(&self, relpath: &Path) -> Result<(), NotTaken> {
        if !self.recursive {
            return Err(NotTaken::Nested);
        }
        self.ignored(relpath)
    }

    fn ignored(&self, relpath: &Path) -> Result<(), NotTaken> {
        for part in relpath.iter() {
            if let Some(pattern) = self.ignore.first_match(Path::new(part)) {
                return Err(NotTaken::Ignored {
                    pattern: pattern.to_string(),
                    component: part.to_string_lossy().into_owned(),
                });
            }
        }
        Ok(())
    }

    /// The name rules for a file at `relpath` (relative to the watch).
    ///
    /// # Errors
    /// The [`NotTaken`] that keeps it out.
    pub fn name(&self, relpath: &Path) -> Result<(), NotTaken> {
        if relpath.to_str().is_none() {
            return Err(NotTaken::NotUtf8);
        }
        self.ignored(relpath)?;
        if let Some(pattern) = self.exclude.first_match(relpath) {
            return Err(NotTaken::Excluded(pattern.to_string()));
        }
        if let Some(include) = &self.include
            && include.first_match(relpath).is_none()
        {
            return Err(NotTaken::NotIncluded(include.patterns.clone()));
        }
        if !self.recursive && relpath.components().count() > 1 {
            return Err(NotTaken::Nested);
        }
        Ok(())
    }

    /// The size rules, applied once a file is stable.
    ///
    /// # Errors
    /// [`NotTaken::Empty`] or [`NotTaken::BelowMinSize`].
    pub fn size(&self, size: u64) -> Result<(), NotTaken> {
        if size == 0 {
            return Err(NotTaken::Empty);
        }
        if size < self.min_size {
            return Err(NotTaken::BelowMinSize {
                size,
                min: self.min_size,
            });
        }
        Ok(())
    }

    /// The marker rule, applied once a file is stable and big enough.
    ///
    /// # Errors
    /// [`NotTaken::NoMarkerYet`] while neither marker exists.
    pub fn marker(&self, path: &Path) -> Result<(), NotTaken> {
        if self.require_marker && !has_marker(path) {
            return Err(NotTaken::NoMarkerYet(file_name(path)));
        }
        Ok(())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
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

/// A `.json`/`.yaml`/`.yml` file beside a video of the same stem travels
/// with that video, and a `.ready`/`.done` marker with its file: neither is
/// taken on its own. `exists` says whether a sibling is a file (a scan
/// answers from its listing).
///
/// # Errors
/// [`NotTaken::Sidecar`] or [`NotTaken::Marker`] naming the file it belongs to.
pub fn travels_with_another(path: &Path, exists: impl Fn(&Path) -> bool) -> Result<(), NotTaken> {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return Ok(());
    };
    let Some(stem) = path.file_stem() else {
        return Ok(());
    };
    if ext == "ready" || ext == "done" {
        let of = path.with_extension("");
        return if exists(&of) {
            Err(NotTaken::Marker(file_name(&of)))
        } else {
            Ok(())
        };
    }
    if !SIDECAR_EXTENSIONS.contains(&ext) {
        return Ok(());
    }
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let video = entries.flatten().map(|e| e.path()).find(|other| {
        other != path
            && other.file_stem() == Some(stem)
            && other
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| !SIDECAR_EXTENSIONS.contains(&e))
            && exists(other)
    });
    match video {
        Some(video) => Err(NotTaken::Sidecar(file_name(&video))),
        None => Ok(()),
    }
}

/// The daemon's whole decision for one path, as `check` asks it: the same
/// steps in the order the scanner takes them (folder rules, link and type,
/// name rules, sidecar or marker, size, marker), on the file as it is now.
/// `skip_roots` are the done/failed folders of every watch.
///
/// # Errors
/// The first [`NotTaken`] that applies.
pub fn judge(config: &WatchConfig, skip_roots: &[PathBuf], path: &Path) -> Result<(), NotTaken> {
    let root = config
        .path
        .canonicalize()
        .unwrap_or_else(|_| config.path.clone());
    if path == root {
        return Err(NotTaken::WatchRoot(config.name.clone()));
    }
    if let Some(filed) = skip_roots.iter().find(|s| path.starts_with(s)) {
        return Err(NotTaken::Filed(filed.clone()));
    }
    let relpath = path.strip_prefix(&root).unwrap_or(path);
    let filters = Filters::new(config);
    if let Some(folder) = relpath.parent().filter(|p| !p.as_os_str().is_empty()) {
        filters.folder(folder)?;
    }
    let meta = std::fs::symlink_metadata(path).map_err(|_| NotTaken::NotAFile)?;
    if meta.file_type().is_symlink() {
        return Err(NotTaken::Symlink);
    }
    if meta.is_dir() {
        return Err(NotTaken::Directory);
    }
    if !meta.is_file() {
        return Err(NotTaken::NotAFile);
    }
    filters.name(relpath)?;
    travels_with_another(path, Path::is_file)?;
    filters.size(meta.len())?;
    filters.marker(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let reasons = [
            NotTaken::Symlink,
            NotTaken::NotAFile,
            NotTaken::NotUtf8,
            NotTaken::Ignored {
                pattern: String::new(),
                component: String::new(),
            },
            NotTaken::Excluded(String::new()),
            NotTaken::NotIncluded(Vec::new()),
            NotTaken::Nested,
            NotTaken::Empty,
            NotTaken::BelowMinSize { size: 1, min: 2 },
        ];
        for why in reasons {
            let reason = why.reason().expect("a counted reason");
            assert!(NotTaken::REASONS.contains(&reason), "{reason}");
        }
    }

    #[test]
    fn globs_name_the_pattern_that_matched() {
        let globs = Globs::new(&["*.tmp".into(), ".*".into()]);
        assert_eq!(globs.first_match(Path::new(".x")), Some(".*"));
        assert_eq!(globs.first_match(Path::new("a.mp4")), None);
    }
}
