//! The ceiling of a bulk drop under hotfolder's guarantees, compiled: a
//! plain loop that does, in batches, only the file work those guarantees
//! ask of a small file (no database, no checks, no watching), so the bench
//! can say how much of hotfolder's time is the work itself. The first such
//! ceiling was a Python loop, whose own overhead made it about half as fast
//! as this and hid our overhead behind it (docs/BENCHMARKS.md).
//!
//! Per batch: each source read and hashed (SHA-256) and copied into a
//! partial file, `syncfs`; each partial renamed into place, `syncfs`; each
//! source renamed into the done folder and its receipt written through a
//! temporary beside it, `syncfs`; each receipt renamed into place,
//! `syncfs`. Batches are taken by `threads` threads side by side.
//!
//! Usage: `same_guarantees TREE DEST DONE BATCH THREADS`; prints the files
//! per second. TREE is emptied into DONE.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use hotfolder::fsx::FileSystemSync;
use sha2::{Digest, Sha256};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [tree, dest, done, batch, threads] = args.as_slice() else {
        bail!("usage: same_guarantees TREE DEST DONE BATCH THREADS");
    };
    let (tree, dest, done) = (
        PathBuf::from(tree),
        PathBuf::from(dest),
        PathBuf::from(done),
    );
    let batch: usize = batch.parse().context("BATCH")?;
    let threads: usize = threads.parse().context("THREADS")?;
    let partial = dest.join(".partial");
    std::fs::create_dir_all(&partial)?;
    std::fs::create_dir_all(&done)?;
    let mut names: Vec<String> = std::fs::read_dir(&tree)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    names.sort();
    let groups: Vec<&[String]> = names.chunks(batch.max(1)).collect();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let Some(group) = groups.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        one_batch(group, &tree, &dest, &partial, &done)?;
                    }
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(result) => result?,
                Err(_) => bail!("a thread panicked"),
            }
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    println!("{:.0}", names.len() as f64 / seconds);
    Ok(())
}

fn one_batch(
    group: &[String],
    tree: &Path,
    dest: &Path,
    partial: &Path,
    done: &Path,
) -> anyhow::Result<()> {
    let dest_sync = FileSystemSync::open(dest)?;
    let done_sync = FileSystemSync::open(done)?;
    let mut hashes = Vec::with_capacity(group.len());
    for name in group {
        let bytes = std::fs::read(tree.join(name))?;
        hashes.push(format!("{:x}", Sha256::digest(&bytes)));
        std::fs::write(partial.join(name), &bytes)?;
    }
    dest_sync.sync()?;
    for name in group {
        std::fs::rename(partial.join(name), dest.join(name))?;
    }
    dest_sync.sync()?;
    for (name, sha256) in group.iter().zip(&hashes) {
        std::fs::rename(tree.join(name), done.join(name))?;
        let receipt = serde_json::json!({
            "file": name,
            "provider": "bench",
            "remote_id": dest.join(name),
            "sha256": sha256,
        });
        let temporary = done.join(format!(".{name}.receipt.json.tmp"));
        std::fs::write(&temporary, serde_json::to_vec_pretty(&receipt)?)?;
    }
    done_sync.sync()?;
    for name in group {
        std::fs::rename(
            done.join(format!(".{name}.receipt.json.tmp")),
            done.join(format!("{name}.receipt.json")),
        )?;
    }
    done_sync.sync()?;
    Ok(())
}
