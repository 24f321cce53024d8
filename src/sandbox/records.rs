//! Each simulator keeps one JSON record per remote object beside its bytes,
//! so tests can read what arrived and a restarted sandbox continues.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every `*.json` record in `dir` that parses as `T`.
pub fn load<T: DeserializeOwned>(dir: &Path) -> Vec<T> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .filter_map(|path| serde_json::from_slice(&std::fs::read(path).ok()?).ok())
        .collect()
}

/// Write one record (best effort: the sandbox answers even if its disk is
/// full), through a temporary name and a rename: a sandbox killed mid-write
/// (tests restart it with SIGKILL) keeps the previous record rather than a
/// truncated one that [`load`] would skip, losing the upload on restart.
pub fn save<T: Serialize>(path: &Path, record: &T) {
    if let Ok(bytes) = serde_json::to_vec_pretty(record) {
        // A name per write: two handlers saving the same record at once
        // must not write into one temporary file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temporary = path.with_extension(format!("json.{n}.tmp"));
        if std::fs::write(&temporary, bytes).is_ok() {
            let _ = std::fs::rename(&temporary, path);
        }
    }
}
