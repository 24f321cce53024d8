//! A crash at every durable step of a job, for every provider: the real
//! binary (built with `--features failpoints`) is stopped hard (abort, as
//! a power cut or `kill -9` would) at one step, restarted, and must then
//! deliver the file exactly once: one complete remote video with the same
//! bytes, the source in done/ once with one receipt, nothing in failed/,
//! the watch folder empty, nothing of ours left in a folder destination,
//! and any remote object a crash inside the create call may have left
//! named in the receipt. The matrix (points x providers, bytes the server
//! received over the file size, `o` where a possible orphan was named) is
//! printed.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::providers::{
    GENEROUS_RETRY, MIB, apivideo_provider, gcore_provider, id_of, movingimage_provider,
    okru_provider, wait_done,
};
use common::sandbox::{Sandbox, tus_provider};
use common::{Fixture, sha256, write_random};
use serde_json::Value;

/// The providers, by the names the matrix prints.
const PROVIDERS: [&str; 7] = [
    "folder",
    "tus",
    "okru",
    "apivideo",
    "av-parts",
    "gcore",
    "movingimage",
];

/// The steps: failpoint, its action, and whether done/ must be on another
/// filesystem (so filing copies instead of renaming).
const POINTS: [(&str, &str, bool); 9] = [
    ("create::before", "return", false),
    ("create::after", "return", false),
    ("chunk::acknowledged", "1*off->return", false),
    ("finalize::after", "return", false),
    ("filing::after_move", "return", false),
    ("filing::after_copy", "return", true),
    ("fsx::write_new::before_rename", "return", false),
    ("report::after_write", "return", false),
    (KILL_9, "", false),
];

/// Not a failpoint: a plain `kill -9` once the daemon reports bytes of the
/// file acknowledged (or later, if it is that quick).
const KILL_9: &str = "kill -9";

/// A folder on another filesystem than the temporary folders, for filing
/// across filesystems.
const OTHER_FS: &str = "/dev/shm";

/// One remote object as the sandbox holds it.
#[derive(Debug)]
struct Remote {
    id: String,
    complete: bool,
    deleted: bool,
    bytes_received: u64,
    bin: PathBuf,
}

fn provider_entry(provider: &str, sandbox: &Sandbox) -> (String, u64) {
    let settings = |chunk: u64| format!("chunk_size: {}MiB, {GENEROUS_RETRY}", chunk / MIB);
    match provider {
        "folder" => (String::new(), MIB),
        "tus" => (tus_provider("p", &sandbox.endpoint(), &settings(MIB)), MIB),
        "okru" => (okru_provider("p", sandbox, &settings(MIB)), MIB),
        "apivideo" => (apivideo_provider("p", sandbox, &settings(5 * MIB)), 5 * MIB),
        "av-parts" => (
            apivideo_provider(
                "p",
                sandbox,
                &format!("upload_mode: parts, {}", settings(5 * MIB)),
            ),
            5 * MIB,
        ),
        "gcore" => (gcore_provider("p", sandbox, &settings(MIB)), MIB),
        "movingimage" => (
            movingimage_provider("p", sandbox, &settings(2 * MIB)),
            2 * MIB,
        ),
        other => panic!("no provider {other}"),
    }
}

/// What the sandbox (or the folder destination) holds for file `name`.
fn remotes(provider: &str, sandbox: &Sandbox, fx: &Fixture, name: &str) -> Vec<Remote> {
    let stem = name.trim_end_matches(".mp4");
    let tus = |id: &str| {
        sandbox
            .uploads()
            .into_iter()
            .find(|u| u.id == id)
            .map(|u| Remote {
                id: u.id.clone(),
                complete: u.complete(),
                deleted: u.terminated,
                bytes_received: u.bytes_received,
                bin: sandbox.bin(&u.id),
            })
    };
    let record = |simulator: &str, key: &str, value: &str, id_key: &str| -> Vec<Remote> {
        sandbox
            .records_where(simulator, key, value)
            .into_iter()
            .map(|r: Value| {
                let id = id_of(&r, id_key);
                let complete = match simulator {
                    "okru" => r["received"] == r["file_size"] && r["file_size"].as_u64() > Some(0),
                    _ => r["complete"] == true,
                };
                Remote {
                    bin: sandbox.video_bin(simulator, &id),
                    id,
                    complete,
                    deleted: r["deleted"] == true,
                    bytes_received: r["bytes_received"].as_u64().unwrap_or(0),
                }
            })
            .collect()
    };
    match provider {
        "folder" => Fixture::files_in(&fx.outbox)
            .into_iter()
            .map(|f| Remote {
                bin: fx.outbox.join(&f),
                complete: true,
                deleted: false,
                bytes_received: 0,
                id: f,
            })
            .collect(),
        "tus" => sandbox
            .uploads_named(name)
            .into_iter()
            .filter_map(|u| tus(&u.id))
            .collect(),
        "okru" => record("okru", "file_name", name, "video_id"),
        "apivideo" | "av-parts" => record("apivideo", "title", stem, "video_id"),
        "gcore" => sandbox
            .records_where("gcore", "name", stem)
            .into_iter()
            .map(|v| {
                let upload = v["upload"].as_str().and_then(tus);
                Remote {
                    id: id_of(&v, "id"),
                    complete: upload.as_ref().is_some_and(|u| u.complete),
                    deleted: v["deleted"] == true,
                    bytes_received: upload.as_ref().map_or(0, |u| u.bytes_received),
                    bin: upload.map_or_else(PathBuf::new, |u| u.bin),
                }
            })
            .collect(),
        "movingimage" => record("movingimage", "file_name", name, "id"),
        other => panic!("no provider {other}"),
    }
}

/// One cell: crash `provider` at `point`, restart, check every invariant.
/// Answers the bytes received over the file size, and whether a possible
/// orphan was named.
fn crash_once(sandbox: &Sandbox, provider: &str, index: usize) -> (f64, bool) {
    let (point, action, other_fs) = POINTS[index];
    let fx = Fixture::new();
    let (entry, chunk) = provider_entry(provider, sandbox);
    let shm = other_fs.then(|| {
        tempfile::Builder::new()
            .prefix("hotfolder-matrix-")
            .tempdir_in(OTHER_FS)
            .expect("a folder on another filesystem")
    });
    let watch_extra = shm
        .as_ref()
        .map_or_else(String::new, |d| format!("done_dir: {}", d.path().display()));
    let done = shm
        .as_ref()
        .map_or_else(|| fx.done.clone(), |d| d.path().to_path_buf());
    let rule_to = if provider == "folder" { "archive" } else { "p" };
    let rules =
        format!("- match: {{}}\n  provider: {rule_to}\n  metadata: {{ title: \"{{stem}}\" }}");
    fx.write_config_parts(common::ConfigParts {
        watch: &watch_extra,
        archive: &format!("chunk_size: {}MiB", chunk / MIB),
        providers: &entry,
        rules: Some(&rules),
        ..common::ConfigParts::default()
    });
    let name = format!(
        "{provider}-{}.mp4",
        point.replace("::", "-").replace(' ', "")
    );
    let size = 2 * chunk + 12_345;
    let staged = fx.root.join(&name);
    write_random(&staged, size, index as u64 * 31 + provider.len() as u64);
    let hash = sha256(&staged);
    std::fs::rename(&staged, fx.watch.join(&name)).expect("move into the watch");

    let cell = format!("{provider} at {point}");
    if point == KILL_9 {
        let mut daemon = fx.start();
        fx.wait_for_bytes(&name, 1, Duration::from_secs(60));
        daemon.kill9();
    } else {
        fx.run_until_failpoint(&format!("{point}={action}"), Duration::from_secs(60));
    }
    let daemon = fx.start();
    wait_done(&fx, &daemon, 1, Duration::from_secs(120));
    drop(daemon);

    let receipt_name = format!("{name}.receipt.json");
    assert_eq!(
        Fixture::files_in(&done),
        vec![name.clone(), receipt_name.clone()],
        "{cell}: done/ holds the file once with one receipt"
    );
    assert!(
        Fixture::files_in(&fx.failed).is_empty(),
        "{cell}: nothing failed"
    );
    assert!(
        Fixture::files_in(&fx.watch).is_empty(),
        "{cell}: watch folder empty"
    );
    assert_eq!(sha256(&done.join(&name)), hash, "{cell}: filed bytes");
    let receipt = common::read_json(&done.join(&receipt_name));
    assert_eq!(receipt["sha256"], hash.as_str(), "{cell}: {receipt}");
    let replaced: Vec<String> = receipt["replaced"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();

    let remotes = remotes(provider, sandbox, &fx, &name);
    let complete: Vec<&Remote> = remotes
        .iter()
        .filter(|r| r.complete && !r.deleted)
        .collect();
    assert_eq!(
        complete.len(),
        1,
        "{cell}: one complete remote video: {remotes:?}"
    );
    assert_eq!(sha256(&complete[0].bin), hash, "{cell}: the remote bytes");
    let mut named_orphan = false;
    for orphan in remotes.iter().filter(|r| !r.complete && !r.deleted) {
        let named = replaced
            .iter()
            .any(|n| n.contains(&orphan.id) || n.contains("interrupted create"));
        assert!(
            named,
            "{cell}: orphan {orphan:?} not named in the receipt {receipt}"
        );
        named_orphan = true;
    }
    if provider == "folder" {
        assert!(
            !fx.outbox.join(".hotfolder-partial").exists(),
            "{cell}: nothing of ours in the destination: {:?}",
            std::fs::read_dir(fx.outbox.join(".hotfolder-partial")).map(|d| d.count())
        );
        return (1.0, named_orphan);
    }
    let received: u64 = remotes.iter().map(|r| r.bytes_received).sum();
    (received as f64 / size as f64, named_orphan)
}

#[test]
fn a_crash_at_every_step_loses_nothing_and_duplicates_nothing() {
    let root = tempfile::tempdir().expect("temp dir");
    let sandbox = Arc::new(Sandbox::start(&root.path().join("sandbox"), &[]));
    let cells: Vec<(usize, usize)> = (0..PROVIDERS.len())
        .flat_map(|p| (0..POINTS.len()).map(move |i| (p, i)))
        .collect();
    let queue = Arc::new(Mutex::new(cells));
    let results = Arc::new(Mutex::new(BTreeMap::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, results, failures, sandbox) = (
                queue.clone(),
                results.clone(),
                failures.clone(),
                sandbox.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let Some((p, i)) = queue.lock().expect("queue").pop() else {
                        return;
                    };
                    let cell = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        crash_once(&sandbox, PROVIDERS[p], i)
                    }));
                    match cell {
                        Ok(value) => {
                            results.lock().expect("results").insert((p, i), value);
                        }
                        Err(e) => {
                            let message = e
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            failures
                                .lock()
                                .expect("failures")
                                .push(format!("{} at {}: {message}", PROVIDERS[p], POINTS[i].0));
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("matrix worker");
    }

    let results = results.lock().expect("results");
    let mut table = format!("{:<12}", "provider");
    for (point, _, _) in POINTS {
        table.push_str(&format!(" {point:>w$}", w = point.len().max(9)));
    }
    table.push('\n');
    for (p, provider) in PROVIDERS.iter().enumerate() {
        table.push_str(&format!("{provider:<12}"));
        for (i, (point, _, _)) in POINTS.iter().enumerate() {
            let cell = match results.get(&(p, i)) {
                Some((resent, orphan)) => {
                    format!("{resent:.2}x{}", if *orphan { " o" } else { "" })
                }
                None => "FAILED".into(),
            };
            table.push_str(&format!(" {cell:>w$}", w = point.len().max(9)));
        }
        table.push('\n');
    }
    println!(
        "crash matrix: bytes the server received / file size (o: a possible orphan named in the receipt)\n{table}"
    );
    let failures = failures.lock().expect("failures");
    assert!(
        failures.is_empty(),
        "{} cells failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
