//! Routing: the first rule whose watch, glob and size bounds match picks the
//! provider; its metadata templates are rendered for the file, then a
//! sidecar `<stem>.json` / `<stem>.yaml` beside the video overrides them.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use globset::{Glob, GlobMatcher};
use serde_json::Value;

use crate::config::{Config, Duplicates, Rule, Unmatched};

/// What routing needs to know about a file.
#[derive(Debug, Clone)]
pub struct FileFacts<'a> {
    /// Watch name.
    pub watch: &'a str,
    /// Path relative to the watch folder.
    pub relpath: &'a Path,
    /// Absolute path.
    pub path: &'a Path,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: SystemTime,
    /// Its folder's sidecars, when the folder was listed for many files at
    /// once; `None`: each name is looked up.
    pub sidecars: Option<&'a FolderSidecars>,
}

/// The decision for one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Index of the matching rule.
    pub rule: usize,
    /// Provider name.
    pub provider: String,
    /// Rendered metadata (rule templates, then sidecar).
    pub metadata: BTreeMap<String, Value>,
    /// The sidecar that travels with the file.
    pub sidecar: Option<PathBuf>,
    /// Whether known content is skipped.
    pub duplicates: Duplicates,
    /// What the rule says ([`Rule::fingerprint`]).
    pub fingerprint: String,
}

/// Routing failed for a reason the operator must fix (e.g. a broken sidecar).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(pub String);

/// Compiled rules.
pub struct Router {
    rules: Vec<(Rule, Option<GlobMatcher>)>,
    unmatched: Unmatched,
}

/// A glob on relative paths, with the same semantics as watch include/exclude
/// (`*` may cross folders, so `*.mp4` matches at any depth).
pub fn path_glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(Glob::new(pattern)?.compile_matcher())
}

impl Router {
    /// Compile the config's rules (validated at load, so globs compile).
    pub fn new(config: &Config) -> Self {
        Router {
            rules: config
                .rules
                .iter()
                .map(|rule| {
                    (
                        rule.clone(),
                        rule.glob.as_deref().and_then(|g| path_glob(g).ok()),
                    )
                })
                .collect(),
            unmatched: config.unmatched,
        }
    }

    /// What happens to files no rule matches.
    pub fn unmatched(&self) -> Unmatched {
        self.unmatched
    }

    /// The first matching rule, rendered; `Ok(None)` when none matches.
    ///
    /// # Errors
    /// A sidecar that cannot be read or parsed.
    pub fn route(&self, facts: &FileFacts<'_>) -> Result<Option<Route>, RouteError> {
        let rule = self.rules.iter().find(|(rule, glob)| {
            rule.watch.as_deref().is_none_or(|w| w == facts.watch)
                && glob.as_ref().is_none_or(|g| g.is_match(facts.relpath))
                && rule.min_size.is_none_or(|min| facts.size >= min)
                && rule.max_size.is_none_or(|max| facts.size <= max)
        });
        rule.map(|(rule, _)| self.render(rule, facts)).transpose()
    }

    /// For `hotfolder upload --provider NAME`: the metadata of the first rule
    /// that routes to NAME (its watch and glob ignored: no watch is involved),
    /// then the sidecar; just the title from the file name when no rule names it.
    ///
    /// # Errors
    /// A sidecar that cannot be read or parsed.
    pub fn for_provider(&self, provider: &str, facts: &FileFacts<'_>) -> Result<Route, RouteError> {
        match self
            .rules
            .iter()
            .find(|(rule, _)| rule.provider == provider)
        {
            Some((rule, _)) => self.render(rule, facts),
            None => {
                let fallback = Rule {
                    index: 0,
                    watch: None,
                    glob: None,
                    min_size: None,
                    max_size: None,
                    provider: provider.to_string(),
                    metadata: BTreeMap::from([(
                        "title".to_string(),
                        Value::String("{stem}".into()),
                    )]),
                    duplicates: Duplicates::Skip,
                    notify: Vec::new(),
                    fingerprint: String::new(),
                }
                .with_fingerprint();
                self.render(&fallback, facts)
            }
        }
    }

    /// A rule's templates rendered for a file, then its sidecar on top.
    fn render(&self, rule: &Rule, facts: &FileFacts<'_>) -> Result<Route, RouteError> {
        let mut metadata: BTreeMap<String, Value> = rule
            .metadata
            .iter()
            .map(|(key, value)| (key.clone(), render_value(value, facts)))
            .collect();
        let sidecar = find_sidecar(facts.path, facts.sidecars);
        if let Some(path) = &sidecar {
            for (key, value) in read_sidecar(path)? {
                metadata.insert(key, value);
            }
        }
        Ok(Route {
            rule: rule.index,
            provider: rule.provider.clone(),
            metadata,
            sidecar,
            duplicates: rule.duplicates,
            fingerprint: rule.fingerprint.clone(),
        })
    }
}

/// Extensions a sidecar may have.
pub const SIDECAR_EXTENSIONS: &[&str] = &["json", "yaml", "yml"];

/// `<stem>.json|yaml|yml` beside `video`, if one exists: a regular file,
/// or a symbolic link (found so that the job can say it is never read).
/// Answered from `listed` when its folder was listed, else by a look at
/// each name.
pub fn find_sidecar(video: &Path, listed: Option<&FolderSidecars>) -> Option<PathBuf> {
    let stem = video.file_stem()?;
    SIDECAR_EXTENSIONS.iter().find_map(|ext| {
        let mut name = stem.to_owned();
        name.push(".");
        name.push(ext);
        let candidate = video.with_file_name(&name);
        let there = match listed {
            Some(listed) => listed.0.contains(&name),
            None => std::fs::symlink_metadata(&candidate)
                .is_ok_and(|meta| meta.is_file() || meta.file_type().is_symlink()),
        };
        (candidate != video && there).then_some(candidate)
    })
}

/// The sidecars in one folder (files and links named `*.json|yaml|yml`),
/// listed once for many of its files found ready together. Each file
/// alone looks up three names, which are usually not there, in a folder a
/// drop is filling or emptying at the same time: a lookup of a missing
/// name in a big folder costs tens of microseconds, a listed name a
/// fraction of one.
#[derive(Debug, Default)]
pub struct FolderSidecars(HashSet<OsString>);

impl FolderSidecars {
    /// Files found ready together in one folder from which it is listed.
    pub const WORTH_FROM: usize = 32;

    /// Entries read per file it answers for, at most: past that the folder
    /// is so big that looking up each file's names costs less.
    pub const ENTRIES_PER_FILE: usize = 200;

    /// `folder`'s sidecars, reading at most `most` entries; `None` when it
    /// holds more or cannot be read (each file then looks its own up).
    pub fn list(folder: &Path, most: usize) -> Option<Self> {
        let mut names = HashSet::new();
        for (read, entry) in std::fs::read_dir(folder).ok()?.enumerate() {
            if read >= most {
                return None;
            }
            let entry = entry.ok()?;
            let name = entry.file_name();
            let sidecar_like = Path::new(&name)
                .extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| SIDECAR_EXTENSIONS.contains(&ext));
            if !sidecar_like {
                continue;
            }
            // The kind from the listing itself where the file system gives it.
            let kind = entry.file_type().ok()?;
            if kind.is_file() || kind.is_symlink() {
                names.insert(name);
            }
        }
        Some(FolderSidecars(names))
    }
}

/// Read a sidecar, never through a symbolic link (it could point at any
/// file the daemon can read). Errors name the file and the position of a
/// parse error, never its content.
fn read_sidecar(path: &Path) -> Result<BTreeMap<String, Value>, RouteError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(RouteError(format!(
                "sidecar {} is a symbolic link; sidecars are never read through a link: put the file itself there, then retry the job",
                path.display()
            )));
        }
        Err(e) => {
            return Err(RouteError(format!(
                "cannot read sidecar {}: {e}",
                path.display()
            )));
        }
    };
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| RouteError(format!("cannot read sidecar {}: {e}", path.display())))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let parsed: Result<BTreeMap<String, Value>, String> = if is_json {
        serde_json::from_str(&text).map_err(|e| format!("line {}, column {}", e.line(), e.column()))
    } else {
        serde_yaml::from_str(&text).map_err(|e| {
            e.location().map_or_else(
                || "the document as a whole".to_string(),
                |at| format!("line {}, column {}", at.line(), at.column()),
            )
        })
    };
    parsed.map_err(|at| {
        RouteError(format!(
            "sidecar {} is not a {} object of metadata keys (the error is at {at}); fix or remove it, then retry the job",
            path.display(),
            if is_json { "JSON" } else { "YAML" }
        ))
    })
}

fn render_value(value: &Value, facts: &FileFacts<'_>) -> Value {
    match value {
        Value::String(template) => Value::String(render(template, facts)),
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(v, facts)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_value(v, facts)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Render `{name}`, `{stem}`, `{ext}`, `{dir}`, `{relpath}`, `{watch}`,
/// `{size}`, `{mtime:FMT}`, `{now:FMT}` (strftime; RFC 3339 without FMT).
/// `{{` and `}}` are literal braces; unknown placeholders stay as written.
pub fn render(template: &str, facts: &FileFacts<'_>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('}') {
            out.push('}');
            rest = after;
            continue;
        }
        let Some(close) = tail.find('}') else {
            out.push_str(tail);
            return out;
        };
        let inner = &tail[1..close];
        match placeholder(inner, facts) {
            Some(value) => out.push_str(&value),
            None => out.push_str(&tail[..=close]),
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    out
}

fn placeholder(inner: &str, facts: &FileFacts<'_>) -> Option<String> {
    let (name, format) = match inner.split_once(':') {
        Some((name, format)) => (name, Some(format)),
        None => (inner, None),
    };
    let lossy = |p: Option<&std::ffi::OsStr>| {
        p.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let time = |t: SystemTime| -> Option<String> {
        let zoned = jiff::Timestamp::try_from(t)
            .ok()?
            .to_zoned(jiff::tz::TimeZone::system());
        Some(match format {
            Some(fmt) => jiff::fmt::strtime::format(fmt, &zoned).ok()?,
            None => zoned.timestamp().to_string(),
        })
    };
    match (name, format) {
        ("name", None) => Some(lossy(facts.relpath.file_name())),
        ("stem", None) => Some(lossy(facts.relpath.file_stem())),
        ("ext", None) => Some(lossy(facts.relpath.extension())),
        ("dir", None) => Some(lossy(facts.relpath.parent().map(Path::as_os_str))),
        ("relpath", None) => Some(facts.relpath.to_string_lossy().into_owned()),
        ("watch", None) => Some(facts.watch.to_string()),
        ("size", None) => Some(facts.size.to_string()),
        ("mtime", _) => time(facts.mtime),
        ("now", _) => time(SystemTime::now()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(relpath: &'a Path, path: &'a Path) -> FileFacts<'a> {
        FileFacts {
            watch: "studio-a",
            relpath,
            path,
            size: 2048,
            mtime: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 365),
            sidecars: None,
        }
    }

    #[test]
    fn a_folder_listed_once_answers_for_its_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a.mp4",
            "a.json",
            "b.mp4",
            "c.mp4",
            "c.yml",
            "d.mp4",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("d.yaml")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("b.yaml")).unwrap();
        let listed = FolderSidecars::list(dir.path(), 100).expect("listed");
        let sidecar = |video: &str| find_sidecar(&dir.path().join(video), Some(&listed));
        assert_eq!(sidecar("a.mp4"), Some(dir.path().join("a.json")));
        assert_eq!(
            sidecar("b.mp4"),
            Some(dir.path().join("b.yaml")),
            "a link is found (never read)"
        );
        assert_eq!(sidecar("c.mp4"), Some(dir.path().join("c.yml")));
        assert_eq!(sidecar("d.mp4"), None, "a folder is no sidecar");
        // What the listing says, not what is there now.
        std::fs::remove_file(dir.path().join("a.json")).unwrap();
        assert_eq!(sidecar("a.mp4"), Some(dir.path().join("a.json")));
        assert_eq!(find_sidecar(&dir.path().join("a.mp4"), None), None);
        assert!(
            FolderSidecars::list(dir.path(), 3).is_none(),
            "a folder bigger than the listing is worth is not listed"
        );
    }

    #[test]
    fn templates() {
        let rel = Path::new("promo/x/My Clip.mp4");
        let f = facts(rel, rel);
        assert_eq!(render("{stem}", &f), "My Clip");
        assert_eq!(
            render("{name}|{ext}|{dir}|{watch}|{size}", &f),
            "My Clip.mp4|mp4|promo/x|studio-a|2048"
        );
        assert_eq!(render("{{literal}} {unknown}", &f), "{literal} {unknown}");
        assert!(render("{mtime:%Y}", &f).starts_with("197"));
        assert_eq!(render("{now:%Y}", &f).len(), 4);
    }

    #[test]
    fn first_match_wins_and_sidecar_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "watches:\n  - name: studio-a\n    path: {}\nproviders:\n  a: {{ type: folder, path: /o/a }}\n  b: {{ type: folder, path: /o/b }}\nrules:\n  - match: {{ glob: \"promo/**/*.mp4\" }}\n    provider: a\n    metadata: {{ title: \"{{stem}}\", tags: [promo, \"{{watch}}\"] }}\n  - match: {{ min_size: 1KiB }}\n    provider: b\n",
            dir.path().display()
        );
        let config = crate::config::load_str(&dir.path().join("c.yaml"), &text).unwrap();
        let router = Router::new(&config);
        let video = dir.path().join("promo/x/clip.mp4");
        std::fs::create_dir_all(video.parent().unwrap()).unwrap();
        let rel = Path::new("promo/x/clip.mp4");
        let route = router.route(&facts(rel, &video)).unwrap().unwrap();
        assert_eq!(route.provider, "a");
        assert_eq!(route.fingerprint, config.rules[0].said());
        assert_eq!(route.metadata["title"], "clip");
        assert_eq!(
            route.metadata["tags"],
            serde_json::json!(["promo", "studio-a"])
        );
        std::fs::write(
            video.with_extension("json"),
            r#"{"title": "From sidecar", "public": true}"#,
        )
        .unwrap();
        let route = router.route(&facts(rel, &video)).unwrap().unwrap();
        assert_eq!(route.metadata["title"], "From sidecar");
        assert_eq!(route.metadata["public"], true);
        assert!(route.sidecar.is_some());
        std::fs::write(video.with_extension("json"), "{not json").unwrap();
        assert!(
            router
                .route(&facts(rel, &video))
                .unwrap_err()
                .0
                .contains("clip.json")
        );
        // Outside promo/: the size bound routes to b.
        let rel = Path::new("promo.mp4");
        assert_eq!(
            router.route(&facts(rel, rel)).unwrap().unwrap().provider,
            "b"
        );
        let mut small = facts(rel, rel);
        small.size = 10;
        assert_eq!(router.route(&small).unwrap(), None);
    }
}
