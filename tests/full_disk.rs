//! Full disks, on a small tmpfs each test mounts for itself: a folder
//! destination or done/ with no room left gives a clear error naming the
//! path, the job is retried or failed with a report, the source is
//! untouched, and other jobs go on. Mounting needs root (CAP_SYS_ADMIN):
//! where it is impossible the test says so loudly and does nothing else.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::providers::{wait_done, wait_failed};
use common::{ConfigParts, Fixture, in_state, sha256, wait_for, write_random};

/// A tmpfs of `size` at `path`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        if out.status.success() {
            Some(Tmpfs(path.to_path_buf()))
        } else {
            eprintln!(
                "\n*** SKIPPED: cannot mount a tmpfs at {} ({}); the full-disk behaviour was NOT tested ***\n",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A folder destination with no room: the big file's job fails with a
/// report naming the destination and the cause, its source is filed whole
/// in failed/, nothing of ours is left on the full disk, and a small file
/// to another provider is delivered meanwhile.
#[test]
fn a_full_destination_fails_the_job_clearly_and_loses_nothing() {
    let fx = Fixture::new();
    let small = fx.root.join("small");
    let Some(_tmpfs) = Tmpfs::mount(&small, "1m") else {
        return;
    };
    fx.write_config_parts(ConfigParts {
        providers: "small: { type: folder, path: ./small, chunk_size: 256KiB }",
        rules: Some(
            "- match: { glob: \"big/**\" }\n  provider: small\n- match: {}\n  provider: archive",
        ),
        ..ConfigParts::default()
    });
    write_random(&fx.watch.join("big/a.mp4"), 3 << 20, 1);
    let hash = sha256(&fx.watch.join("big/a.mp4"));
    write_random(&fx.watch.join("b.mp4"), 100_000, 2);
    let daemon = fx.start();
    let rows = wait_failed(&fx, 1, Duration::from_secs(60));
    wait_for("b.mp4 delivered", Duration::from_secs(30), || {
        (in_state(&fx.status(), "done").len() == 1).then_some(())
    });
    assert_eq!(
        in_state(&rows, "failed")[0]["file"],
        "big/a.mp4",
        "{rows:?}"
    );
    let report = fx.error_report("big/a.mp4");
    let reason = report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&small.display().to_string()) && reason.contains("No space left"),
        "the report names the destination and the cause: {report}"
    );
    assert_eq!(
        sha256(&fx.failed.join("big/a.mp4")),
        hash,
        "the source is whole"
    );
    let leftovers: Vec<_> = fs::read_dir(&small)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "nothing of ours on the full disk: {leftovers:?}"
    );
    assert!(fx.outbox.join("b.mp4").exists(), "the other job went on");
    drop(daemon);
}

/// done/ with no room (on another filesystem, so filing copies): the copy
/// fails with an error naming done/, the delivered source stays where it
/// is (nothing half-copied is left), and filing is tried again until there
/// is room; then it is filed once, with its receipt.
#[test]
fn a_full_done_folder_keeps_the_source_and_files_it_when_there_is_room() {
    let fx = Fixture::new();
    let done = fx.root.join("done-small");
    let Some(_tmpfs) = Tmpfs::mount(&done, "1m") else {
        return;
    };
    fx.write_config(&format!("done_dir: {}", done.display()), "", "");
    write_random(&fx.watch.join("a.mp4"), 3 << 20, 3);
    let hash = sha256(&fx.watch.join("a.mp4"));
    let daemon = fx.start();
    wait_for(
        "filing to fail for lack of room",
        Duration::from_secs(30),
        || {
            let log = daemon.log();
            (log.contains("cannot file the source") && log.contains("No space left")).then_some(())
        },
    );
    assert!(
        daemon
            .log()
            .lines()
            .any(|l| l.contains("No space left") && l.contains(&done.display().to_string())),
        "the error names done/: {}",
        daemon.log()
    );
    assert_eq!(
        sha256(&fx.watch.join("a.mp4")),
        hash,
        "the source stays whole"
    );
    let partial: Vec<_> = fs::read_dir(&done)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        partial.is_empty(),
        "no half copy left in done/: {partial:?}"
    );
    // Room again: a bigger tmpfs over the same path.
    let status = Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(&done)
        .status()
        .expect("remount");
    assert!(status.success(), "remount with more room");
    wait_done(&fx, &daemon, 1, Duration::from_secs(60));
    assert_eq!(sha256(&done.join("a.mp4")), hash);
    assert!(done.join("a.mp4.receipt.json").exists());
    assert!(!fx.watch.join("a.mp4").exists());
}

/// `state_dir` with no room: the store cannot record a step, so the daemon
/// stops at once (sled takes no more writes after a failed one) with exit
/// code 1 and an error naming the state folder and what to do; the source
/// is untouched; started again once there is room, it resumes from what
/// was recorded and delivers the file exactly once.
#[test]
fn a_full_state_dir_stops_the_daemon_clearly_and_loses_nothing() {
    let fx = Fixture::new();
    // Each job record bigger than what sled may still have room for in
    // the pages it already holds (the tail of one): the job's first
    // durable write fails, whatever the size of a plain record.
    let description = "x".repeat(16 << 10);
    let rules = format!(
        "- match: {{}}\n  provider: archive\n  metadata: {{ title: \"{{stem}}\", description: \"{description}\" }}"
    );
    fx.write_config_parts(ConfigParts {
        rules: Some(&rules),
        ..ConfigParts::default()
    });
    let Some(_tmpfs) = Tmpfs::mount(&fx.state, "16m") else {
        return;
    };
    let mut daemon = fx.start();
    // Fill what sled left free.
    let filler = fx.state.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .output();
    write_random(&fx.watch.join("a.mp4"), 200_000, 4);
    let hash = sha256(&fx.watch.join("a.mp4"));
    let status = wait_for("the daemon to stop", Duration::from_secs(30), || {
        daemon.child.try_wait().expect("try_wait")
    });
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let log = daemon.log();
    let state = fx.state.display().to_string();
    assert!(
        log.lines().any(|l| l.contains("failed to write")
            && l.contains(&state)
            && l.contains("No space left")),
        "the error names the state folder and the cause: {log}"
    );
    assert!(
        fx.watch.join("a.mp4").exists() && sha256(&fx.watch.join("a.mp4")) == hash,
        "the source is untouched"
    );
    fs::remove_file(&filler).unwrap();
    let again = fx.start();
    wait_done(&fx, &again, 1, Duration::from_secs(60));
    assert_eq!(
        Fixture::files_in(&fx.outbox),
        vec!["a.mp4"],
        "delivered once"
    );
    assert_eq!(sha256(&fx.outbox.join("a.mp4")), hash);
}
