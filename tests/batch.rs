//! Small files to a `folder` destination go in batches: each durable point
//! (a database flush, a file system sync) is paid once per batch instead of
//! once per file, and each job still goes through the same states in the
//! same order. A crash at every step of a batch, with several files in
//! flight, leaves each job in a state the per-job code resumes: every file
//! delivered once and filed once, with one receipt.

mod common;

use std::time::Duration;

use common::{
    Fixture, counter, field, free_address, in_state, wait_for, wait_for_outcome, write_random,
};

/// Each step of a batch, in order (src/daemon/batch.rs).
const POINTS: [&str; 6] = [
    "batch::written",
    "batch::checkpointed",
    "batch::placed",
    "batch::delivered",
    "batch::moved",
    "batch::filed",
];

/// Files per crash: several in one batch.
const FILES: usize = 24;

/// Write `count` small files (some in a subfolder) into `dir`.
fn small_files(dir: &std::path::Path, count: usize) -> Vec<String> {
    (0..count)
        .map(|n| {
            let name = if n % 3 == 0 {
                format!("sub/f{n:03}.mp4")
            } else {
                format!("f{n:03}.mp4")
            };
            write_random(&dir.join(&name), 4096 + n as u64 * 17, n as u64 + 7);
            name
        })
        .collect()
}

/// Every file delivered once (same bytes, its own name: no numbered
/// copy), filed once into done/ with one receipt, nothing left in the
/// watch folder, in failed/ or in the destination's partial folder.
fn check_each_file_once(fx: &Fixture, names: &[String], what: &str) {
    let mut delivered = Fixture::files_in(&fx.outbox);
    delivered.sort();
    let mut wanted = names.to_vec();
    wanted.sort();
    assert_eq!(
        delivered, wanted,
        "{what}: the destination holds each file once"
    );
    for name in names {
        assert!(
            common::same_bytes(&fx.outbox.join(name), &fx.done.join(name)),
            "{what}: {name} delivered with its bytes"
        );
        assert_eq!(fx.receipt_count(name), 1, "{what}: one receipt for {name}");
    }
    let filed: Vec<String> = Fixture::files_in(&fx.done)
        .into_iter()
        .filter(|f| !f.ends_with(".json"))
        .collect();
    assert_eq!(filed, wanted, "{what}: done/ holds each source once");
    assert_eq!(
        Fixture::files_in(&fx.watch),
        Vec::<String>::new(),
        "{what}: watch folder"
    );
    assert!(
        !fx.watch.join("sub").exists(),
        "{what}: emptied subfolder tidied"
    );
    assert_eq!(
        Fixture::files_in(&fx.failed),
        Vec::<String>::new(),
        "{what}: failed/"
    );
    assert_no_partial_folder(fx, what);
}

/// The destination's partial folder is gone (it names what is left).
fn assert_no_partial_folder(fx: &Fixture, what: &str) {
    let partial = fx.outbox.join(".hotfolder-partial");
    assert!(
        !partial.exists(),
        "{what}: partial folder left: {:?}",
        std::fs::read_dir(&partial).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}

/// A drop of small files shares its database flushes: far fewer than one
/// per file (one job at a time flushes about three times per file); and
/// each job's record is written only at the steps a crash must find.
#[test]
fn a_drop_of_small_files_shares_its_flushes_in_batches() {
    const MANY: usize = 300;
    const MOST_FLUSHES_PER_FILE: f64 = 0.25;
    const MOST_RECORDS_PER_FILE: f64 = 4.0;
    let address = free_address();
    let fx = Fixture::with_config("", "", &format!("http: {{ listen: \"{address}\" }}"));
    let staged = fx.root.join("staged");
    let names: Vec<String> = small_files(&staged, MANY)
        .into_iter()
        .map(|n| format!("drop/{n}"))
        .collect();
    let daemon = fx.start();
    let before = counter(&address, "hotfolder_store_flushes_total");
    let written_before = counter(&address, "hotfolder_store_records_written_total");
    std::fs::rename(&staged, fx.watch.join("drop")).expect("drop");
    wait_for("every file done", Duration::from_secs(120), || {
        (in_state(&fx.status(), "done").len() == MANY).then_some(())
    });
    let flushes = counter(&address, "hotfolder_store_flushes_total") - before;
    let written = counter(&address, "hotfolder_store_records_written_total") - written_before;
    drop(daemon);
    std::fs::remove_dir(fx.watch.join("drop")).ok();
    check_each_file_once(&fx, &names, "batched drop");
    eprintln!(
        "{MANY} small files: {flushes} flushes ({:.3} per file), {written} records written ({:.2} per file)",
        flushes / MANY as f64,
        written / MANY as f64
    );
    assert!(
        flushes <= MOST_FLUSHES_PER_FILE * MANY as f64,
        "at most {MOST_FLUSHES_PER_FILE} flushes per small file, not {:.2}",
        flushes / MANY as f64
    );
    // Made, checkpointed with its bytes and chosen name, delivered with its
    // filing intent, done: each record is encoded and indexed, and a small
    // file has no more steps worth recording.
    assert!(
        written <= MOST_RECORDS_PER_FILE * MANY as f64,
        "at most {MOST_RECORDS_PER_FILE} records written per small file, not {:.2}",
        written / MANY as f64
    );
}

/// Stop the real binary at `point` with a batch of files in flight, start
/// it again, and check every file delivered once and filed once.
fn crash_at(point: &str) {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, FILES);
    let log = fx.run_until_failpoint(&format!("{point}=return"), Duration::from_secs(60));
    let biggest = log
        .lines()
        .filter(|l| l.contains("batch of small files"))
        .filter_map(|l| field(l, "jobs")?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        biggest > 1,
        "{point}: the crash should stop a batch of several files, not {biggest}; log:\n{log}"
    );
    let daemon = fx.start();
    wait_for_outcome(&fx, FILES, 0);
    drop(daemon);
    check_each_file_once(&fx, &names, point);
}

#[test]
fn a_crash_at_every_batch_step_delivers_each_file_once_and_files_it_once() {
    let failures: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = POINTS
            .iter()
            .map(|point| {
                scope.spawn(move || {
                    std::panic::catch_unwind(|| crash_at(point))
                        .err()
                        .map(|e| {
                            e.downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default()
                        })
                        .map(|why| format!("{point}: {why}"))
                })
            })
            .collect();
        runs.into_iter()
            .filter_map(|run| run.join().expect("thread"))
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A batch that takes the process down (here a failpoint that ends it at
/// the batch's first file write, at every start) is not tried as a batch
/// again: after the restart its job goes on alone, recording its attempt,
/// so a file that kills the process cannot hold up a whole batch at every
/// start. (One file: files found ready at different looks may start
/// batches of their own, and one not yet in the batch that crashed would
/// rightly be batched, and crash, again.)
#[test]
fn a_batch_cut_short_by_a_crash_is_not_tried_as_a_batch_again() {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, 1);
    let log = fx.run_until_failpoint("batch::written=return", Duration::from_secs(60));
    assert!(log.contains("batch of small files"), "{log}");
    // The same point armed again: a batch would end the process once more.
    let daemon = fx.start_with_failpoints("batch::written=return");
    let rows = wait_for_outcome(&fx, names.len(), 0);
    let log = daemon.log();
    drop(daemon);
    check_each_file_once(&fx, &names, "after a batch cut short");
    assert!(
        log.contains("cut short"),
        "the restart says what it does with the batch; log:\n{log}"
    );
    // The batch that crashed, then its attempt alone.
    assert_eq!(rows[0]["attempts"], 2, "{rows:?}");
}

/// A file that vanishes once its job is made leaves its batch at the first
/// step and fails alone, saying which file; the rest of its batch is
/// delivered and filed.
#[test]
fn a_vanished_file_leaves_its_batch_and_fails_alone() {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, 6);
    let gone = names[1].clone();
    // The batch waits at its start, as an attempt does under this point.
    let daemon = fx.start_with_failpoints("job::attempt=1*sleep(1500)");
    wait_for("the batch to start", Duration::from_secs(30), || {
        daemon.log().contains("batch of small files").then_some(())
    });
    std::fs::remove_file(fx.watch.join(&gone)).expect("remove");
    let rows = wait_for_outcome(&fx, names.len() - 1, 1);
    let failed = in_state(&rows, "failed");
    assert_eq!(failed[0]["file"], gone.as_str(), "{rows:?}");
    let reason = failed[0]["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&gone),
        "the reason names the file: {reason}"
    );
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("leaves its batch") && l.contains(&gone)),
        "{log}"
    );
    drop(daemon);
    let kept: Vec<String> = names.iter().filter(|n| **n != gone).cloned().collect();
    for name in &kept {
        assert!(
            common::same_bytes(&fx.outbox.join(name), &fx.done.join(name)),
            "{name} delivered and filed"
        );
        assert_eq!(fx.receipt_count(name), 1, "one receipt for {name}");
    }
    assert_eq!(Fixture::files_in(&fx.outbox).len(), kept.len());
}

/// Eight small files, a crash once their batch wrote its partial files,
/// then one source removed while the daemon is down (the one returned).
fn crash_after_the_partials_then_remove_one() -> (Fixture, Vec<String>, String) {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, 8);
    let gone = names[2].clone();
    fx.run_until_failpoint("batch::written=return", Duration::from_secs(60));
    assert!(
        fx.outbox.join(".hotfolder-partial").exists(),
        "the crash came after the partial files were written"
    );
    std::fs::remove_file(fx.watch.join(&gone)).expect("remove");
    (fx, names, gone)
}

/// A crash after a batch wrote its partial files, then a source that
/// vanishes before the next start: that file fails alone, naming it, the
/// others are delivered, and no partial file is left in the destination
/// (the jobs were queued, with nothing recorded of their partial files).
#[test]
fn a_file_that_vanishes_after_a_crash_mid_batch_leaves_no_partial_file() {
    let (fx, names, gone) = crash_after_the_partials_then_remove_one();
    let daemon = fx.start();
    let rows = wait_for_outcome(&fx, names.len() - 1, 1);
    drop(daemon);
    assert_eq!(
        in_state(&rows, "failed")[0]["file"],
        gone.as_str(),
        "{rows:?}"
    );
    assert_no_partial_folder(&fx, "a file gone after a crash");
}

/// As above, but restarted on a config under which the jobs no longer go
/// in batches (`after_success: delete`): the job whose source went fails
/// alone, and the partial file the crashed batch wrote for it, which no
/// record names, goes with it. The others are delivered one job at a time.
#[test]
fn a_file_gone_after_a_crash_mid_batch_leaves_no_partial_file_when_it_goes_on_alone() {
    let (fx, names, gone) = crash_after_the_partials_then_remove_one();
    fx.write_config("after_success: delete", "", "");
    let daemon = fx.start();
    let rows = wait_for_outcome(&fx, names.len() - 1, 1);
    let log = daemon.log();
    drop(daemon);
    assert_eq!(
        in_state(&rows, "failed")[0]["file"],
        gone.as_str(),
        "{rows:?}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("batch of small files") && !l.contains("cut short")),
        "the jobs went on alone after the restart; log:\n{log}"
    );
    assert_no_partial_folder(&fx, "a file gone after a crash, its job alone");
}

/// A source changed once its file is placed, before the delivery is
/// recorded: the delivery is kept on its job (whose remote holds the
/// earlier version, as one job alone would say) and the new version is
/// taken as a new file, not left unrecorded in the destination.
#[test]
fn a_source_changed_once_placed_keeps_its_delivery_and_goes_again_as_new() {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, 6);
    let changed = names[1].clone();
    // The batch waits once its files are placed, before it records them.
    let daemon = fx.start_with_failpoints("batch::placed=1*sleep(2000)");
    wait_for("the batch's files placed", Duration::from_secs(30), || {
        fx.outbox.join(&changed).exists().then_some(())
    });
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(fx.watch.join(&changed))
            .expect("open");
        file.write_all(b"a later version").expect("append");
    }
    wait_for("every version done", Duration::from_secs(60), || {
        (in_state(&fx.status(), "done").len() == names.len()).then_some(())
    });
    let log = daemon.log();
    drop(daemon);
    assert!(
        log.lines()
            .any(|l| l.contains("source changed after delivery") && l.contains(&*changed)),
        "the job says its delivery holds the earlier version; log:\n{log}"
    );
}

/// A batch stopped after its checkpoint (its files written, not placed),
/// and a source changed while the daemon was down: the earlier version is
/// not delivered under the file's name nor its source filed as that
/// version; the changed file is taken as new and delivered once, as it is
/// now (what one job alone does).
#[test]
fn a_source_changed_after_the_checkpoint_while_down_goes_again_as_new() {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, 6);
    let changed = names[2].clone();
    fx.run_until_failpoint("batch::checkpointed=return", Duration::from_secs(60));
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(fx.watch.join(&changed))
            .expect("open");
        file.write_all(b"a later version").expect("append");
    }
    let now = std::fs::read(fx.watch.join(&changed)).expect("read");
    let daemon = fx.start();
    wait_for("every file done", Duration::from_secs(60), || {
        (in_state(&fx.status(), "done").len() == names.len()).then_some(())
    });
    drop(daemon);
    check_each_file_once(&fx, &names, "changed while down");
    assert_eq!(
        std::fs::read(fx.outbox.join(&changed)).expect("read"),
        now,
        "the file as it is now is delivered"
    );
}

/// The name a batch chose is recorded before the file is placed there:
/// after a crash, a file someone else put under that name (its partial
/// file lost meanwhile) is not taken for the delivery. The job fails,
/// saying its partial file was lost, and the other file is left as it was.
#[test]
fn a_chosen_name_someone_else_took_is_not_taken_for_a_delivery() {
    let fx = Fixture::new();
    let names = small_files(&fx.watch, 4);
    let victim = names[1].clone();
    fx.run_until_failpoint("batch::checkpointed=return", Duration::from_secs(60));
    std::fs::write(fx.outbox.join(&victim), b"someone else's file").expect("write");
    let partial = std::fs::read_dir(fx.outbox.join(".hotfolder-partial"))
        .expect("partial folder")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| common::same_bytes(path, &fx.watch.join(&victim)))
        .expect("the victim's partial file");
    std::fs::remove_file(partial).expect("remove its partial file");
    let daemon = fx.start();
    let rows = wait_for_outcome(&fx, names.len() - 1, 1);
    drop(daemon);
    assert_eq!(
        in_state(&rows, "failed")[0]["file"],
        victim.as_str(),
        "{rows:?}"
    );
    assert_eq!(
        std::fs::read(fx.outbox.join(&victim)).expect("read"),
        b"someone else's file",
        "the other file is left as it was"
    );
}

/// Two files of one batch whose free names in done/ would be the same one
/// (`x.mp4`, with `x.mp4` taken there already, and `x-1.mp4`), with the
/// same bytes and time (and `duplicates: upload`, so both are sent), are
/// filed under two names, each with its receipt: a name chosen in a batch
/// is taken for the rest of it.
#[test]
fn names_chosen_in_one_batch_are_not_chosen_twice() {
    let fx = Fixture::new();
    let config = std::fs::read_to_string(&fx.config).expect("config");
    fx.write_raw_config(&config.replace(
        "    provider: archive\n",
        "    provider: archive\n    duplicates: upload\n",
    ));
    std::fs::create_dir_all(&fx.done).expect("done");
    std::fs::write(fx.done.join("x.mp4"), b"an earlier file").expect("earlier");
    let first = fx.root.join("x.mp4");
    write_random(&first, 5000, 77);
    let time = std::fs::metadata(&first)
        .and_then(|m| m.modified())
        .expect("mtime");
    let second = fx.root.join("x-1.mp4");
    std::fs::copy(&first, &second).expect("copy");
    std::fs::File::options()
        .write(true)
        .open(&second)
        .and_then(|f| f.set_modified(time))
        .expect("set mtime");
    std::fs::rename(&first, fx.watch.join("x.mp4")).expect("drop");
    std::fs::rename(&second, fx.watch.join("x-1.mp4")).expect("drop");
    let daemon = fx.start();
    let rows = wait_for_outcome(&fx, 2, 0);
    drop(daemon);
    let filed: Vec<String> = rows
        .iter()
        .filter_map(|r| r["filed_to"].as_str().map(str::to_string))
        .collect();
    assert_eq!(filed.len(), 2, "{rows:?}");
    assert_ne!(filed[0], filed[1], "two jobs filed to one file: {rows:?}");
    let videos: Vec<String> = Fixture::files_in(&fx.done)
        .into_iter()
        .filter(|f| f.ends_with(".mp4"))
        .collect();
    assert_eq!(
        videos.len(),
        3,
        "the earlier file and both sources: {videos:?}"
    );
    let receipts = Fixture::files_in(&fx.done)
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .count();
    assert_eq!(receipts, 2, "one receipt each");
    assert_eq!(Fixture::files_in(&fx.watch), Vec::<String>::new());
}
