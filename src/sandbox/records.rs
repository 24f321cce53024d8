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

/// Write one record (best effort: the sandbox answers even if its disk is full).
pub fn save<T: Serialize>(path: &Path, record: &T) {
    if let Ok(bytes) = serde_json::to_vec_pretty(record) {
        let _ = std::fs::write(path, bytes);
    }
}
