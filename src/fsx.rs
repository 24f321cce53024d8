//! Filesystem steps that never overwrite and survive a power cut, shared by
//! filing ([`crate::finish`]) and the folder provider: a rename that refuses
//! to replace (with fallbacks for mounts that lack `RENAME_NOREPLACE` or
//! hard links), numbered free names with a bound, copies across
//! filesystems through an exclusive hidden temporary, and directory fsync.
//! It knows nothing of jobs.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Numbered names tried (`clip.mp4`, `clip-1.mp4`, ...) before giving up:
/// a folder holding ten thousand versions of one name is a folder someone
/// must look at, not one to keep probing.
pub const MAX_NUMBERED: u32 = 10_000;

/// Serialises the last-resort "check, then rename" on mounts that can
/// neither refuse a replacing rename nor hard-link: within this process no
/// two moves can pick the same free name.
static PLAIN_RENAME: Mutex<()> = Mutex::new(());

/// The longest file name most filesystems take, in bytes.
pub const NAME_MAX: usize = 255;

/// `prefix + name + suffix` as one file name of at most [`NAME_MAX`]
/// bytes: when too long, the end of `name` gives way to `~` and eight hex
/// digits of its hash (so different long names stay different).
pub fn fit_name(prefix: &[u8], name: &std::ffi::OsStr, suffix: &[u8]) -> OsString {
    use sha2::Digest;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = name.as_bytes();
    let mut out = prefix.to_vec();
    if prefix.len() + bytes.len() + suffix.len() <= NAME_MAX {
        out.extend_from_slice(bytes);
    } else {
        let hash = hex::encode(&sha2::Sha256::digest(bytes)[..4]);
        let room = NAME_MAX.saturating_sub(prefix.len() + suffix.len() + 1 + hash.len());
        let mut cut = room.min(bytes.len());
        // Keep whole UTF-8 characters where the name is UTF-8.
        while cut > 0
            && std::str::from_utf8(&bytes[..cut]).is_err()
            && std::str::from_utf8(bytes).is_ok()
        {
            cut -= 1;
        }
        out.extend_from_slice(&bytes[..cut]);
        out.push(b'~');
        out.extend_from_slice(hash.as_bytes());
    }
    out.extend_from_slice(suffix);
    OsString::from_vec(out)
}

/// `clip.mp4` → `clip-2.mp4` for n = 2; n = 0 is the path itself. A name
/// that would grow past [`NAME_MAX`] is shortened (see [`fit_name`]).
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    if n == 0 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default();
    let mut tail = format!("-{n}").into_bytes();
    if let Some(ext) = path.extension() {
        tail.push(b'.');
        tail.extend_from_slice(ext.as_bytes());
    }
    path.with_file_name(fit_name(b"", stem, &tail))
}

/// True when something (a file, folder or dangling symlink) has this name.
pub fn name_taken(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The first of `target`, `target-1`, ... that is free.
///
/// # Errors
/// `AlreadyExists` naming the path after [`MAX_NUMBERED`] taken names.
pub fn free_name(target: &Path) -> io::Result<PathBuf> {
    free_name_besides(target, &std::collections::HashSet::new())
}

/// The first of `target`, `target-1`, ... that is free and not in
/// `chosen`: names a batch has given out but not made yet, which the file
/// system cannot tell are taken.
///
/// # Errors
/// As [`free_name`].
pub fn free_name_besides(
    target: &Path,
    chosen: &std::collections::HashSet<PathBuf>,
) -> io::Result<PathBuf> {
    (0..MAX_NUMBERED)
        .map(|n| numbered(target, n))
        .find(|candidate| !chosen.contains(candidate) && !name_taken(candidate))
        .ok_or_else(|| no_free_name(target))
}

/// Every numbered variant of a name is taken: trying again cannot help
/// until someone clears the folder.
#[derive(Debug, thiserror::Error)]
#[error("no free name for {} among {MAX_NUMBERED} numbered names; clear out that folder", .target.display())]
pub struct NoFreeName {
    /// The name wanted.
    pub target: PathBuf,
}

/// The error [`free_name`] gives when every numbered name is taken.
pub fn no_free_name(target: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        NoFreeName {
            target: target.to_path_buf(),
        },
    )
}

/// True for an error [`free_name`] gives up with (by its type, not its text).
pub fn is_no_free_name(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<NoFreeName>())
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    if crate::failpoint::active("fsx::no_renameat2") {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let (from_c, to_c) = (c_path(from)?, c_path(to)?);
    // The raw system call, not libc's wrapper: musl (the static build) has
    // no renameat2 wrapper.
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
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn hard_link(from: &Path, to: &Path) -> io::Result<()> {
    if crate::failpoint::active("fsx::no_hard_links") {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    fs::hard_link(from, to)
}

/// The filesystem does not offer this operation at all (as opposed to
/// refusing it for this file).
fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
    )
}

/// Rename without replacing an existing file: `AlreadyExists` if the name
/// is taken, `CrossesDevices` (EXDEV) across filesystems. Where the mount
/// has no `RENAME_NOREPLACE`, a hard link then unlink is just as exclusive;
/// where it has neither (some FUSE and SMB mounts), a rename after an
/// existence check made under this process's lock.
///
/// # Errors
/// The I/O error of the last way tried.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let error = match renameat2_noreplace(from, to) {
        Ok(()) => return Ok(()),
        Err(e) if !unsupported(&e) => return Err(e),
        Err(e) => e,
    };
    match hard_link(from, to) {
        Ok(()) => return fs::remove_file(from),
        Err(e) if !unsupported(&e) => return Err(e),
        Err(link) => {
            tracing::debug!(rename = %error, link = %link, "no exclusive rename on this mount; checking, then renaming")
        }
    }
    let _only_us = PLAIN_RENAME.lock().unwrap_or_else(|e| e.into_inner());
    if name_taken(to) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    fs::rename(from, to)
}

/// A hidden name beside `to` for a temporary that is unique to this call.
pub fn temporary_beside(to: &Path) -> PathBuf {
    let suffix = format!(".hotfolder-{:016x}", rand::random::<u64>());
    to.with_file_name(fit_name(
        b".",
        to.file_name().unwrap_or_default(),
        suffix.as_bytes(),
    ))
}

/// Create `path` exclusively (never through a symlink, never over an
/// existing file) for writing.
///
/// # Errors
/// `AlreadyExists` if the name is taken; other I/O errors.
pub fn create_exclusive(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(path)
}

/// Copy `from` into a new file at `temporary` (exclusive), keeping its
/// modification time, and fsync it.
///
/// # Errors
/// I/O errors; the temporary is removed on failure.
pub fn copy_to_temporary(from: &Path, temporary: &Path) -> io::Result<()> {
    let copy = || -> io::Result<()> {
        let mut source = File::open(from)?;
        let mut target = create_exclusive(temporary)?;
        io::copy(&mut source, &mut target)?;
        if let Ok(modified) = source.metadata().and_then(|m| m.modified()) {
            target.set_modified(modified)?;
        }
        target.sync_all()
    };
    copy().inspect_err(|_| {
        let _ = fs::remove_file(temporary);
    })
}

/// When a step's writes reach the disk. `EachFile`: before the step
/// returns, an fsync per file and folder, as one job at a time needs.
/// `Batch`: with the rest of a batch of small files, whose caller syncs
/// each file system once ([`FileSystemSync`]) before it records or does
/// anything that relies on them: up to 1,024 files share one wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync each file and folder now.
    EachFile,
    /// Left to the batch's one sync of the file system.
    Batch,
}

/// Run `op`, which makes something in `folder`; if `folder` is missing
/// (`NotFound`), make it and its parents and run `op` once more. A folder
/// that exists (nearly always) then costs nothing: creating it first
/// would cost a failed `mkdir` and a `stat` per file of a big drop.
///
/// # Errors
/// `op`'s error, or the folder's if it cannot be made.
pub fn in_folder<T>(folder: &Path, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match op() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(folder)?;
            op()
        }
        done => done,
    }
}

/// The first half of a durable new file (`finish::write_report`): `bytes` in a new file at `temporary`
/// (exclusive), fsynced unless `durability` leaves that to a batch.
///
/// # Errors
/// I/O errors; the temporary is removed on failure.
pub fn write_temporary(temporary: &Path, bytes: &[u8], durability: Durability) -> io::Result<()> {
    let written = create_exclusive(temporary).and_then(|mut file| {
        file.write_all(bytes)?;
        if durability == Durability::EachFile {
            file.sync_all()?;
        }
        Ok(())
    });
    if written.is_err() {
        let _ = fs::remove_file(temporary);
    }
    written
}

/// The second half of a durable new file: the temporary renamed to `path`
/// without replacing anything (removed if that fails), the folder fsynced
/// unless `durability` leaves that to a batch.
///
/// # Errors
/// `AlreadyExists` when `path` is taken; other I/O errors.
pub fn place_temporary(temporary: &Path, path: &Path, durability: Durability) -> io::Result<()> {
    if let Err(e) = rename_noreplace(temporary, path) {
        let _ = fs::remove_file(temporary);
        return Err(e);
    }
    if durability == Durability::EachFile {
        sync_parent(path);
    }
    Ok(())
}

/// A file system to make durable (`syncfs`) once a batch step has written
/// to it: one wait for the disk for a whole batch of files, where an fsync
/// per file and folder would be hundreds. Opened before the step writes:
/// Linux (5.8 on) reports to a descriptor the write-back errors that came
/// after it was opened, so one opened afterwards could miss them.
pub struct FileSystemSync {
    path: PathBuf,
    device: u64,
    handle: File,
}

impl FileSystemSync {
    /// Ready to sync the file system holding `path`.
    ///
    /// # Errors
    /// `path` cannot be opened.
    pub fn open(path: &Path) -> io::Result<Self> {
        let handle = File::open(path)?;
        Ok(FileSystemSync {
            path: path.to_path_buf(),
            device: handle.metadata()?.dev(),
            handle,
        })
    }

    /// The device of its file system: two folders on one need one sync.
    pub fn device(&self) -> u64 {
        self.device
    }

    /// The folder it was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make every write to the file system durable.
    ///
    /// # Errors
    /// The file system's error (it could not write something back).
    pub fn sync(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: `syncfs` only reads the descriptor, which `handle` keeps
        // open for the duration of the call.
        if unsafe { libc::syncfs(self.handle.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Same device and inode: two names of one file.
pub fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// True when both files hold the same bytes.
///
/// # Errors
/// I/O errors reading either.
pub fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    use std::io::Read;
    let (mut a, mut b) = (File::open(a)?, File::open(b)?);
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            return Ok(true);
        }
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// fsync a directory so a rename or link in it survives a power cut.
pub fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// Remove the folders that held `file` and are empty now, from its own
/// folder up to, never including, `root`: a drop folder keeps no empty
/// subfolders after hotfolder moved their files away. A folder that is
/// not empty (someone is copying into it) is left alone, and so is the
/// chain above it.
pub fn remove_empty_parents(file: &Path, root: &Path) {
    let mut dir = file.parent();
    while let Some(folder) = dir {
        if folder == root || !folder.starts_with(root) {
            return;
        }
        if std::fs::remove_dir(folder).is_err() {
            return;
        }
        dir = folder.parent();
    }
}

/// fsync the folder holding `path`.
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_emptied_folders_below_the_root_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("drop");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/keep.mp4"), b"x").unwrap();
        remove_empty_parents(&root.join("a/b/c/gone.mp4"), &root);
        assert!(!root.join("a/b").exists(), "emptied folders go");
        assert!(
            root.join("a/keep.mp4").exists(),
            "a folder with a file stays"
        );
        std::fs::create_dir_all(root.join("top")).unwrap();
        remove_empty_parents(&root.join("gone.mp4"), &root);
        assert!(root.exists(), "never the watch root");
        remove_empty_parents(&dir.path().join("elsewhere/x.mp4"), &root);
    }

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
    fn long_names_are_shortened_to_fit_and_stay_distinct() {
        use std::os::unix::ffi::OsStrExt;
        let long = "é".repeat(127) + ".mp4"; // 258 bytes
        let a = fit_name(b"", std::ffi::OsStr::new(&long), b".receipt.json");
        let b = fit_name(
            b"",
            std::ffi::OsStr::new(&(long.clone() + "x")),
            b".receipt.json",
        );
        for name in [&a, &b] {
            assert!(name.len() <= NAME_MAX, "{}", name.len());
            assert!(name.to_str().is_some(), "whole characters kept");
            assert!(name.as_bytes().ends_with(b".receipt.json"));
        }
        assert_ne!(a, b);
        let short = fit_name(b".", std::ffi::OsStr::new("clip.mp4"), b".x");
        assert_eq!(short, std::ffi::OsString::from(".clip.mp4.x"));
        let n = numbered(&Path::new("/d").join("y".repeat(251) + ".mp4"), 3);
        assert!(n.file_name().unwrap().len() <= NAME_MAX);
        assert!(n.to_string_lossy().ends_with("-3.mp4"));
    }

    #[test]
    fn rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"new").unwrap();
        fs::write(&b, b"existing").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"existing");
        fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
    }

    #[test]
    fn free_names_give_up_after_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("clip.mp4");
        for n in 0..MAX_NUMBERED {
            File::create(numbered(&target, n)).unwrap();
        }
        let e = free_name(&target).unwrap_err();
        assert!(is_no_free_name(&e), "{e}");
        assert!(e.to_string().contains("clip.mp4"), "{e}");
        fs::remove_file(numbered(&target, 77)).unwrap();
        assert_eq!(free_name(&target).unwrap(), numbered(&target, 77));
    }

    #[test]
    fn placing_a_temporary_refuses_a_taken_name_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let write_new = |bytes: &[u8]| {
            let temporary = temporary_beside(&path);
            write_temporary(&temporary, bytes, Durability::EachFile)?;
            place_temporary(&temporary, &path, Durability::EachFile)
        };
        write_new(b"one").unwrap();
        let e = write_new(b"two").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn exclusive_create_does_not_follow_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let planted = dir.path().join("planted");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        assert!(create_exclusive(&planted).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn copy_keeps_content_and_mtime() {
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
        let to = temporary_beside(&dir.path().join("dest.bin"));
        copy_to_temporary(&from, &to).unwrap();
        assert!(same_bytes(&from, &to).unwrap());
        assert_eq!(fs::metadata(&to).unwrap().modified().unwrap(), old);
        assert!(copy_to_temporary(&from, &to).is_err(), "exclusive");
    }
}
