//! `type: folder`: deliver into a local or mounted directory (PROTOCOLS §6).
//! Bytes go to `<dest>/.hotfolder-partial/<job>`, fsynced per chunk; a
//! restart resumes from the partial file's length as far as the engine's
//! checkpoint vouches for it; the finished file is verified against the
//! sha256 and linked into place under its relative path, never overwriting.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{
    Chunk, Delivery, ErrorKind, Lookup, ProviderError, RemoteOffset, Session, UploadRequest,
    Uploader,
};
use crate::fsx::{self, Durability};
use crate::hashing::{self, ResumableSha256};

/// Folder under the destination holding partial files.
pub const PARTIAL_DIR: &str = ".hotfolder-partial";

/// Delivers into a directory.
#[derive(Clone)]
pub struct FolderProvider {
    dest: PathBuf,
}

impl FolderProvider {
    /// A provider writing below `dest`.
    pub fn new(dest: PathBuf) -> Self {
        FolderProvider { dest }
    }

    fn partial_dir(&self) -> PathBuf {
        self.dest.join(PARTIAL_DIR)
    }

    /// The partial file of a job: one name per job, so a crash inside
    /// `create` is found again by [`Uploader::find_created`].
    fn partial_for(&self, tag: &str) -> PathBuf {
        self.partial_dir().join(tag)
    }

    fn partial_path(&self, session: &Session) -> Result<PathBuf, ProviderError> {
        session
            .upload_url
            .as_ref()
            .map(PathBuf::from)
            .ok_or_else(|| ProviderError::new(ErrorKind::Gone, "session has no partial file"))
    }
}

/// The session's key for the name a batch chose before placing the file
/// (`daemon::batch` records it with the job, where one upload alone writes
/// a marker beside the partial file).
const CHOSEN: &str = "chosen";

/// The name recorded in `session` as chosen for its file, if any.
fn chosen_in(session: &Session) -> Option<PathBuf> {
    session
        .extra
        .get(CHOSEN)
        .and_then(|name| name.as_str())
        .map(PathBuf::from)
}

fn marker_path(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".delivered");
    PathBuf::from(name)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ProviderError::new(ErrorKind::Transient, format!("worker thread failed: {e}"))
    })?
}

impl Uploader for FolderProvider {
    async fn create(&self, request: &UploadRequest<'_>) -> Result<Session, ProviderError> {
        let dir = self.partial_dir();
        let partial = self.partial_for(request.tag);
        blocking(move || {
            create_partial(&dir, &partial, Durability::EachFile)?;
            Ok(session_of(&partial))
        })
        .await
    }

    async fn find_created(&self, request: &UploadRequest<'_>) -> Result<Lookup, ProviderError> {
        let partial = self.partial_for(request.tag);
        Ok(if partial.exists() {
            Lookup::Found(session_of(&partial))
        } else {
            Lookup::NotFound
        })
    }

    async fn offset(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        acknowledged: u64,
    ) -> Result<RemoteOffset, ProviderError> {
        let partial = self.partial_path(session)?;
        let chosen = chosen_in(session);
        blocking(move || {
            let length = match fs::metadata(&partial) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Finalised already (the marker, or the name a batch
                    // chose, says where), or lost.
                    return Ok(
                        if marker_path(&partial).exists()
                            || chosen.is_some_and(|chosen| chosen.exists())
                        {
                            RemoteOffset::Unknown
                        } else {
                            RemoteOffset::Gone
                        },
                    );
                }
                Err(e) => {
                    return Err(ProviderError::io(
                        "cannot inspect partial file",
                        &partial,
                        &e,
                    ));
                }
            };
            if length > acknowledged {
                // Bytes past the last checkpoint were never vouched for: drop them.
                let file = OpenOptions::new()
                    .write(true)
                    .open(&partial)
                    .map_err(|e| ProviderError::io("cannot open partial file", &partial, &e))?;
                file.set_len(acknowledged)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| ProviderError::io("cannot trim partial file", &partial, &e))?;
                return Ok(RemoteOffset::At(acknowledged));
            }
            Ok(RemoteOffset::At(length))
        })
        .await
    }

    async fn send(
        &self,
        session: &mut Session,
        _request: &UploadRequest<'_>,
        mut chunk: Chunk,
    ) -> Result<u64, ProviderError> {
        let partial = self.partial_path(session)?;
        let mut file =
            OpenOptions::new()
                .write(true)
                .open(&partial)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => ProviderError::new(
                        ErrorKind::Gone,
                        format!("partial file {} vanished", partial.display()),
                    ),
                    _ => ProviderError::io("cannot open partial file", &partial, &e),
                })?;
        let mut position = chunk.start;
        while let Some(piece) = chunk.next_piece().await.map_err(|e| {
            ProviderError::new(ErrorKind::Transient, format!("cannot read the source: {e}"))
        })? {
            let path = partial.clone();
            let piece_len = piece.len() as u64;
            file = blocking(move || {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&piece, position)
                    .map_err(|e| ProviderError::io("cannot write", &path, &e))?;
                Ok(file)
            })
            .await?;
            position += piece_len;
        }
        let path = partial.clone();
        blocking(move || {
            file.sync_data()
                .map_err(|e| ProviderError::io("cannot flush", &path, &e))
        })
        .await?;
        Ok(chunk.end())
    }

    async fn finalize(
        &self,
        session: &mut Session,
        request: &UploadRequest<'_>,
        sha256: &str,
    ) -> Result<Delivery, ProviderError> {
        let partial = self.partial_path(session)?;
        let target = self.dest.join(request.relpath);
        let expected = sha256.to_string();
        let size = request.size;
        let chosen = chosen_in(session);
        let delivered = blocking(move || place(&partial, &target, chosen, &expected, size)).await?;
        Ok(delivered_at(session, &delivered))
    }

    async fn abandon(&self, session: &Session) -> Result<(), ProviderError> {
        let partial = self.partial_path(session)?;
        let removed = match fs::remove_file(&partial) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::io(
                "cannot remove partial file",
                &partial,
                &e,
            )),
        };
        let _ = fs::remove_file(marker_path(&partial));
        remove_if_empty(&self.partial_dir(), Durability::EachFile);
        removed
    }

    async fn release(&self, session: &Session) {
        let this = self.clone();
        let session = session.clone();
        let _ = blocking(move || {
            this.release_now(&session, Durability::EachFile);
            Ok(())
        })
        .await;
    }
}

/// The steps of a small file's delivery for a batch (`daemon::batch`):
/// the same files, markers and names as one upload at a time, each step
/// for many files at once, their fsyncs left to the batch's one sync of
/// the destination's file system.
impl FolderProvider {
    /// The destination folder, whose file system a batch syncs.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// A small file's whole upload in one call: its partial file (named by
    /// `tag`, as [`Uploader::create`] names it) created and written from
    /// `bytes`, the whole source as the batch read it. Answers the session
    /// and the hash.
    ///
    /// # Errors
    /// The partial file could not be created or written.
    pub fn write_whole(
        &self,
        tag: &str,
        bytes: &[u8],
    ) -> Result<(Session, ResumableSha256), ProviderError> {
        let partial = self.partial_for(tag);
        let mut file = create_partial(&self.partial_dir(), &partial, Durability::Batch)?;
        let mut hash = ResumableSha256::default();
        hash.update(bytes);
        file.write_all(bytes)
            .map_err(|e| ProviderError::io("cannot write", &partial, &e))?;
        Ok((session_of(&partial), hash))
    }

    /// Choose the name of a written partial file under `relpath`: the first
    /// free one that no other file of the batch has `chosen` (none of them
    /// is placed yet, so the file system cannot tell). Recorded in its
    /// `session`, which the batch writes to the store before it places the
    /// file, so a crash after [`Self::place_chosen`] finds it placed (one
    /// upload alone records it in a marker file).
    ///
    /// # Errors
    /// Every numbered name is taken.
    pub fn choose_place(
        &self,
        session: &mut Session,
        relpath: &Path,
        chosen: &std::collections::HashSet<PathBuf>,
    ) -> Result<PathBuf, ProviderError> {
        let name = fsx::free_name_besides(&self.dest.join(relpath), chosen)
            .map_err(|e| ProviderError::new(ErrorKind::Permanent, e.to_string()))?;
        session.extra.insert(
            CHOSEN.into(),
            serde_json::Value::String(name.to_string_lossy().into_owned()),
        );
        Ok(name)
    }

    /// Move a partial file to the name recorded by [`Self::choose_place`]
    /// (never over anything), its folders not synced; answers the delivery.
    /// The batch wrote the file whole from the bytes it hashed, in one
    /// call, so it is not read back as a file put together across chunks
    /// and restarts is before [`Uploader::finalize`] places it.
    ///
    /// # Errors
    /// `AlreadyExists` when someone took the name meanwhile; other I/O errors.
    pub fn place_chosen(&self, session: &mut Session) -> io::Result<Delivery> {
        let partial = self
            .partial_path(session)
            .map_err(|e| io::Error::other(e.message))?;
        let chosen = chosen_in(session).ok_or_else(|| io::Error::other("no name chosen"))?;
        match link_into_place(&partial, &chosen, Durability::Batch) {
            // Its folder is missing (not the partial file: then nothing
            // is made in the destination).
            Err(e) if e.kind() == io::ErrorKind::NotFound && partial.exists() => {
                fs::create_dir_all(chosen.parent().unwrap_or(Path::new("/")))?;
                link_into_place(&partial, &chosen, Durability::Batch)?;
            }
            linked => linked?,
        }
        Ok(delivered_at(session, &chosen))
    }

    /// The partial file named `tag` (see [`Self::write_whole`]), which no
    /// record names: a batch's job that leaves before its checkpoint, or
    /// one a crash stopped before it, may have one. Not synced: a crash
    /// leaves it to be written again, or removed again.
    pub fn discard_partial(&self, tag: &str) {
        if fs::remove_file(self.partial_for(tag)).is_ok() {
            remove_if_empty(&self.partial_dir(), Durability::Batch);
        }
    }

    /// The partial folder, once a batch has placed its files, if nothing
    /// else is in it (not synced: the batch syncs the destination).
    pub fn tidy_partials(&self) {
        remove_if_empty(&self.partial_dir(), Durability::Batch);
    }

    /// The provider's record of a delivery can go: its marker, and the
    /// partial folder once empty.
    fn release_now(&self, session: &Session, durability: Durability) {
        let Ok(partial) = self.partial_path(session) else {
            return;
        };
        let dir = self.partial_dir();
        if fs::remove_file(marker_path(&partial)).is_ok() && durability == Durability::EachFile {
            fsx::sync_dir(&dir);
        }
        remove_if_empty(&dir, durability);
    }
}

/// The session of a partial file: its path is the upload's address.
fn session_of(partial: &Path) -> Session {
    Session {
        remote_id: None,
        upload_url: Some(partial.to_string_lossy().into_owned()),
        ..Default::default()
    }
}

/// The delivery of a file placed at `delivered`, recorded on its session.
fn delivered_at(session: &mut Session, delivered: &Path) -> Delivery {
    session.remote_id = Some(delivered.to_string_lossy().into_owned());
    Delivery {
        remote_id: delivered.to_string_lossy().into_owned(),
        // Percent-encoded: a name with a space, `#` or `%` is a valid URL.
        url: url::Url::from_file_path(delivered).map(String::from).ok(),
        links: Default::default(),
    }
}

/// Create (empty) the partial file `partial` in `dir`. Another job's finish
/// may remove the (then empty) partial folder between making it and
/// opening the file in it: make it again and retry, a few times.
fn create_partial(
    dir: &Path,
    partial: &Path,
    durability: Durability,
) -> Result<File, ProviderError> {
    let mut tries = 0;
    loop {
        let opened = fsx::in_folder(dir, || {
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(partial)
        });
        match opened {
            Ok(file) => {
                if durability == Durability::EachFile {
                    fsx::sync_dir(dir);
                }
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 8 => tries += 1,
            Err(e) => return Err(ProviderError::io("cannot create partial file", partial, &e)),
        }
    }
}

/// Verify the partial file and link it into place. Idempotent: a marker
/// beside the partial records the chosen name before the link, so a crash
/// at any point is finished, not repeated, by the next call.
fn place(
    partial: &Path,
    target: &Path,
    chosen: Option<PathBuf>,
    sha256: &str,
    size: u64,
) -> Result<PathBuf, ProviderError> {
    // Someone may take the chosen name between the check and the link:
    // then the next free one.
    for _ in 0..fsx::MAX_NUMBERED {
        let candidate = match prepare_place(partial, target, chosen.clone(), sha256, size)? {
            Placing::Placed(done) => return Ok(done),
            Placing::Marked(candidate) => candidate,
        };
        match link_into_place(partial, &candidate, Durability::EachFile) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ProviderError::io("cannot place file at", &candidate, &e)),
        }
    }
    Err(ProviderError::new(
        ErrorKind::Permanent,
        fsx::no_free_name(target).to_string(),
    ))
}

/// Where a verified partial file goes.
enum Placing {
    /// It is there already (a crash came after the link).
    Placed(PathBuf),
    /// This free name is recorded in its marker; the link comes next.
    Marked(PathBuf),
}

/// The first half of [`place`]: the partial file checked against the
/// source's size and sha256 (removed if its bytes differ), then either
/// found placed already (under the name its marker, or else the batch
/// that wrote it, `chosen`) or given the first free name, recorded in its
/// marker.
fn prepare_place(
    partial: &Path,
    target: &Path,
    chosen: Option<PathBuf>,
    sha256: &str,
    size: u64,
) -> Result<Placing, ProviderError> {
    let marker = marker_path(partial);
    // A marker is written once the partial file is verified; the name a
    // batch chose is recorded before it places the file there, and someone
    // may have taken that name first: trusted only if it holds these bytes.
    let recorded = fs::read_to_string(&marker)
        .ok()
        .map(PathBuf::from)
        .or_else(|| chosen.filter(|chosen| holds(chosen, size, sha256)));
    if !partial.exists() {
        return match recorded {
            Some(done) if done.exists() => Ok(Placing::Placed(done)),
            _ => Err(ProviderError::new(
                ErrorKind::Gone,
                format!(
                    "partial file {} vanished before it was placed",
                    partial.display()
                ),
            )),
        };
    }
    let meta =
        fs::metadata(partial).map_err(|e| ProviderError::io("cannot inspect", partial, &e))?;
    if meta.len() != size {
        return Err(ProviderError::new(
            ErrorKind::OffsetMismatch,
            format!(
                "partial file {} holds {} bytes, expected {size}",
                partial.display(),
                meta.len()
            ),
        ));
    }
    let actual = hashing::sha256_file(partial)
        .map_err(|e| ProviderError::io("cannot verify", partial, &e))?;
    if actual != sha256 {
        let _ = fs::remove_file(partial);
        return Err(ProviderError::new(
            ErrorKind::Gone,
            format!(
                "delivered bytes in {} do not match the source's sha256; starting over",
                partial.display()
            ),
        ));
    }
    let parent = target.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)
        .map_err(|e| ProviderError::io("cannot create folder", parent, &e))?;
    // Reuse the name chosen before a crash if it already is this very file.
    if let Some(done) = &recorded
        && same_file(partial, done)
    {
        fs::remove_file(partial).map_err(|e| ProviderError::io("cannot remove", partial, &e))?;
        fsx::sync_dir(parent);
        return Ok(Placing::Placed(done.clone()));
    }
    let candidate = (0..fsx::MAX_NUMBERED)
        .map(|n| fsx::numbered(target, n))
        .find(|candidate| !fsx::name_taken(candidate))
        .ok_or_else(|| {
            ProviderError::new(ErrorKind::Permanent, fsx::no_free_name(target).to_string())
        })?;
    write_marker(&marker, &candidate)?;
    Ok(Placing::Marked(candidate))
}

/// The second half of [`place`]: the partial file renamed to its marked
/// name, never over anything.
fn link_into_place(partial: &Path, candidate: &Path, durability: Durability) -> io::Result<()> {
    fsx::rename_noreplace(partial, candidate)?;
    if durability == Durability::EachFile {
        fsx::sync_parent(candidate);
        if let Some(dir) = partial.parent() {
            fsx::sync_dir(dir);
        }
    }
    Ok(())
}

fn write_marker(marker: &Path, candidate: &Path) -> Result<(), ProviderError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(marker)
        .map_err(|e| ProviderError::io("cannot write", marker, &e))?;
    file.write_all(candidate.as_os_str().as_encoded_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| ProviderError::io("cannot write", marker, &e))
}

/// Whether `path` is a file of `size` bytes whose sha256 is `sha256`.
fn holds(path: &Path, size: u64, sha256: &str) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file() && meta.len() == size)
        && hashing::sha256_file(path).is_ok_and(|actual| actual == sha256)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Remove the partial folder once nothing of ours is in it, so a finished
/// destination holds the delivered files and nothing else. A job creating
/// its partial file at the same moment makes the folder again.
fn remove_if_empty(dir: &Path, durability: Durability) {
    if fs::remove_dir(dir).is_ok()
        && durability == Durability::EachFile
        && let Some(parent) = dir.parent()
    {
        fsx::sync_dir(parent);
    }
}
