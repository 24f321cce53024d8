//! A chaos soak: one daemon delivers a mixed workload to every provider at
//! one faulty sandbox (500s, dropped connections, 429s, a bandwidth cap so
//! that uploads last long enough to be cut), is `kill -9`ed at random
//! instants `SOAK_KILLS` times (default 20) and restarted after each kill,
//! then left to finish. It prints a summary first (lost, duplicated, stuck,
//! failed, orphans named and unnamed, bytes each server received per byte of
//! source) and then asserts SPEC §4: nothing lost, nothing twice, nothing
//! stuck or failed, every file in done/ once with a receipt whose sha256
//! matches, the folder provider's destination holding what it delivered.
//!
//! `SOAK_SEED` replays a run's choices (file sizes and contents, kill
//! instants, the sandbox's fault dice); the timing between daemon and
//! sandbox still differs from run to run. `scripts/soak [KILLS]` runs this
//! test alone with more kills; `SOAK_KEEP=1` keeps the run's folder (daemon
//! logs, state, sandbox data) for a look afterwards.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::providers::{
    GENEROUS_RETRY, MIB, apivideo_provider, gcore_provider, id_of, movingimage_provider,
    okru_provider, stem,
};
use common::sandbox::{Sandbox, tus_provider};
use common::{ConfigParts, Fixture, field, poll, read_json, same_bytes, sha256, write_random};

/// Kills when `SOAK_KILLS` is not set (the test suite's run).
const DEFAULT_KILLS: u32 = 20;
/// A kill comes this long at most after the restarted daemon says it runs.
const MAX_KILL_DELAY: Duration = Duration::from_millis(2500);
/// How long the last daemon may take to finish everything after the kills.
const DRAIN_DEADLINE: Duration = Duration::from_secs(180);
/// Sandbox faults: 5% 500s, 5% dropped connections, a 429 every 25th
/// request, and a bandwidth cap shared by every request.
const FAULTS: [&str; 8] = [
    "--fail-rate",
    "0.05",
    "--reset-rate",
    "0.05",
    "--rate-limit-every",
    "25",
    "--throttle",
    "16MiB",
];

/// Where a provider delivers: which simulator (or the local folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tus,
    Okru,
    ApiVideo,
    Gcore,
    Movingimage,
    Folder,
}

/// One configured provider. Its name is also the folder its files are
/// dropped in (`<name>/**` routes to it).
struct Target {
    name: &'static str,
    kind: Kind,
    chunk: u64,
    /// Settings before `chunk_size` and the retry block.
    extra: &'static str,
    /// Byte ranges of the three files a batch drops for it: under one
    /// chunk, a few chunks, many chunks.
    sizes: [(u64, u64); 3],
    /// Its `providers:` entry at a sandbox (the folder provider is the
    /// fixture's own `archive`).
    entry: Option<fn(&str, &Sandbox, &str) -> String>,
}

const ONE_MIB_SIZES: [(u64, u64); 3] = [(1, MIB / 2), (MIB + 1, 3 * MIB), (5 * MIB, 8 * MIB)];
/// api.video chunks are 5 MiB at least.
const APIVIDEO_SIZES: [(u64, u64); 3] = [
    (1, 2 * MIB),
    (5 * MIB + 1, 8 * MIB),
    (10 * MIB + 1, 12 * MIB),
];

const TARGETS: [Target; 7] = [
    Target {
        name: "tus",
        kind: Kind::Tus,
        chunk: MIB,
        extra: "",
        sizes: ONE_MIB_SIZES,
        entry: Some(|name, sandbox, settings| tus_provider(name, &sandbox.endpoint(), settings)),
    },
    Target {
        name: "ok",
        kind: Kind::Okru,
        chunk: MIB,
        extra: "",
        sizes: ONE_MIB_SIZES,
        entry: Some(okru_provider),
    },
    Target {
        name: "avb",
        kind: Kind::ApiVideo,
        chunk: 5 * MIB,
        extra: "upload_mode: bytes",
        sizes: APIVIDEO_SIZES,
        entry: Some(apivideo_provider),
    },
    Target {
        name: "avp",
        kind: Kind::ApiVideo,
        chunk: 5 * MIB,
        extra: "upload_mode: parts",
        sizes: APIVIDEO_SIZES,
        entry: Some(apivideo_provider),
    },
    Target {
        name: "gc",
        kind: Kind::Gcore,
        chunk: MIB,
        extra: "",
        sizes: ONE_MIB_SIZES,
        entry: Some(gcore_provider),
    },
    Target {
        name: "mi",
        kind: Kind::Movingimage,
        chunk: MIB,
        extra: "",
        sizes: ONE_MIB_SIZES,
        entry: Some(movingimage_provider),
    },
    Target {
        name: "archive",
        kind: Kind::Folder,
        chunk: MIB,
        extra: "",
        sizes: ONE_MIB_SIZES,
        entry: None,
    },
];

/// One dropped file.
struct Source {
    /// Path relative to the watch folder (`<target>/<name>`).
    relpath: String,
    name: String,
    target: usize,
    size: u64,
    sha256: String,
}

/// One remote object a simulator holds, attributed to a file by the name
/// it was created with.
struct Remote {
    /// The simulator holding it (`tus upload`, `okru`, `gcore video`, ...).
    what: &'static str,
    /// The file it was made for (`filename`, `file_name`, or a title from `{stem}`).
    file: String,
    id: String,
    /// `hotfolder_job` tag (`<installation>-<job>`), where the protocol
    /// carries one.
    tag: Option<String>,
    /// The job its tag names.
    job_tag: Option<u64>,
    complete: bool,
    deleted: bool,
    /// Body bytes the server received for it, resends included.
    received: u64,
    /// Where its bytes are (Gcore videos: the bytes of their tus upload).
    bin: Option<PathBuf>,
    /// Counts for duplicates (a Gcore video does; its tus upload is its bytes).
    holds_file: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn kill_9_at_random_instants_loses_and_duplicates_nothing() {
    let kills: u32 = env_or("SOAK_KILLS", DEFAULT_KILLS);
    let seed: u64 = env_or(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000),
    );
    println!("soak: seed {seed}, {kills} kills (replay: SOAK_SEED={seed} SOAK_KILLS={kills})");
    let mut rng = StdRng::seed_from_u64(seed);

    let fx = Fixture::new();
    let seed_text = seed.to_string();
    let mut options = FAULTS.to_vec();
    options.extend(["--seed", &seed_text]);
    let sandbox = Sandbox::start(&fx.root.join("sandbox"), &options);
    write_config(&fx, &sandbox);

    let started = Instant::now();
    let mut sources = Vec::new();
    drop_batch(&fx, &mut rng, 0, &mut sources);
    let mut batches = 1;
    for _ in 0..kills {
        // Keep every daemon busy: a new batch once the last one is through,
        // written while no daemon runs so that the kill instant stays
        // random from the start (new files are created right after it).
        if Fixture::files_in(&fx.watch).is_empty() {
            drop_batch(&fx, &mut rng, batches, &mut sources);
            batches += 1;
        }
        let mut daemon = fx.start();
        std::thread::sleep(rng.random_range(Duration::ZERO..=MAX_KILL_DELAY));
        daemon.kill9();
    }
    let kill_phase = started.elapsed();

    let daemon = fx.start();
    let drained = poll(DRAIN_DEADLINE, || {
        if !Fixture::files_in(&fx.watch).is_empty() {
            return None;
        }
        let rows = fx.status();
        rows.iter().all(terminal).then_some(rows)
    });
    let finished = drained.is_some();
    let rows = drained.unwrap_or_else(|| fx.status());
    let took = started.elapsed();

    let report = Report::gather(&fx, &sandbox, &sources, &rows);
    report.print(&sandbox, kills, batches, kill_phase, took, finished);
    drop(daemon);
    if std::env::var_os("SOAK_KEEP").is_some() {
        println!("kept the run's folder: {}", fx.dir.keep().display());
    }
    report.assert_clean();
}

/// Route `<target>/**` to each target, with generous retries for the faults.
fn write_config(fx: &Fixture, sandbox: &Sandbox) {
    let mut providers = String::new();
    let mut archive = String::new();
    let mut rules = String::new();
    for target in &TARGETS {
        let chunk = format!("chunk_size: {}MiB", target.chunk / MIB);
        match target.entry {
            Some(entry) => {
                let settings = [target.extra, &chunk, GENEROUS_RETRY]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ");
                providers.push_str(&entry(target.name, sandbox, &settings));
            }
            None => archive = format!("{chunk}\n{GENEROUS_RETRY}"),
        }
        rules.push_str(&format!(
            "- match: {{ glob: \"{name}/**\" }}\n  provider: {name}\n  metadata: {{ title: \"{{stem}}\", description: \"soak: {{relpath}}\" }}\n",
            name = target.name
        ));
    }
    fx.write_config_parts(ConfigParts {
        archive: &archive,
        providers: &providers,
        rules: Some(&rules),
        ..ConfigParts::default()
    });
}

/// Three files per target, random sizes and bytes, written beside the watch
/// folder and renamed in whole.
fn drop_batch(fx: &Fixture, rng: &mut StdRng, batch: usize, sources: &mut Vec<Source>) {
    for (target, t) in TARGETS.iter().enumerate() {
        for (i, (low, high)) in t.sizes.iter().enumerate() {
            let name = format!("{}-b{batch}-{i}.mp4", t.name);
            let relpath = format!("{}/{name}", t.name);
            let size = rng.random_range(*low..=*high);
            let staged = fx.root.join("staging").join(&relpath);
            write_random(&staged, size, rng.random());
            let hash = sha256(&staged);
            let dropped = fx.watch.join(&relpath);
            fs::create_dir_all(dropped.parent().expect("a parent folder"))
                .unwrap_or_else(|e| panic!("create the folder of {relpath}: {e}"));
            fs::rename(&staged, &dropped)
                .unwrap_or_else(|e| panic!("rename {relpath} into the watch folder: {e}"));
            sources.push(Source {
                relpath,
                name,
                target,
                size,
                sha256: hash,
            });
        }
    }
}

fn terminal(row: &Value) -> bool {
    matches!(
        row["state"].as_str(),
        Some("done" | "failed" | "superseded")
    )
}

/// Every remote object the simulators hold.
fn remotes(sandbox: &Sandbox) -> Vec<Remote> {
    let mut all = Vec::new();
    let uploads = sandbox.uploads();
    for u in &uploads {
        let gcore_leg = u.metadata.contains_key("video_id");
        all.push(Remote {
            what: if gcore_leg {
                "gcore tus upload"
            } else {
                "tus upload"
            },
            file: u.filename().to_string(),
            id: u.id.clone(),
            tag: u.metadata.get("hotfolder_job").cloned(),
            job_tag: u.metadata.get("hotfolder_job").and_then(|j| job_of_tag(j)),
            complete: u.complete(),
            deleted: u.terminated,
            received: u.bytes_received,
            bin: Some(sandbox.bin(&u.id)),
            holds_file: !gcore_leg,
        });
    }
    for r in sandbox.records("okru") {
        let complete = r["received"].as_u64() == r["file_size"].as_u64();
        all.push(video(
            sandbox,
            &r,
            "okru",
            ("video_id", "file_name"),
            complete,
            None,
        ));
    }
    for r in sandbox.records("apivideo") {
        let tag = r["metadata"].as_array().and_then(|pairs| {
            pairs
                .iter()
                .find(|p| p["key"] == "hotfolder_job")
                .and_then(|p| Some(p["value"].as_str()?.to_string()))
        });
        let complete = r["complete"] == true;
        all.push(video(
            sandbox,
            &r,
            "apivideo",
            ("video_id", "title"),
            complete,
            tag,
        ));
    }
    for r in sandbox.records("gcore") {
        let leg = r["upload"]
            .as_str()
            .and_then(|id| uploads.iter().find(|u| u.id == id));
        all.push(Remote {
            what: "gcore video",
            file: r["name"].as_str().unwrap_or_default().to_string(),
            id: id_of(&r, "id"),
            tag: None,
            job_tag: None,
            complete: leg.is_some_and(|u| u.complete()),
            deleted: r["deleted"] == true,
            received: 0,
            bin: leg.map(|u| sandbox.bin(&u.id)),
            holds_file: true,
        });
    }
    for r in sandbox.records("movingimage") {
        let complete = r["complete"] == true;
        all.push(video(
            sandbox,
            &r,
            "movingimage",
            ("id", "file_name"),
            complete,
            None,
        ));
    }
    all
}

/// A simulator's video record (its id and the file it was made for under
/// `keys`) as a remote object holding the bytes kept beside it.
fn video(
    sandbox: &Sandbox,
    record: &Value,
    simulator: &'static str,
    (id_key, file_key): (&str, &str),
    complete: bool,
    tag: Option<String>,
) -> Remote {
    let id = id_of(record, id_key);
    Remote {
        what: simulator,
        file: record[file_key].as_str().unwrap_or_default().to_string(),
        job_tag: tag.as_deref().and_then(job_of_tag),
        tag,
        complete,
        deleted: record["deleted"] == true,
        received: record["bytes_received"].as_u64().unwrap_or(0),
        bin: Some(sandbox.video_bin(simulator, &id)),
        holds_file: true,
        id,
    }
}

/// The job a log line speaks of: its `job{id=N ...}` span, else a `job=N` field.
fn job_of_line(line: &str) -> Option<u64> {
    let digits = |text: &str| {
        text.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    match line.split_once("job{id=") {
        Some((_, rest)) => digits(rest),
        None => field(line, "job").and_then(digits),
    }
}

/// True when `text` names `id` as a whole word (not inside a longer id).
/// The job id in a `hotfolder_job` tag (`<installation>-<job>`).
fn job_of_tag(tag: &str) -> Option<u64> {
    tag.rsplit('-').next()?.parse().ok()
}

fn mentions(text: &str, id: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    text.match_indices(id).any(|(at, _)| {
        !word(text[..at].chars().next_back()) && !word(text[at + id.len()..].chars().next())
    })
}

/// Per-target counts for the table.
#[derive(Default, Clone)]
struct Tally {
    files: usize,
    bytes: u64,
    /// Bytes of the files that go to a server (not the folder provider).
    remote_bytes: u64,
    lost: usize,
    duplicated: usize,
    stuck: usize,
    failed: usize,
    orphans_unnamed: usize,
    orphans_noted: usize,
    orphans_named: usize,
    received: u64,
    sent: u64,
    resumes: usize,
    replaced: usize,
    retries: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.remote_bytes += other.remote_bytes;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.stuck += other.stuck;
        self.failed += other.failed;
        self.orphans_unnamed += other.orphans_unnamed;
        self.orphans_noted += other.orphans_noted;
        self.orphans_named += other.orphans_named;
        self.received += other.received;
        self.sent += other.sent;
        self.resumes += other.resumes;
        self.replaced += other.replaced;
        self.retries += other.retries;
    }
}

/// What the run left behind, checked.
#[derive(Default)]
struct Report {
    tallies: Vec<Tally>,
    lost: Vec<String>,
    duplicated: Vec<String>,
    stuck: Vec<String>,
    failed: Vec<String>,
    done_problems: Vec<String>,
    watch_left: Vec<String>,
    outbox_problems: Vec<String>,
    outbox_partials: Vec<String>,
    outbox_markers: usize,
    orphans: Vec<String>,
    notes: usize,
}

impl Report {
    fn gather(fx: &Fixture, sandbox: &Sandbox, sources: &[Source], rows: &[Value]) -> Self {
        let mut report = Report {
            tallies: vec![Tally::default(); TARGETS.len()],
            ..Report::default()
        };
        let logs = daemon_logs(fx);
        let remotes = remotes(sandbox);
        let by_name: HashMap<&str, &Source> = sources
            .iter()
            .flat_map(|s| [(s.name.as_str(), s), (stem(&s.name), s)])
            .collect();
        let job_of: HashMap<u64, &Value> = rows
            .iter()
            .filter_map(|r| Some((r["id"].as_u64()?, r)))
            .collect();
        let target_of_job = |id: u64| {
            let provider = job_of.get(&id)?["provider"].as_str()?;
            TARGETS.iter().position(|t| t.name == provider)
        };

        // The log's own account, per target: resumes, replacements, retries;
        // and the jobs it named as possibly orphaning an object in create.
        let mut noted_jobs = BTreeSet::new();
        for line in logs.lines() {
            let job = job_of_line(line);
            if line.contains("interrupted create call may have left") {
                report.notes += 1;
                noted_jobs.extend(job);
            }
            let Some(t) = job.and_then(target_of_job) else {
                continue;
            };
            let tally = &mut report.tallies[t];
            if line.contains(" resuming ") {
                tally.resumes += 1;
            } else if line.contains("starting a new remote upload") {
                tally.replaced += 1;
            } else if line.contains("attempt failed; will retry") {
                tally.retries += 1;
            }
        }

        // Everything that names a remote object: the logs and every
        // receipt's `replaced` list.
        let mut naming = logs.clone();
        for file in Fixture::files_in(&fx.done) {
            if file.ends_with(".receipt.json") {
                let receipt = read_json(&fx.done.join(&file));
                for replaced in receipt["replaced"].as_array().into_iter().flatten() {
                    naming.push_str(&format!("\n{}", replaced.as_str().unwrap_or_default()));
                }
            }
        }

        for s in sources {
            report.check_source(fx, s, rows, &remotes);
        }
        for r in remotes.iter().filter(|r| !r.complete && !r.deleted) {
            let source = by_name.get(r.file.as_str()).copied();
            let t = source.map(|s| s.target);
            // Named: by its id, which is what finds it again, or by a
            // possible-orphan note that quotes the name it carries (where
            // the provider keeps no tag and has no lookup) or its whole
            // `hotfolder_job` tag (a Gcore video's upload session, which
            // the video's own record does not list). Noted: its job logged
            // that an interrupted create may have left an object.
            let quoted = format!("{:?}", r.file);
            let tagged = r.tag.as_ref().map(|tag| format!("hotfolder_job={tag}"));
            let named = mentions(&naming, &r.id)
                || naming.lines().any(|l| {
                    l.contains("interrupted create")
                        && (l.contains(&quoted)
                            || tagged.as_deref().is_some_and(|t| mentions(l, t)))
                });
            let noted = !named
                && (r.job_tag.is_some_and(|j| noted_jobs.contains(&j))
                    || source.is_some_and(|s| {
                        rows.iter().any(|row| {
                            row["file"] == s.relpath.as_str()
                                && row["id"].as_u64().is_some_and(|j| noted_jobs.contains(&j))
                        })
                    }));
            let label = match (named, noted, r.job_tag.is_some()) {
                (true, _, _) => "named by its id, or by the name or the tag it carries",
                (false, true, true) => {
                    "unnamed; a possible-orphan note names its job, which its hotfolder_job tag matches"
                }
                (false, true, false) => {
                    "unnamed; a possible-orphan note names its job, but it carries no hotfolder_job tag"
                }
                (false, false, _) => "unnamed; nothing points at it",
            };
            report.orphans.push(format!(
                "{} {} of {} ({} bytes received): {label}",
                r.what, r.id, r.file, r.received
            ));
            if let Some(t) = t {
                let tally = &mut report.tallies[t];
                match (named, noted) {
                    (true, _) => tally.orphans_named += 1,
                    (false, true) => {
                        tally.orphans_unnamed += 1;
                        tally.orphans_noted += 1;
                    }
                    (false, false) => tally.orphans_unnamed += 1,
                }
            }
        }
        for r in &remotes {
            if let Some(s) = by_name.get(r.file.as_str()) {
                report.tallies[s.target].received += r.received;
            }
        }
        for row in rows {
            if let Some(t) = TARGETS.iter().position(|t| row["provider"] == t.name) {
                report.tallies[t].sent += row["bytes_sent"].as_u64().unwrap_or(0);
            }
        }
        report.check_folders(fx, sources);
        report
    }

    /// One file's fate: delivered once, filed in done/ once with a matching
    /// receipt, or lost, duplicated, stuck or failed.
    fn check_source(&mut self, fx: &Fixture, s: &Source, rows: &[Value], remotes: &[Remote]) {
        let tally = &mut self.tallies[s.target];
        tally.files += 1;
        tally.bytes += s.size;
        let kind = TARGETS[s.target].kind;
        if kind != Kind::Folder {
            tally.remote_bytes += s.size;
        }
        let in_watch = fx.watch.join(&s.relpath).exists();
        let in_failed = fx.failed.join(&s.relpath).exists();
        let done = fx.done.join(&s.relpath);
        // A local copy of the source to compare remote bytes with.
        let local = [
            done.clone(),
            fx.watch.join(&s.relpath),
            fx.failed.join(&s.relpath),
        ]
        .into_iter()
        .find(|p| p.exists());
        let holds = |bin: &Path| match &local {
            Some(local) => same_bytes(bin, local),
            None => sha256(bin) == s.sha256,
        };

        let copies: Vec<String> = if kind == Kind::Folder {
            numbered_copies(&fx.outbox, &s.relpath)
        } else {
            remotes
                .iter()
                .filter(|r| r.holds_file && r.complete && !r.deleted)
                .filter(|r| r.file == s.name || r.file == stem(&s.name))
                .filter(|r| r.bin.as_deref().is_some_and(holds))
                .map(|r| format!("{} {}", r.what, r.id))
                .collect()
        };
        let delivered = !copies.is_empty();
        if copies.len() > 1 {
            tally.duplicated += 1;
            self.duplicated.push(format!(
                "{}: {} complete copies: {copies:?}",
                s.relpath,
                copies.len()
            ));
        }
        let in_done_twice = numbered_copies(&fx.done, &s.relpath);
        if in_done_twice.len() > 1 {
            tally.duplicated += 1;
            self.duplicated
                .push(format!("{}: in done/ as {in_done_twice:?}", s.relpath));
        }

        let jobs: Vec<&Value> = rows
            .iter()
            .filter(|r| r["file"] == s.relpath.as_str())
            .collect();
        let open: Vec<String> = jobs
            .iter()
            .filter(|r| !terminal(r))
            .map(|r| {
                format!(
                    "job {} {} at {} of {} bytes",
                    r["id"], r["state"], r["bytes_acknowledged"], s.size
                )
            })
            .collect();
        if !open.is_empty() || (jobs.is_empty() && in_watch) {
            tally.stuck += 1;
            self.stuck.push(format!(
                "{}: {}",
                s.relpath,
                if open.is_empty() {
                    "never taken".to_string()
                } else {
                    open.join(", ")
                }
            ));
        }
        if in_failed {
            tally.failed += 1;
            let report = fx.failed.join(format!("{}.error.json", s.relpath));
            let reason = fs::read_to_string(&report).unwrap_or_else(|_| "no error report".into());
            self.failed.push(format!("{}: {reason}", s.relpath));
        }
        if !delivered && !in_watch && !in_failed {
            tally.lost += 1;
            self.lost.push(format!(
                "{}: left the watch folder without reaching {} and without an error report (in done/: {})",
                s.relpath,
                TARGETS[s.target].name,
                done.exists()
            ));
        }

        match (done.exists(), delivered) {
            (false, _) => self
                .done_problems
                .push(format!("{}: not in done/", s.relpath)),
            (true, false) => self.done_problems.push(format!(
                "{}: in done/ but no complete remote copy holds its bytes",
                s.relpath
            )),
            (true, true) => {
                let path = fx.done.join(format!("{}.receipt.json", s.relpath));
                if !path.exists() {
                    self.done_problems
                        .push(format!("{}: in done/ without a receipt", s.relpath));
                } else {
                    let receipt = read_json(&path);
                    if receipt["sha256"] != s.sha256.as_str() {
                        self.done_problems.push(format!(
                            "{}: the receipt's sha256 {} is not the source's {}",
                            s.relpath, receipt["sha256"], s.sha256
                        ));
                    }
                }
            }
        }
    }

    /// The folders as a whole: the watch folder empty, done/ holding each
    /// file and its receipt and nothing else, failed/ empty, the folder
    /// provider's destination holding its files (and what else of ours).
    fn check_folders(&mut self, fx: &Fixture, sources: &[Source]) {
        self.watch_left = Fixture::files_in(&fx.watch);
        let expected: BTreeSet<String> = sources
            .iter()
            .flat_map(|s| [s.relpath.clone(), format!("{}.receipt.json", s.relpath)])
            .collect();
        for extra in Fixture::files_in(&fx.done)
            .into_iter()
            .filter(|f| !expected.contains(f))
        {
            self.done_problems.push(format!(
                "done/ holds {extra}, which no file of the run explains"
            ));
        }
        let archived: BTreeMap<&str, &Source> = sources
            .iter()
            .filter(|s| TARGETS[s.target].kind == Kind::Folder)
            .map(|s| (s.relpath.as_str(), s))
            .collect();
        let outbox = Fixture::files_in(&fx.outbox);
        for s in archived.values() {
            let delivered = fx.outbox.join(&s.relpath);
            let done = fx.done.join(&s.relpath);
            if !delivered.exists() {
                self.outbox_problems.push(format!(
                    "{}: not in the folder provider's destination",
                    s.relpath
                ));
            } else if done.exists() && !same_bytes(&delivered, &done) {
                self.outbox_problems.push(format!(
                    "{}: the destination's bytes differ from the source",
                    s.relpath
                ));
            }
        }
        for other in outbox.iter().filter(|f| !archived.contains_key(f.as_str())) {
            self.outbox_problems.push(format!(
                "the destination holds {other}, which no file explains"
            ));
        }
        self.outbox_partials = fx.partial_leftovers();
        self.outbox_markers = fs::read_dir(fx.outbox.join(".hotfolder-partial"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".delivered"))
            .count();
    }

    fn print(
        &self,
        sandbox: &Sandbox,
        kills: u32,
        batches: usize,
        kill_phase: Duration,
        took: Duration,
        drained: bool,
    ) {
        let mib = |b: u64| b as f64 / MIB as f64;
        let ratio = |n: u64, d: u64| {
            if d == 0 {
                "-".to_string()
            } else {
                format!("{:.2}", n as f64 / d as f64)
            }
        };
        let mut total = Tally::default();
        println!(
            "\nsoak summary: {kills} kills, {batches} batches, kill phase {:.0?}, all done in {:.0?}{}",
            kill_phase,
            took,
            if drained {
                ""
            } else {
                " (NOT drained: the deadline passed)"
            }
        );
        println!("sandbox: {:?}", sandbox.stats());
        println!(
            "{:<8} {:>5} {:>7} {:>4} {:>4} {:>5} {:>6} {:>8} {:>6} {:>5} {:>7} {:>8} {:>7} {:>9} {:>9} {:>13}",
            "provider",
            "files",
            "MiB",
            "lost",
            "dup",
            "stuck",
            "failed",
            "unnamed",
            "(noted)",
            "named",
            "resumes",
            "replaced",
            "retries",
            "recv/size",
            "sent/size",
            "extra/resume"
        );
        let row = |name: &str, t: &Tally, chunk: Option<u64>| {
            let extra = match chunk {
                Some(chunk) if t.resumes > 0 && t.received > 0 => format!(
                    "{:.2} chunks",
                    t.received.saturating_sub(t.remote_bytes) as f64
                        / t.resumes as f64
                        / chunk as f64
                ),
                _ => "-".into(),
            };
            println!(
                "{:<8} {:>5} {:>7.1} {:>4} {:>4} {:>5} {:>6} {:>8} {:>6} {:>5} {:>7} {:>8} {:>7} {:>9} {:>9} {:>13}",
                name,
                t.files,
                mib(t.bytes),
                t.lost,
                t.duplicated,
                t.stuck,
                t.failed,
                t.orphans_unnamed,
                t.orphans_noted,
                t.orphans_named,
                t.resumes,
                t.replaced,
                t.retries,
                ratio(t.received, t.remote_bytes),
                ratio(t.sent, t.bytes),
                extra
            );
        };
        for (target, tally) in TARGETS.iter().zip(&self.tallies) {
            let chunk = (target.kind != Kind::Folder).then_some(target.chunk);
            row(target.name, tally, chunk);
            total.add(tally);
        }
        row("total", &total, None);
        println!(
            "recv/size: body bytes the simulators received per source byte; sent/size: the daemon's own bytes_sent count;\n\
             extra/resume: bytes received beyond the file sizes per logged resume, in chunks (faults add to it too);\n\
             resumes: logged `resuming` (after a restart or a retry); retries: attempts failed and retried;\n\
             unnamed: incomplete, undeleted remote objects that neither a receipt's `replaced` nor a daemon log \
             names, by id or (in a possible-orphan note) by the name or the hotfolder_job tag it carries; (noted): of those, ones whose job \
             logged \"an interrupted create call may have left ...\" ({} such notes) without naming them; \
             named: the id, or the quoted name or whole tag in such a note, appears\n",
            self.notes
        );
        println!(
            "folder destination: {} unfinished partial files, {} .delivered markers in .hotfolder-partial/",
            self.outbox_partials.len(),
            self.outbox_markers
        );
        for (what, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("stuck", &self.stuck),
            ("failed", &self.failed),
            ("done/", &self.done_problems),
            ("left in the watch folder", &self.watch_left),
            ("folder destination", &self.outbox_problems),
            ("unfinished partials", &self.outbox_partials),
            ("orphans", &self.orphans),
        ] {
            for item in list {
                println!("  {what}: {item}");
            }
        }
    }

    /// Fail, naming every broken guarantee at once.
    fn assert_clean(&self) {
        // SPEC §4: an object a crash inside create may have left is named
        // (by id, tag or the name it carries) in the log or the receipt.
        let unnamed: Vec<String> = self
            .orphans
            .iter()
            .filter(|o| o.contains("unnamed"))
            .cloned()
            .collect();
        let broken: Vec<String> = [
            (
                "remote objects left that nothing the daemon wrote names",
                &unnamed,
            ),
            (
                "lost files (delivered nowhere, not in done/ or failed/)",
                &self.lost,
            ),
            ("duplicated files", &self.duplicated),
            ("stuck jobs (not terminal at the end)", &self.stuck),
            ("files in failed/", &self.failed),
            (
                "files not in done/ exactly once with a receipt whose sha256 matches",
                &self.done_problems,
            ),
            ("files left in the watch folder", &self.watch_left),
            (
                "problems in the folder provider's destination",
                &self.outbox_problems,
            ),
            (
                "unfinished partial files in the folder provider's .hotfolder-partial/",
                &self.outbox_partials,
            ),
        ]
        .into_iter()
        .filter(|(_, list)| !list.is_empty())
        .map(|(what, list)| format!("{} {what}:\n  {}", list.len(), list.join("\n  ")))
        .collect();
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    }
}

/// `relpath` and its numbered variants (`clip-1.mp4`, ...) that exist below `root`.
fn numbered_copies(root: &Path, relpath: &str) -> Vec<String> {
    let path = Path::new(relpath);
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let folder = root.join(path.parent().unwrap_or(Path::new("")));
    fs::read_dir(&folder)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name == &format!("{stem}{ext}")
                || name
                    .strip_prefix(&format!("{stem}-"))
                    .and_then(|rest| rest.strip_suffix(&ext))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// Every daemon log of the run (one per start), concatenated.
fn daemon_logs(fx: &Fixture) -> String {
    let mut paths: Vec<PathBuf> = fs::read_dir(&fx.root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("daemon-") && name.ends_with(".log")
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}
