//! Filing a source once its job ends: into done/ with a receipt, or into
//! failed/ with an error report, keeping the relative path, never
//! overwriting (numbered suffix), and across filesystems by copy, fsync,
//! then delete. Every step can be repeated after a crash.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::state::{FileSignature, Job};

/// `clip.mp4` → `clip-2.mp4` for n = 2; n = 0 is the path itself.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default();
    let mut name = OsString::from(stem);
    name.push(format!("-{n}"));
    if let Some(ext) = path.extension() {
        name.push(".");
        name.push(ext);
    }
    path.with_file_name(name)
}

/// Rename without replacing an existing file: `AlreadyExists` if taken,
/// `CrossesDevices` (EXDEV) if on another filesystem.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // The raw system call, not libc's wrapper: musl (the static build) has
    // no renameat2 wrapper. ENOSYS on old kernels falls back below.
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: a hard link is just as exclusive.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        _ => Err(error),
    }
}

/// Copy to a hidden temporary beside `to`, fsync, keep the mtime, then
/// rename into place without replacing; the source is deleted last.
fn copy_across(from: &Path, to: &Path) -> io::Result<()> {
    let mut tmp_name = OsString::from(".");
    tmp_name.push(to.file_name().unwrap_or_default());
    tmp_name.push(".hotfolder-tmp");
    let tmp = to.with_file_name(tmp_name);
    {
        let mut source = File::open(from)?;
        let mut target = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        io::copy(&mut source, &mut target)?;
        if let Ok(modified) = source.metadata().and_then(|m| m.modified()) {
            target.set_modified(modified)?;
        }
        target.sync_all()?;
    }
    if let Err(e) = rename_noreplace(&tmp, to) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(to);
    fs::remove_file(from)
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        crate::providers::sync_dir(dir);
    }
}

/// Move `from` to `target` or the first free numbered variant of it.
///
/// # Errors
/// I/O errors other than a taken name.
pub fn move_unique(from: &Path, target: &Path) -> io::Result<PathBuf> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    for n in 0..10_000 {
        let candidate = numbered(target, n);
        let moved = match rename_noreplace(from, &candidate) {
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                if candidate.exists() {
                    continue;
                }
                copy_across(from, &candidate)
            }
            other => other,
        };
        match moved {
            Ok(()) => {
                sync_parent(&candidate);
                sync_parent(from);
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free name for {} after 10000 tries", target.display()),
    ))
}

/// Where a source ended up if an earlier (interrupted) filing already moved
/// it: the numbered variant of `target` with the same size and mtime.
fn already_filed(target: &Path, signature: &FileSignature) -> Option<PathBuf> {
    (0..10_000)
        .map(|n| numbered(target, n))
        .take_while(|candidate| candidate.exists())
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|m| FileSignature::of(&m).same_content(signature))
        })
}

/// Move the job's source below `root` keeping its relative path; idempotent.
/// Answers where it went.
///
/// # Errors
/// I/O errors, naming the paths.
pub fn file_source(job: &Job, root: &Path) -> Result<PathBuf, FilingError> {
    let target = root.join(&job.relpath);
    if let Some(done) = &job.filed_to
        && done.exists()
        && !job.source.exists()
    {
        return Ok(done.clone());
    }
    if !job.source.exists() {
        return already_filed(&target, &job.signature).ok_or_else(|| FilingError {
            path: job.source.clone(),
            message: "the source vanished before it could be filed".into(),
        });
    }
    move_unique(&job.source, &target).map_err(|e| FilingError {
        path: target.clone(),
        message: format!("cannot move {} there: {e}", job.source.display()),
    })
}

/// Move a sidecar next to where its video was filed, named after it.
///
/// # Errors
/// I/O errors, naming the paths.
pub fn file_sidecar(sidecar: &Path, filed_video: &Path) -> Result<PathBuf, FilingError> {
    let ext = sidecar.extension().unwrap_or_default();
    let target = filed_video.with_extension(ext);
    move_unique(sidecar, &target).map_err(|e| FilingError {
        path: target,
        message: format!("cannot move sidecar {} there: {e}", sidecar.display()),
    })
}

/// A filing step failed; the file stays where it was.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct FilingError {
    /// The path involved.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// `<file>.receipt.json` or `<file>.error.json` for a filed file.
pub fn report_path(filed: &Path, suffix: &str) -> PathBuf {
    let mut name = filed.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Write a JSON report atomically (temp file, fsync, rename).
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_report(path: &Path, report: &impl Serialize) -> Result<(), FilingError> {
    let fail = |e: io::Error| FilingError {
        path: path.to_path_buf(),
        message: format!("cannot write report: {e}"),
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(fail)?;
    }
    let tmp = report_path(path, ".tmp");
    let body = serde_json::to_vec_pretty(report).map_err(|e| fail(io::Error::other(e)))?;
    let mut file = File::create(&tmp).map_err(fail)?;
    file.write_all(&body)
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    fs::rename(&tmp, path).map_err(fail)?;
    sync_parent(path);
    Ok(())
}

/// The receipt of a delivered (or duplicate-skipped) job.
#[derive(Debug, Serialize)]
pub struct Receipt<'a> {
    /// Job id.
    pub job: u64,
    /// Watch name.
    pub watch: &'a str,
    /// Path relative to the watch.
    pub file: &'a Path,
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
    pub file: &'a Path,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_names() {
        assert_eq!(
            numbered(Path::new("/d/clip.mp4"), 0),
            PathBuf::from("/d/clip.mp4")
        );
        assert_eq!(
            numbered(Path::new("/d/clip.mp4"), 2),
            PathBuf::from("/d/clip-2.mp4")
        );
        assert_eq!(
            numbered(Path::new("/d/noext"), 1),
            PathBuf::from("/d/noext-1")
        );
    }

    #[test]
    fn move_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.mp4");
        let target = dir.path().join("out/x.mp4");
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::write(&target, b"existing").unwrap();
        fs::write(&a, b"new").unwrap();
        let moved = move_unique(&a, &target).unwrap();
        assert_eq!(moved, dir.path().join("out/x-1.mp4"));
        assert_eq!(fs::read(&target).unwrap(), b"existing");
        assert_eq!(fs::read(&moved).unwrap(), b"new");
        assert!(!a.exists());
    }

    #[test]
    fn cross_device_copy_keeps_content_and_mtime() {
        // /dev/shm is a different filesystem from the temp dir on most machines;
        // copy_across is exercised directly either way.
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("src.bin");
        fs::write(&from, vec![7u8; 100_000]).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&from)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let to = dir.path().join("dest.bin");
        copy_across(&from, &to).unwrap();
        assert!(!from.exists());
        assert_eq!(fs::read(&to).unwrap(), vec![7u8; 100_000]);
        assert_eq!(fs::metadata(&to).unwrap().modified().unwrap(), old);
    }
}
