//! Every kind of bad config is refused by both `check` and `run` with exit
//! code 2 and one clear sentence naming `file:line:column`, the key and what
//! to do, never a panic. `--help` works on every command.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::bin;

/// A valid config; the cases below break it one way each. Line numbers:
const BASE: &str = "\
state_dir: ./state
workers: 2
defaults:
  stable_for: 1s
watches:
  - name: drop
    path: ./drop
providers:
  archive:
    type: folder
    path: ./outbox
rules:
  - match: {}
    provider: archive
";

/// An unset variable the interpolation cases refer to.
const UNSET_VAR: &str = "HOTFOLDER_TEST_SURELY_UNSET";

struct Case {
    name: &'static str,
    /// `(find, replace)` applied once to [`BASE`].
    edit: (&'static str, &'static str),
    line: usize,
    key: &'static str,
    /// Words the message must contain (what is wrong, what to do).
    says: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "a wrong value under defaults, reported where it was written",
        edit: ("stable_for: 1s", "stable_for: 0s"),
        line: 4,
        key: "defaults.stable_for",
        says: &["more than 0s"],
    },
    Case {
        name: "a bad glob under defaults",
        edit: (
            "  stable_for: 1s\n",
            "  stable_for: 1s\n  ignore: [\"a[\"]\n",
        ),
        line: 5,
        key: "defaults.ignore[0]",
        says: &["not a valid glob"],
    },
    Case {
        name: "unknown top-level key",
        edit: ("workers: 2\n", "workers: 2\nwrkers: 3\n"),
        line: 3,
        key: "wrkers",
        says: &["unknown field", "spelling"],
    },
    Case {
        name: "unknown key in a watch",
        edit: (
            "    path: ./drop\n",
            "    path: ./drop\n    stabel_for: 3s\n",
        ),
        line: 8,
        key: "watches[0].stabel_for",
        says: &["unknown field", "stable_for"],
    },
    Case {
        name: "unknown key in a provider",
        edit: (
            "    path: ./outbox\n",
            "    path: ./outbox\n    colour: red\n",
        ),
        line: 12,
        key: "providers.archive.colour",
        says: &["unknown field", "spelling"],
    },
    Case {
        name: "wrong type",
        edit: ("workers: 2", "workers: many"),
        line: 2,
        key: "workers",
        says: &["\"many\"", "whole number"],
    },
    Case {
        name: "wrong type (boolean)",
        edit: (
            "    path: ./drop\n",
            "    path: ./drop\n    recursive: maybe\n",
        ),
        line: 8,
        key: "watches[0].recursive",
        says: &["\"maybe\"", "true or false"],
    },
    Case {
        name: "watch without path",
        edit: ("    path: ./drop\n", ""),
        line: 6,
        key: "watches[0].path",
        says: &["missing", "add it"],
    },
    Case {
        name: "provider without type",
        edit: ("    type: folder\n", ""),
        line: 10,
        key: "providers.archive.type",
        says: &["missing", "add it"],
    },
    Case {
        name: "unknown provider type",
        edit: ("type: folder", "type: dropbox"),
        line: 10,
        key: "providers.archive.type",
        says: &["dropbox", "folder, okru, apivideo, gcore, movingimage, tus"],
    },
    Case {
        name: "rule naming an undefined provider",
        edit: ("provider: archive", "provider: nowhere"),
        line: 14,
        key: "rules[0].provider",
        says: &["nowhere", "define it under `providers:`"],
    },
    Case {
        name: "watch path that does not exist",
        edit: ("path: ./drop", "path: ./no-such-folder"),
        line: 7,
        key: "watches[0].path",
        says: &["no-such-folder", "does not exist", "create it"],
    },
    Case {
        name: "done_dir inside the watched tree without an exclude",
        edit: (
            "    path: ./drop\n",
            "    path: ./drop\n    done_dir: ./drop/done\n",
        ),
        line: 8,
        key: "watches[0].done_dir",
        says: &["inside watch", "exclude"],
    },
    Case {
        name: "bad size",
        edit: (
            "    path: ./drop\n",
            "    path: ./drop\n    min_size: 3 parsecs\n",
        ),
        line: 8,
        key: "watches[0].min_size",
        says: &["parsecs", "MiB"],
    },
    Case {
        name: "bad duration",
        edit: ("stable_for: 1s", "stable_for: soonish"),
        line: 4,
        key: "defaults.stable_for",
        says: &["soonish", "10s"],
    },
    Case {
        name: "unset variable without default",
        edit: ("path: ./outbox", "path: ${HOTFOLDER_TEST_SURELY_UNSET}"),
        line: 11,
        key: "providers.archive.path",
        says: &[UNSET_VAR, "not set", ":-default"],
    },
    Case {
        name: "api.video chunk_size below 5MiB",
        edit: (
            "providers:\n",
            "providers:\n  av:\n    type: apivideo\n    api_key: k\n    chunk_size: 1MiB\n",
        ),
        line: 12,
        key: "providers.av.chunk_size",
        says: &["5MiB", "raise chunk_size"],
    },
    Case {
        name: "api.video parallel parts without numbered parts",
        edit: (
            "providers:\n",
            "providers:\n  av:\n    type: apivideo\n    api_key: k\n    parallel: 4\n",
        ),
        line: 12,
        key: "providers.av.parallel",
        says: &["upload_mode: parts"],
    },
    Case {
        name: "parallel on a provider whose protocol has no parallel parts",
        edit: (
            "    path: ./outbox\n",
            "    path: ./outbox\n    parallel: 2\n",
        ),
        line: 12,
        key: "providers.archive.parallel",
        says: &["folder", "remove parallel"],
    },
    Case {
        name: "secret file that cannot be read",
        edit: (
            "providers:\n",
            "providers:\n  g:\n    type: gcore\n    api_key_file: ./no-such-key\n",
        ),
        line: 11,
        key: "providers.g.api_key_file",
        says: &["no-such-key", "cannot read"],
    },
    Case {
        name: "YAML syntax error (tab)",
        edit: ("    path: ./drop\n", "\tpath: ./drop\n"),
        line: 7,
        key: "",
        says: &["tab", "YAML syntax error", "indentation"],
    },
    Case {
        name: "YAML syntax error (unclosed quote)",
        edit: ("name: drop", "name: \"drop"),
        line: 15,
        key: "",
        says: &["quoted scalar at line 6 column 11", "YAML syntax error"],
    },
];

/// Run `hotfolder ARGS -c FILE` in `dir` without the variables a case relies
/// on being unset; a `run` that starts anyway is killed after `deadline`.
fn hotfolder(dir: &Path, args: &[&str], config: &Path) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .arg("-c")
        .arg(config)
        .current_dir(dir)
        .env_remove(UNSET_VAR)
        .env_remove("HOTFOLDER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hotfolder");
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("hotfolder output")
}

/// The `file:line:column` after which the message follows, parsed from stderr.
fn location(stderr: &str, file: &Path) -> Option<(usize, usize)> {
    let prefix = format!("{}:", file.display());
    let rest = &stderr[stderr.find(&prefix)? + prefix.len()..];
    let mut parts = rest.splitn(3, ':');
    let line = parts.next()?.parse().ok()?;
    let column = parts.next()?.parse().ok()?;
    Some((line, column))
}

fn assert_clean(case: &str, command: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{case}: `{command}` exit code; stderr: {stderr}"
    );
    for bad in ["panicked", "RUST_BACKTRACE", "Error {", "stack backtrace"] {
        assert!(
            !stderr.contains(bad),
            "{case}: `{command}` stderr has {bad:?}: {stderr}"
        );
    }
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{case}: one sentence: {stderr}"
    );
    stderr
}

#[test]
fn every_bad_config_is_refused_with_its_location_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("drop")).unwrap();
    let file = dir.path().join("hotfolder.yaml");
    std::fs::write(&file, BASE).unwrap();
    let out = hotfolder(dir.path(), &["check"], &file);
    assert!(
        out.status.success(),
        "the base config is valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for case in CASES {
        let (find, replace) = case.edit;
        assert_eq!(
            BASE.matches(find).count(),
            1,
            "{}: the edit is unambiguous",
            case.name
        );
        std::fs::write(&file, BASE.replacen(find, replace, 1)).unwrap();
        for command in ["check", "run"] {
            let stderr = assert_clean(
                case.name,
                command,
                &hotfolder(dir.path(), &[command], &file),
            );
            let (line, column) = location(&stderr, &file).unwrap_or_else(|| {
                panic!(
                    "{}: no {}:LINE:COLUMN in {stderr}",
                    case.name,
                    file.display()
                )
            });
            assert_eq!(line, case.line, "{}: line, in {stderr}", case.name);
            assert!(column >= 1, "{}: column, in {stderr}", case.name);
            if !case.key.is_empty() {
                assert!(
                    stderr.contains(&format!(":{column}: {}: ", case.key)),
                    "{}: key {} after the location, in {stderr}",
                    case.name,
                    case.key
                );
            }
            for word in case.says {
                assert!(
                    stderr.contains(word),
                    "{}: says {word:?}, in {stderr}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn a_missing_config_file_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nowhere.yaml");
    for command in ["check", "run", "status"] {
        let stderr = assert_clean(
            "missing file",
            command,
            &hotfolder(dir.path(), &[command], &file),
        );
        assert!(
            stderr.contains(&file.display().to_string()),
            "names the file: {stderr}"
        );
        assert!(stderr.contains("-c FILE"), "says what to do: {stderr}");
    }
}

#[test]
fn help_works_everywhere_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let plain = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(dir.path())
            .env_remove("HOTFOLDER_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run hotfolder")
    };
    // Every command the top-level help lists, so new ones are covered too.
    let top = plain(&["--help"]);
    assert_eq!(top.status.code(), Some(0));
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    for expected in ["run", "check", "status", "retry"] {
        assert!(commands.contains(&expected), "{expected} listed: {top}");
    }
    for command in &commands {
        for args in [vec![*command, "--help"], vec!["help", *command]] {
            let out = plain(&args);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}");
            assert!(
                stdout.contains(&format!("Usage: hotfolder {command}")),
                "{args:?}: {stdout}"
            );
        }
    }
    for args in [&["help"][..], &["--version"], &["-V"]] {
        let out = plain(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hotfolder"),
            "{args:?}"
        );
    }
    for args in [
        &["bogus"][..],
        &[],
        &["retry"],
        &["retry", "--failed", "3"],
        &["status", "--wat"],
    ] {
        let out = plain(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("Usage"),
            "{args:?} shows the usage: {stderr}"
        );
    }
}
