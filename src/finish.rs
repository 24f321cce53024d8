//! Filing a source once its job ends: into done/ with a receipt, or into
//! failed/ with an error report, keeping the relative path, never
//! overwriting (numbered suffix), and across filesystems by copy, fsync,
//! then delete. Every step can be repeated after a crash.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fsx;
use crate::state::{FileSignature, FilingIntent};

/// Choose where `from` goes below `target`: the first free numbered name,
/// and the hidden temporary a copy across filesystems would use. The
/// caller records the intent before [`carry_out`] acts on it.
///
/// # Errors
/// [`FilingError`] when the folder cannot be made or no name is free.
pub fn plan(from: &Path, target: &Path) -> Result<FilingIntent, FilingError> {
    make_folder_of(target)?;
    plan_in_folder(from, target)
}

/// Make the folder `target` goes in, if it is not there.
///
/// # Errors
/// [`FilingError`] naming the folder.
pub fn make_folder_of(target: &Path) -> Result<(), FilingError> {
    // Looked at before it is made: a drop's files share a few folders, and
    // making one that exists costs a failed `mkdir` besides the look.
    if let Some(parent) = target.parent()
        && !parent.is_dir()
    {
        fs::create_dir_all(parent)
            .map_err(|e| FilingError::io(parent, "cannot create folder", e))?;
    }
    Ok(())
}

/// [`plan`], where the caller has made `target`'s folder already (a batch
/// makes each of its folders once, not once per file).
///
/// # Errors
/// [`FilingError`] when no name is free.
pub fn plan_in_folder(from: &Path, target: &Path) -> Result<FilingIntent, FilingError> {
    let to = fsx::free_name(target).map_err(|e| FilingError::io(target, "cannot file", e))?;
    Ok(FilingIntent {
        from: from.to_path_buf(),
        temporary: Some(fsx::temporary_beside(&to)),
        to,
    })
}

/// What carrying out an intent came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Carried {
    /// The file is at the intent's `to`.
    Moved(PathBuf),
    /// Someone else took the chosen name meanwhile: plan again.
    NameTaken,
}

/// Make the move an intent describes, or finish it if a crash interrupted
/// it: a rename (or a copy through the temporary, then removal of the
/// source, across filesystems). Idempotent: whatever step a crash stopped
/// at, calling it again ends with the file at `to` exactly once.
/// `signature` is the version of the file being moved (a rename keeps its
/// inode; a copy keeps its size and modification time). Each folder it
/// changes is fsynced (a batch, which syncs whole file systems, moves with
/// [`carry_out_planned_now`]).
///
/// # Errors
/// [`FilingError`] naming the path; `vanished` when neither the source nor
/// a finished move exists.
pub fn carry_out(intent: &FilingIntent, signature: &FileSignature) -> Result<Carried, FilingError> {
    let FilingIntent {
        from,
        to,
        temporary,
    } = intent;
    let source = fs::symlink_metadata(from).ok();
    let target = fs::symlink_metadata(to).ok();
    // A rename keeps size and modification time (and the inode, but inode
    // numbers are reused); a copy keeps size and modification time.
    let ours = |meta: &fs::Metadata| FileSignature::of(meta).same_content(signature);
    match (&source, &target) {
        // Moved before a crash (or by the hard-link fallback, which leaves
        // two names of one file until the source's name is removed).
        (None, Some(meta)) if ours(meta) => {
            remove_temporary(temporary);
            return Ok(Carried::Moved(to.clone()));
        }
        (None, _) => {
            return Err(FilingError::vanished(from));
        }
        (Some(src), Some(dst)) => {
            // A copy finished before the crash, or a link not yet unlinked.
            let copied = fsx::same_file(src, dst)
                || (temporary.is_some() && ours(dst) && fsx::same_bytes(from, to).unwrap_or(false));
            if !copied {
                return Ok(Carried::NameTaken);
            }
            remove_source(from)?;
            remove_temporary(temporary);
            return Ok(Carried::Moved(to.clone()));
        }
        (Some(_), None) => {}
    }
    remove_temporary(temporary);
    match fsx::rename_noreplace(from, to) {
        Ok(()) => {
            fsx::sync_parent(to);
            fsx::sync_parent(from);
            Ok(Carried::Moved(to.clone()))
        }
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            let temporary = temporary
                .as_deref()
                .ok_or_else(|| FilingError::io(to, "cannot copy there", e))?;
            copy_across(from, temporary, to)
        }
        Err(e) => rename_failed(from, to, e),
    }
}

/// What a rename of `from` to `to` that failed (but for crossing file
/// systems, which each caller handles its own way) comes to.
fn rename_failed(from: &Path, to: &Path, e: io::Error) -> Result<Carried, FilingError> {
    match e.kind() {
        io::ErrorKind::AlreadyExists => Ok(Carried::NameTaken),
        io::ErrorKind::NotFound if fs::symlink_metadata(from).is_err() => {
            Err(FilingError::vanished(from))
        }
        _ => Err(FilingError::io(
            to,
            &format!("cannot move {} there", from.display()),
            e,
        )),
    }
}

/// Carry out an intent planned a moment ago in this process, on one file
/// system, for a batch: a rename without replacing, and nothing of
/// [`carry_out`]'s look at where a crash could have left the move (no
/// crash came between the plan and now, so neither the target nor the
/// temporary can be ours). Three system calls fewer per file in a folder
/// that batches of thousands write at once. Not synced: the batch syncs the
/// file system.
///
/// # Errors
/// [`FilingError`] naming the path; `vanished` when the source is gone; a
/// transient error across file systems (a copy is made one file at a time,
/// by [`carry_out`]).
pub fn carry_out_planned_now(intent: &FilingIntent) -> Result<Carried, FilingError> {
    let FilingIntent { from, to, .. } = intent;
    match fsx::rename_noreplace(from, to) {
        Ok(()) => Ok(Carried::Moved(to.clone())),
        // A copy must be durable before its source goes: one file at a time.
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => Err(FilingError {
            path: to.clone(),
            message: "a move across file systems is a copy, made one file at a time".into(),
            permanent: false,
        }),
        Err(e) => rename_failed(from, to, e),
    }
}

/// Copy into the hidden temporary, fsync, rename it into place without
/// replacing, then remove the source: the source goes last.
fn copy_across(from: &Path, temporary: &Path, to: &Path) -> Result<Carried, FilingError> {
    fsx::copy_to_temporary(from, temporary)
        .map_err(|e| FilingError::io(to, &format!("cannot copy {} there", from.display()), e))?;
    match fsx::rename_noreplace(temporary, to) {
        Ok(()) => {}
        Err(e) => {
            let _ = fs::remove_file(temporary);
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Ok(Carried::NameTaken);
            }
            return Err(FilingError::io(to, "cannot place the copy", e));
        }
    }
    fsx::sync_parent(to);
    crate::failpoint::crash("filing::after_copy");
    remove_source(from)?;
    Ok(Carried::Moved(to.to_path_buf()))
}

fn remove_source(from: &Path) -> Result<(), FilingError> {
    match fs::remove_file(from) {
        Ok(()) => {
            fsx::sync_parent(from);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FilingError::io(
            from,
            "cannot remove the source after copying it",
            e,
        )),
    }
}

fn remove_temporary(temporary: &Option<PathBuf>) {
    if let Some(temporary) = temporary {
        let _ = fs::remove_file(temporary);
    }
}

/// Move a sidecar next to where its video was filed, named after it, never
/// over anything.
///
/// # Errors
/// I/O errors, naming the paths.
pub fn file_sidecar(sidecar: &Path, filed_video: &Path) -> Result<PathBuf, FilingError> {
    let ext = sidecar.extension().unwrap_or_default();
    let target = filed_video.with_extension(ext);
    for _ in 0..fsx::MAX_NUMBERED {
        let to = fsx::free_name(&target)
            .map_err(|e| FilingError::io(&target, "cannot file sidecar", e))?;
        match fsx::rename_noreplace(sidecar, &to) {
            Ok(()) => {
                fsx::sync_parent(&to);
                return Ok(to);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let temporary = fsx::temporary_beside(&to);
                if let Carried::Moved(to) = copy_across(sidecar, &temporary, &to)? {
                    return Ok(to);
                }
            }
            Err(e) => {
                return Err(FilingError::io(
                    &to,
                    &format!("cannot move sidecar {} there", sidecar.display()),
                    e,
                ));
            }
        }
    }
    Err(FilingError::io(
        &target,
        "cannot file sidecar",
        fsx::no_free_name(&target),
    ))
}

/// A filing step failed; the file stays where it was.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct FilingError {
    /// The path involved.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
    /// Trying again cannot help as things stand (the source is gone, no
    /// free name is left): the job ends with the file left where it is.
    pub permanent: bool,
}

impl FilingError {
    fn io(path: &Path, what: &str, error: io::Error) -> Self {
        FilingError {
            path: path.to_path_buf(),
            permanent: fsx::is_no_free_name(&error),
            message: format!("{what}: {error}"),
        }
    }

    fn vanished(path: &Path) -> Self {
        FilingError {
            path: path.to_path_buf(),
            message: "the file vanished before it could be filed".into(),
            permanent: true,
        }
    }
}

/// `<file>.receipt.json` or `<file>.error.json` for a filed file.
pub fn report_path(filed: &Path, suffix: &str) -> PathBuf {
    let name = filed.file_name().unwrap_or_default();
    filed.with_file_name(fsx::fit_name(b"", name, suffix.as_bytes()))
}

/// Write a JSON report as a new file at `path` (temporary, fsync, rename
/// that never replaces): `AlreadyExists` when the name is taken, so a
/// report a user may need is never overwritten.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_report(
    path: &Path,
    temporary: &Path,
    report: &impl Serialize,
) -> Result<(), io::Error> {
    stage_report(path, temporary, report, fsx::Durability::EachFile)?;
    crate::failpoint::crash("fsx::write_new::before_rename");
    fsx::place_temporary(temporary, path, fsx::Durability::EachFile)
}

/// The first half of [`write_report`]: the report's folder made and its
/// body written into `temporary` (exclusive), to be placed at `path` by
/// [`fsx::place_temporary`]. A batch stages every receipt, syncs once,
/// then places them.
///
/// # Errors
/// I/O errors, naming the path.
pub fn stage_report(
    path: &Path,
    temporary: &Path,
    report: &impl Serialize,
    durability: fsx::Durability,
) -> Result<(), io::Error> {
    let body = serde_json::to_vec_pretty(report).map_err(io::Error::other)?;
    // The report's folder (its temporary is beside it).
    let folder = path.parent().unwrap_or(Path::new("."));
    fsx::in_folder(folder, || {
        fsx::write_temporary(temporary, &body, durability)
    })
}

/// True when `path` holds a report written for job `job` (so a restart
/// after a crash recognises its own report instead of writing another).
pub fn is_report_of(path: &Path, job: u64) -> bool {
    #[derive(serde::Deserialize)]
    struct Head {
        job: u64,
    }
    fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Head>(&bytes).ok())
        .is_some_and(|head| head.job == job)
}

/// The receipt of a delivered (or duplicate-skipped) job.
#[derive(Debug, Serialize)]
pub struct Receipt<'a> {
    /// Job id.
    pub job: u64,
    /// Watch name.
    pub watch: &'a str,
    /// Path relative to the watch.
    pub file: std::borrow::Cow<'a, str>,
    /// Provider name.
    pub provider: &'a str,
    /// Remote id (or delivered path).
    pub remote_id: Option<&'a str>,
    /// Remote URL.
    pub url: Option<&'a str>,
    /// Further links from the provider.
    pub links: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// Content hash.
    pub sha256: Option<&'a str>,
    /// File size.
    pub bytes: u64,
    /// Metadata sent.
    pub metadata: &'a std::collections::BTreeMap<String, serde_json::Value>,
    /// First byte sent.
    pub started_at: Option<jiff::Timestamp>,
    /// Delivery finished.
    pub finished_at: jiff::Timestamp,
    /// Attempts made.
    pub attempts: u32,
    /// Earlier job that delivered the same content (duplicate skipped).
    pub duplicate_of: Option<DuplicateOf>,
    /// Remote objects abandoned or possibly orphaned on the way.
    pub replaced: &'a [String],
}

/// The earlier delivery a duplicate points to.
#[derive(Debug, Serialize)]
pub struct DuplicateOf {
    /// Its job id.
    pub job: u64,
    /// Its remote id.
    pub remote_id: Option<String>,
    /// Its URL.
    pub url: Option<String>,
    /// When it finished.
    pub finished_at: Option<jiff::Timestamp>,
}

/// The error report of a failed job.
#[derive(Debug, Serialize)]
pub struct ErrorReport<'a> {
    /// Job id.
    pub job: u64,
    /// Watch name.
    pub watch: &'a str,
    /// Path relative to the watch.
    pub file: std::borrow::Cow<'a, str>,
    /// Provider name (empty when no rule matched).
    pub provider: &'a str,
    /// Why it failed.
    pub reason: &'a str,
    /// Last HTTP status.
    pub status: Option<u16>,
    /// Provider answer excerpt (secrets removed).
    pub excerpt: Option<&'a str>,
    /// Attempts made.
    pub attempts: u32,
    /// When it failed.
    pub failed_at: jiff::Timestamp,
    /// How to try again.
    pub retry_with: String,
    /// Remote objects abandoned, or possibly left by an interrupted create.
    pub replaced: &'a [String],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature_of(path: &Path) -> FileSignature {
        FileSignature::of(&fs::metadata(path).unwrap())
    }

    #[test]
    fn a_taken_name_gets_a_number_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.mp4");
        let target = dir.path().join("out/x.mp4");
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::write(&target, b"existing").unwrap();
        fs::write(&a, b"new").unwrap();
        let intent = plan(&a, &target).unwrap();
        assert_eq!(intent.to, dir.path().join("out/x-1.mp4"));
        let carried = carry_out(&intent, &signature_of(&a)).unwrap();
        assert_eq!(carried, Carried::Moved(intent.to.clone()));
        assert_eq!(fs::read(&target).unwrap(), b"existing");
        assert_eq!(fs::read(&intent.to).unwrap(), b"new");
        assert!(!a.exists());
    }

    #[test]
    fn a_name_taken_after_planning_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.mp4");
        fs::write(&a, b"new").unwrap();
        let intent = plan(&a, &dir.path().join("x.mp4")).unwrap();
        fs::write(&intent.to, b"someone else's").unwrap();
        assert_eq!(
            carry_out(&intent, &signature_of(&a)).unwrap(),
            Carried::NameTaken
        );
        assert_eq!(fs::read(&intent.to).unwrap(), b"someone else's");
        assert!(a.exists());
    }

    #[test]
    fn carrying_out_again_after_the_move_finds_it_moved() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.mp4");
        fs::write(&a, b"content").unwrap();
        let signature = signature_of(&a);
        let intent = plan(&a, &dir.path().join("x.mp4")).unwrap();
        carry_out(&intent, &signature).unwrap();
        // As after a crash between the rename and the record.
        assert_eq!(
            carry_out(&intent, &signature).unwrap(),
            Carried::Moved(intent.to.clone())
        );
        // Another file that appeared under the name is not taken for ours.
        fs::remove_file(&intent.to).unwrap();
        fs::write(&intent.to, b"another file, longer").unwrap();
        assert!(carry_out(&intent, &signature).unwrap_err().permanent);
    }

    #[test]
    fn an_interrupted_copy_is_finished_without_a_second_copy() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.mp4");
        fs::write(&a, vec![3u8; 10_000]).unwrap();
        let signature = signature_of(&a);
        let intent = plan(&a, &dir.path().join("x.mp4")).unwrap();
        // As a crash after the copy was placed, before the source went.
        fsx::copy_to_temporary(&a, intent.temporary.as_ref().unwrap()).unwrap();
        fs::rename(intent.temporary.as_ref().unwrap(), &intent.to).unwrap();
        assert_eq!(
            carry_out(&intent, &signature).unwrap(),
            Carried::Moved(intent.to.clone())
        );
        assert!(!a.exists());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.mp4")]);
    }

    #[test]
    fn reports_are_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.mp4.receipt.json");
        let temporary = fsx::temporary_beside(&path);
        write_report(&path, &temporary, &serde_json::json!({"job": 1})).unwrap();
        let e = write_report(&path, &temporary, &serde_json::json!({"job": 2})).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(is_report_of(&path, 1));
        assert!(!is_report_of(&path, 2));
    }
}
