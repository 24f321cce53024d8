//! Every config snippet in the README and under docs/ is read the way a
//! user would paste it, so none can rot: each ```yaml block, and each inline
//! `key: value` span, must parse as YAML; a snippet whose keys are top-level
//! config keys (`http: { ... }`, `providers: ...`) is merged into a minimal
//! config and validated by `hotfolder check`, with its `${VARIABLES}` set
//! and the folders it names created.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::{Mapping, Value};

/// Keys `hotfolder` accepts at the top of its config.
const TOP_LEVEL: [&str; 13] = [
    "state_dir",
    "bandwidth",
    "notify",
    "store",
    "workers",
    "shutdown_timeout",
    "log",
    "http",
    "defaults",
    "watches",
    "providers",
    "rules",
    "unmatched",
];

/// One snippet: where it was found and its text.
struct Snippet {
    place: String,
    text: String,
}

fn markdown_files() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("docs/ is readable")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// ```yaml blocks and inline spans that start with `key: `.
fn snippets(path: &Path) -> Vec<Snippet> {
    let text = std::fs::read_to_string(path).expect("read markdown");
    let name = path
        .strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
        .display()
        .to_string();
    let mut out = Vec::new();
    let mut block: Option<(usize, String)> = None;
    let mut fenced = false;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(fence) = trimmed.strip_prefix("```") {
            match block.take() {
                Some((start, body)) => out.push(Snippet {
                    place: format!("{name}:{}", start + 1),
                    text: body,
                }),
                None if !fenced && fence.trim() == "yaml" => block = Some((number, String::new())),
                None => {}
            }
            fenced = !fenced;
            continue;
        }
        if let Some((_, body)) = block.as_mut() {
            body.push_str(line);
            body.push('\n');
            continue;
        }
        if fenced {
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            let is_code = i % 2 == 1;
            let key = span.split(": ").next().unwrap_or("");
            if is_code
                && span.contains(": ")
                && !key.is_empty()
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                out.push(Snippet {
                    place: format!("{name}:{}", number + 1),
                    text: span.to_string(),
                });
            }
        }
    }
    out
}

/// `${NAME}` and `${NAME:-default}` variables a snippet uses.
fn variables(text: &str) -> Vec<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split('}').next())
        .map(|inner| inner.split(":-").next().unwrap_or(inner).to_string())
        .collect()
}

/// Merge a top-level fragment into a config that runs on its own, and
/// validate it with `hotfolder check`. Answers the complaint, if any.
fn check_as_config(snippet: &Snippet, fragment: &Mapping) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config: Mapping = serde_yaml::from_str(
        "state_dir: ./state\n\
         watches:\n  - name: drop\n    path: ./drop\n\
         providers:\n  archive: { type: folder, path: ./outbox }\n",
    )
    .expect("base config");
    for (key, value) in fragment {
        config.insert(key.clone(), value.clone());
    }
    // Folders the snippet's watches name (relative ones) must exist.
    std::fs::create_dir_all(dir.path().join("drop")).expect("drop");
    if let Some(Value::Sequence(watches)) = config.get("watches") {
        for watch in watches {
            if let Some(path) = watch.get("path").and_then(Value::as_str)
                && !path.starts_with('/')
            {
                std::fs::create_dir_all(dir.path().join(path)).expect("watch folder");
            }
        }
    }
    // A secret read from a file (`token_file: /etc/...`) is read from one
    // that exists here.
    let mut secrets = 0;
    let mut value = Value::Mapping(config);
    provide_secret_files(&mut value, dir.path(), &mut secrets);
    let file = dir.path().join("hotfolder.yaml");
    std::fs::write(&file, serde_yaml::to_string(&value).expect("yaml")).expect("write");
    let mut command = Command::new(common::bin());
    command
        .arg("check")
        .arg("-c")
        .arg(&file)
        .current_dir(dir.path());
    for variable in variables(&snippet.text) {
        // A URL variable holds a URL (a database URL is checked as one).
        let value = if variable.ends_with("_URL") {
            "postgres://hotfolder@127.0.0.1:5432/hotfolder"
        } else {
            "a-value-from-the-environment"
        };
        command.env(variable, value);
    }
    let out = command.output().expect("run hotfolder check");
    (!out.status.success()).then(|| {
        format!(
            "{}: `hotfolder check` refuses it:\n{}\n{}",
            snippet.place,
            snippet.text,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Point every `*_file` key at a file made in `dir` holding a secret.
fn provide_secret_files(value: &mut Value, dir: &Path, made: &mut usize) {
    match value {
        Value::Mapping(map) => {
            for (key, inner) in map.iter_mut() {
                if key.as_str().is_some_and(|k| k.ends_with("_file")) && inner.is_string() {
                    *made += 1;
                    let path = dir.join(format!("secret-{made}"));
                    std::fs::write(&path, "a-secret-from-a-file\n").expect("secret file");
                    *inner = Value::String(path.display().to_string());
                } else {
                    provide_secret_files(inner, dir, made);
                }
            }
        }
        Value::Sequence(items) => {
            for item in items {
                provide_secret_files(item, dir, made);
            }
        }
        _ => {}
    }
}

#[test]
fn every_config_snippet_in_the_docs_is_valid() {
    let mut checked = 0;
    let mut complaints = Vec::new();
    for file in markdown_files() {
        for snippet in snippets(&file) {
            checked += 1;
            let value: Value = match serde_yaml::from_str(&snippet.text) {
                Ok(value) => value,
                Err(e) => {
                    complaints.push(format!(
                        "{}: not YAML as written ({e}):\n{}",
                        snippet.place, snippet.text
                    ));
                    continue;
                }
            };
            let Value::Mapping(map) = &value else {
                continue;
            };
            let top_level = map
                .keys()
                .all(|k| k.as_str().is_some_and(|k| TOP_LEVEL.contains(&k)));
            if top_level && let Some(complaint) = check_as_config(&snippet, map) {
                complaints.push(complaint);
            }
        }
    }
    println!("{checked} config snippets checked");
    assert!(checked >= 10, "the docs hold config snippets: {checked}");
    assert!(complaints.is_empty(), "{}", complaints.join("\n\n"));
}
