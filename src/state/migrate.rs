//! Growing from one box to a fleet: a single box's history (its finished
//! jobs, and the fingerprints its duplicate detection relies on) moved from
//! its sled database into the fleet's PostgreSQL store, so content the box
//! delivered is not uploaded again by the fleet.

use std::path::{Path, PathBuf};

use super::{Imported, JobStore, PgStore, SledStore, StoreError};

/// Why a history was not moved.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Either store failed (nothing was written to PostgreSQL).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The folder holds no sled database.
    #[error(
        "{} holds no hotfolder database (no {}); give the box's state_dir",
        .0.display(),
        .0.join("db").display()
    )]
    NoDatabase(PathBuf),
    /// The box still has work: moving only its finished jobs would leave
    /// these behind, and the fleet would upload their files again.
    #[error(
        "{count} job(s) in {} are not finished: {examples}; run the box (`hotfolder run`) until `hotfolder status` shows every job done or failed, stop it, then migrate",
        state_dir.display()
    )]
    Unfinished {
        /// The box's state folder.
        state_dir: PathBuf,
        /// How many.
        count: usize,
        /// A few of them: id, file and state.
        examples: String,
    },
}

/// Move the history in `state_dir`'s sled database into `fleet`: every job
/// (all must be finished) and every delivered fingerprint, once. The sled
/// database is only read.
///
/// # Errors
/// [`MigrateError`]; PostgreSQL is left unchanged on any of them.
pub async fn from_sled(state_dir: &Path, fleet: &PgStore) -> Result<Imported, MigrateError> {
    if !state_dir.join("db").is_dir() {
        return Err(MigrateError::NoDatabase(state_dir.to_path_buf()));
    }
    let sled = SledStore::open(state_dir)?;
    let jobs = sled.all().await?;
    let unfinished: Vec<_> = jobs.iter().filter(|j| !j.state.is_terminal()).collect();
    if !unfinished.is_empty() {
        let examples = unfinished
            .iter()
            .take(5)
            .map(|j| {
                format!(
                    "job {} ({}/{}) is {}",
                    j.id,
                    j.watch,
                    j.relpath.display(),
                    j.state.as_str()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MigrateError::Unfinished {
            state_dir: state_dir.to_path_buf(),
            count: unfinished.len(),
            examples,
        });
    }
    let content = sled.content_entries()?;
    Ok(fleet
        .import_history(sled.installation(), &jobs, &content)
        .await?)
}
