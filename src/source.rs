//! Reading a source file, shared by the engine and the providers (which
//! know nothing else of jobs): the signature that says which version of a
//! file a job delivers, and chunks read lazily in pooled pieces so that a
//! chunk never sits whole in memory. A sequential upload reads through a
//! [`ReadAhead`], which hashes every piece once read, on a thread beside
//! the reads and the send, so the sha256 costs no second pass over the
//! source and little wall time.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use tokio::task::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::hashing::ResumableSha256;

/// What identifies one version of a source file: if any of it changes, the
/// content may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSignature {
    /// Length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl FileSignature {
    /// Read from metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileSignature {
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Same content as far as size and mtime tell (the inode may change
    /// when a file is moved across filesystems and back).
    pub fn same_content(&self, other: &FileSignature) -> bool {
        self.size == other.size && self.mtime_ns == other.mtime_ns
    }
}

/// Bytes read from the source per piece.
pub const PIECE: u64 = 1 << 20;

/// Piece buffers kept for reuse once the HTTP client has sent them. Without
/// the pool every piece was a fresh megabyte from the allocator, and glibc
/// kept the freed ones in per-thread arenas: peak RSS grew to ~60 MiB at 8
/// uploads. With it, memory is what is in flight plus at most this many.
const SPARE_PIECES_MAX: usize = 8;

static SPARE_PIECES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A piece's bytes; going back to [`SPARE_PIECES`] when the last `Bytes`
/// pointing into it is dropped.
struct PooledPiece(Vec<u8>);

impl PooledPiece {
    /// A buffer of `len` bytes, from the pool when one is spare. Its
    /// contents are whatever it held (it is read into at once): a spare is
    /// shortened, never zeroed again; only bytes it never had are zeroed
    /// (a fresh buffer, or one kept from a short last piece).
    fn with_len(len: usize) -> Self {
        let mut buf = SPARE_PIECES
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_else(|| Vec::with_capacity(PIECE as usize));
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        PooledPiece(buf)
    }
}

impl AsRef<[u8]> for PooledPiece {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for PooledPiece {
    fn drop(&mut self) {
        if self.0.capacity() != PIECE as usize {
            return;
        }
        if let Ok(mut spare) = SPARE_PIECES.lock()
            && spare.len() < SPARE_PIECES_MAX
        {
            spare.push(std::mem::take(&mut self.0));
        }
    }
}

/// Fill `buf` from `file` at `offset`; a short file is `UnexpectedEof`,
/// which the engine reports as a source that changed.
fn read_source_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the source file became shorter while it was being read",
            )
        } else {
            e
        }
    })
}

/// The `len` bytes of `file` at `offset` in a pooled piece, counted as read.
fn read_piece_at(file: &File, len: usize, offset: u64, counters: &Counters) -> io::Result<Bytes> {
    let mut piece = PooledPiece::with_len(len);
    read_source_at(file, &mut piece.0, offset)?;
    counters.add_read(len as u64);
    Ok(Bytes::from_owner(piece))
}

/// Read `start..end` of `file` a piece at a time, handing each piece to
/// `each` and counting it as read; memory stays one piece.
///
/// # Errors
/// I/O errors, or `UnexpectedEof` when the file is shorter than `end`.
pub(crate) fn read_range(
    file: &File,
    start: u64,
    end: u64,
    counters: &Counters,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = vec![0u8; (end - start).min(PIECE) as usize];
    let mut position = start;
    while position < end {
        let want = (end - position).min(PIECE) as usize;
        read_source_at(file, &mut buf[..want], position)?;
        each(&buf[..want]);
        counters.add_read(want as u64);
        position += want as u64;
    }
    Ok(())
}

/// Per-chunk checksum algorithms a protocol may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlgorithm {
    /// SHA-1 (tus fallback).
    Sha1,
    /// SHA-256 (preferred).
    Sha256,
}

impl ChecksumAlgorithm {
    /// The name tus uses in `Upload-Checksum`.
    pub fn tus_name(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Sha1 => "sha1",
            ChecksumAlgorithm::Sha256 => "sha256",
        }
    }
}

/// Byte counters of one job, shared with the progress board.
#[derive(Debug, Default)]
pub struct Counters {
    /// Source bytes read by this attempt (all passes).
    pub read: AtomicU64,
    /// Bytes handed to the provider in the current chunk.
    pub in_flight: AtomicU64,
    /// Source bytes read by every job, for `/metrics`: moved as bytes are
    /// read, so a long upload does not look stalled until it ends.
    pub all_jobs_read: prometheus_client::metrics::counter::Counter,
}

impl Counters {
    /// Counters of one attempt that also add to `all_jobs_read`.
    pub fn new(all_jobs_read: prometheus_client::metrics::counter::Counter) -> Self {
        Counters {
            all_jobs_read,
            ..Counters::default()
        }
    }

    /// `bytes` more were read from the source.
    pub fn add_read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
        self.all_jobs_read.inc_by(bytes);
    }
}

/// A range of the source, handed to a provider's `send`.
pub struct Chunk {
    /// First byte's offset in the file.
    pub start: u64,
    /// Bytes in this chunk.
    pub len: u64,
    /// File size.
    pub total: u64,
    /// 0-based chunk number (`start / chunk_size`).
    pub index: u64,
    /// Chunks in the whole file.
    pub count: u64,
    file: Arc<File>,
    /// Pieces read by the chunk's own reader, in order; started at the
    /// first [`Chunk::next_piece`]. Dropped with the chunk when a send
    /// fails, which stops the reader.
    pieces: Option<tokio::sync::mpsc::Receiver<io::Result<Bytes>>>,
    /// The queue of a [`ReadAhead`], lent to this chunk instead of a reader
    /// of its own (a sequential upload's chunks).
    lent: Option<Lent>,
    counters: Arc<Counters>,
    /// The bandwidth limits its bytes pass through on their way out.
    throttle: crate::bandwidth::Throttle,
    /// The rest of a piece cut into slices for a throttled send.
    pending: Option<Bytes>,
}

/// A chunk's checksum being computed ahead of its send. It holds the very
/// open file it reads, so it can only ever match chunks of that file (a
/// new attempt opens the file again and computes its own).
pub struct DigestAhead {
    file: Arc<File>,
    start: u64,
    len: u64,
    algorithm: ChecksumAlgorithm,
    digest: JoinHandle<io::Result<Vec<u8>>>,
}

impl DigestAhead {
    /// Finished, and its file is no longer open for an upload: the upload
    /// it was computed for ended (or failed) before using it.
    pub fn is_orphaned(&self) -> bool {
        self.digest.is_finished() && Arc::strong_count(&self.file) == 1
    }

    /// True when this is the digest `chunk` needs.
    pub fn is_for(&self, chunk: &Chunk, algorithm: ChecksumAlgorithm) -> bool {
        Arc::ptr_eq(&self.file, &chunk.file)
            && self.start == chunk.start
            && self.len == chunk.len
            && self.algorithm == algorithm
    }
}

/// Pieces read ahead of the send, and of the hash, at most: slack enough
/// that the reader, the hash and the send each run at their own pace, and
/// memory stays a few pieces per upload.
const AHEAD: usize = 2;

/// The pieces of a sequential upload, read and hashed in order from one
/// offset to the end of the file by one reader and one hash thread that
/// run on across chunk boundaries: while a chunk waits for its
/// acknowledgement and its checkpoint, the first pieces of the next one are
/// read and hashed already, so the next request starts with its bytes at
/// hand. Nothing here is persisted: the engine still records a chunk's
/// offset and hash only once the server acknowledged it.
pub(crate) struct ReadAhead {
    file: Arc<File>,
    /// Where the reader started; its chunks follow from there.
    origin: u64,
    chunk_size: u64,
    total: u64,
    counters: Arc<Counters>,
    /// The reader's queue while no chunk holds it.
    queue: Arc<Mutex<Option<Queue>>>,
    /// The file hash at each chunk end the hash thread passed, in order.
    hashes: tokio::sync::mpsc::UnboundedReceiver<(u64, ResumableSha256)>,
}

/// The reader's output and the offset of its next piece.
struct Queue {
    pieces: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    position: u64,
}

/// A [`ReadAhead`]'s queue lent to one chunk; it goes back once the chunk
/// has taken its last piece. A chunk dropped before its end drops the queue
/// with it, which stops the reader and the hash: no later chunk could start
/// where it stopped, and the hash at its end will never come.
struct Lent {
    queue: Option<Queue>,
    home: Arc<Mutex<Option<Queue>>>,
}

impl Lent {
    fn give_back(&mut self) {
        if let (Some(queue), Ok(mut home)) = (self.queue.take(), self.home.lock()) {
            *home = Some(queue);
        }
    }
}

impl ReadAhead {
    /// Start reading `file` at `start` (the acknowledged offset), where
    /// `hash` stands, in chunks of `chunk_size` up to `total`; the first
    /// chunk (`len` bytes) comes with it.
    pub(crate) fn start(
        file: Arc<File>,
        start: u64,
        len: u64,
        total: u64,
        chunk_size: u64,
        hash: ResumableSha256,
        counters: Arc<Counters>,
    ) -> (Self, Chunk) {
        let chunk_size = chunk_size.max(1);
        debug_assert_eq!(len, chunk_size.min(total.saturating_sub(start)));
        // The chunk ends after `at`, where a piece must end and the hash
        // thread hands out the file hash.
        let boundary_after = move |at: u64| {
            at.saturating_add(chunk_size - (at - start) % chunk_size)
                .min(total)
        };
        let (to_hash, mut hash_pieces) = tokio::sync::mpsc::channel::<Bytes>(AHEAD);
        let (hash_out, hashes) = tokio::sync::mpsc::unbounded_channel();
        tokio::task::spawn_blocking(move || {
            let mut hash = hash;
            let mut position = start;
            let mut boundary = boundary_after(start);
            while let Some(piece) = hash_pieces.blocking_recv() {
                hash.update(&piece);
                position += piece.len() as u64;
                if position == boundary {
                    if hash_out.send((position, hash.clone())).is_err() {
                        return;
                    }
                    boundary = boundary_after(position);
                }
            }
        });
        let (out, pieces) = tokio::sync::mpsc::channel(AHEAD);
        let reader_file = Arc::clone(&file);
        let reader_counters = Arc::clone(&counters);
        tokio::task::spawn_blocking(move || {
            let mut position = start;
            while position < total {
                let want = (boundary_after(position) - position).min(PIECE) as usize;
                let piece = match read_piece_at(&reader_file, want, position, &reader_counters) {
                    Ok(piece) => piece,
                    Err(e) => {
                        let _ = out.blocking_send(Err(e));
                        return;
                    }
                };
                if to_hash.blocking_send(piece.clone()).is_err()
                    || out.blocking_send(Ok(piece)).is_err()
                {
                    return;
                }
                position += want as u64;
            }
        });
        let ahead = ReadAhead {
            file,
            origin: start,
            chunk_size,
            total,
            counters,
            queue: Arc::new(Mutex::new(None)),
            hashes,
        };
        let first = ahead.lend(
            Queue {
                pieces,
                position: start,
            },
            len,
            chunk_size,
        );
        (ahead, first)
    }

    fn lend(&self, queue: Queue, len: u64, chunk_size: u64) -> Chunk {
        let mut chunk = Chunk::unhashed(
            Arc::clone(&self.file),
            queue.position,
            len,
            self.total,
            chunk_size,
            Arc::clone(&self.counters),
        );
        chunk.lent = Some(Lent {
            queue: Some(queue),
            home: Arc::clone(&self.queue),
        });
        chunk
    }

    /// The chunk `start..start + len`, if the reader stands at `start` (the
    /// chunk before it was read to its end); `None` means start again.
    pub(crate) fn chunk(&self, start: u64, len: u64, chunk_size: u64) -> Option<Chunk> {
        // The reader ends its pieces on its own chunk grid only.
        let on_grid = chunk_size == self.chunk_size
            && start >= self.origin
            && (start - self.origin).is_multiple_of(chunk_size)
            && len == chunk_size.min(self.total.saturating_sub(start));
        if !on_grid {
            return None;
        }
        let queue = {
            let mut slot = self.queue.lock().ok()?;
            if slot.as_ref()?.position != start {
                return None;
            }
            slot.take()?
        };
        Some(self.lend(queue, len, chunk_size))
    }

    /// The file hash at `end`, a chunk's end, once every byte before it
    /// has been hashed; `None`, at once, when the chunk was not read to
    /// its end (a provider may acknowledge a chunk it did not read, or the
    /// request may still hold it), since the hash would never get there.
    pub(crate) async fn hash_at(&mut self, end: u64) -> Option<ResumableSha256> {
        let read_to_end = self
            .queue
            .lock()
            .ok()?
            .as_ref()
            .is_some_and(|queue| queue.position >= end);
        if !read_to_end {
            return None;
        }
        while let Some((at, hash)) = self.hashes.recv().await {
            if at == end {
                return Some(hash);
            }
            if at > end {
                return None;
            }
        }
        None
    }
}

impl Chunk {
    /// A chunk read for sending only: a lane of a parallel upload sends
    /// ranges out of order, so the file hash is taken by one pass of its own
    /// (see the engine's lanes).
    pub(crate) fn unhashed(
        file: Arc<File>,
        start: u64,
        len: u64,
        total: u64,
        chunk_size: u64,
        counters: Arc<Counters>,
    ) -> Self {
        Chunk {
            start,
            len,
            total,
            index: start / chunk_size.max(1),
            count: total.div_ceil(chunk_size.max(1)).max(1),
            file,
            pieces: None,
            lent: None,
            counters,
            throttle: Vec::new(),
            pending: None,
        }
    }

    /// Hand the bytes out no faster than these limits allow, in slices of
    /// at most [`crate::bandwidth::SLICE`].
    pub(crate) fn throttled(mut self, throttle: crate::bandwidth::Throttle) -> Self {
        self.throttle = throttle;
        self
    }

    /// Offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// True when this chunk ends the file.
    pub fn is_last(&self) -> bool {
        self.end() == self.total
    }

    /// The next piece of at most [`PIECE`] bytes, or `None` at the chunk's end.
    ///
    /// A reader on the blocking pool runs up to [`AHEAD`] pieces ahead of
    /// the caller (a [`ReadAhead`]'s, which also hands each piece to the
    /// hash, or the chunk's own), so reading, hashing and the network
    /// overlap instead of adding up.
    ///
    /// # Errors
    /// An I/O error, or `UnexpectedEof` when the source shrank.
    pub async fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        let mut piece = match self.pending.take() {
            Some(rest) => rest,
            None => match self.read_piece().await? {
                Some(piece) => piece,
                None => return Ok(None),
            },
        };
        if !self.throttle.is_empty() {
            if piece.len() > crate::bandwidth::SLICE {
                self.pending = Some(piece.split_off(crate::bandwidth::SLICE));
            }
            for limit in &self.throttle {
                limit.take(piece.len()).await;
            }
        }
        self.counters
            .in_flight
            .fetch_add(piece.len() as u64, Ordering::Relaxed);
        Ok(Some(piece))
    }

    async fn read_piece(&mut self) -> io::Result<Option<Bytes>> {
        let end = self.end();
        if let Some(lent) = self.lent.as_mut() {
            let Some(queue) = lent.queue.as_mut() else {
                return Ok(None);
            };
            if queue.position >= end {
                lent.give_back();
                return Ok(None);
            }
            let piece = match queue.pieces.recv().await {
                Some(Ok(piece)) => piece,
                failed => {
                    // The reader has stopped: its queue serves no chunk again.
                    lent.queue = None;
                    return Err(failed.and_then(Result::err).unwrap_or_else(|| {
                        io::Error::other("the source's reader stopped before the chunk's end")
                    }));
                }
            };
            queue.position += piece.len() as u64;
            if queue.position >= end {
                lent.give_back();
            }
            return Ok(Some(piece));
        }
        if self.pieces.is_none() {
            self.pieces = Some(self.start_reader());
        }
        let Some(pieces) = self.pieces.as_mut() else {
            return Ok(None);
        };
        pieces.recv().await.transpose()
    }

    /// Read the chunk piece by piece, in order, into the caller's queue; it
    /// stops when the queue is gone (the chunk was dropped).
    fn start_reader(&mut self) -> tokio::sync::mpsc::Receiver<io::Result<Bytes>> {
        let (out, pieces) = tokio::sync::mpsc::channel(AHEAD);
        let file = Arc::clone(&self.file);
        let counters = Arc::clone(&self.counters);
        let (mut position, end) = (self.start, self.end());
        tokio::task::spawn_blocking(move || {
            while position < end {
                let want = (end - position).min(PIECE) as usize;
                let piece = read_piece_at(&file, want, position, &counters);
                let failed = piece.is_err();
                if out.blocking_send(piece).is_err() || failed {
                    return;
                }
                position += want as u64;
            }
        });
        pieces
    }

    /// The digest of this chunk's bytes, for protocols that want a checksum
    /// header before the body: taken from `ahead` when that is this chunk's
    /// (computed while the chunk before it was sent), else read once more
    /// now (normally from the page cache) without touching the file hash;
    /// memory stays one piece.
    ///
    /// # Errors
    /// I/O errors, or `UnexpectedEof` when the source shrank.
    pub async fn digest(
        &self,
        algorithm: ChecksumAlgorithm,
        ahead: Option<DigestAhead>,
    ) -> io::Result<Vec<u8>> {
        let ahead = match ahead {
            Some(ahead) if ahead.is_for(self, algorithm) => ahead,
            _ => self.digest_of(self.start, self.len, algorithm),
        };
        ahead.digest.await.map_err(io::Error::other)?
    }

    /// Start the digest of the chunk that follows this one (the same length
    /// at most, up to the file's end) on the blocking pool, so that it is
    /// ready when that chunk is sent: the checksum leaves the critical path.
    /// `None` when this chunk ends at `until` (the end of the file, or of a
    /// parallel lane, whose next chunk is another lane's and already sent).
    pub fn digest_following(
        &self,
        algorithm: ChecksumAlgorithm,
        until: u64,
    ) -> Option<DigestAhead> {
        let start = self.end();
        let until = until.min(self.total);
        if start >= until {
            return None;
        }
        Some(self.digest_of(start, self.len.min(until - start), algorithm))
    }

    fn digest_of(&self, start: u64, len: u64, algorithm: ChecksumAlgorithm) -> DigestAhead {
        use sha2::Digest;
        let file = Arc::clone(&self.file);
        let counters = Arc::clone(&self.counters);
        let digest = tokio::task::spawn_blocking(move || {
            let mut sha1 = sha1::Sha1::new();
            let mut sha256 = sha2::Sha256::new();
            read_range(
                &file,
                start,
                start + len,
                &counters,
                |piece| match algorithm {
                    ChecksumAlgorithm::Sha1 => sha1.update(piece),
                    ChecksumAlgorithm::Sha256 => sha256.update(piece),
                },
            )?;
            Ok(match algorithm {
                ChecksumAlgorithm::Sha1 => sha1.finalize().to_vec(),
                ChecksumAlgorithm::Sha256 => sha256.finalize().to_vec(),
            })
        });
        DigestAhead {
            file: Arc::clone(&self.file),
            start,
            len,
            algorithm,
            digest,
        }
    }

    /// The chunk as a byte stream, for an HTTP request body.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::try_unfold(self, |mut chunk| async move {
            Ok(chunk.next_piece().await?.map(|piece| (piece, chunk)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn chunk_of(
        file: &Arc<File>,
        start: u64,
        len: u64,
        total: u64,
        counters: &Arc<Counters>,
    ) -> Chunk {
        Chunk::unhashed(
            Arc::clone(file),
            start,
            len,
            total,
            len,
            Arc::clone(counters),
        )
    }

    /// Take every piece of `chunk`, in order.
    async fn drain(mut chunk: Chunk) -> Vec<u8> {
        let mut bytes = Vec::new();
        while let Some(piece) = chunk.next_piece().await.unwrap() {
            bytes.extend_from_slice(&piece);
        }
        bytes
    }

    /// Wait (with a deadline) until `counters` show `bytes` read.
    async fn read_reaches(counters: &Counters, bytes: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while counters.read.load(Ordering::Relaxed) < bytes {
            assert!(
                tokio::time::Instant::now() < deadline,
                "read stopped at {counters:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn reads_run_on_across_chunk_ends_and_the_hash_stops_at_each() {
        let len = 3 * PIECE + 1234;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&bytes).unwrap();
        let file = Arc::new(tmp);
        let counters = Arc::new(Counters::default());
        // Chunks that do not fall on piece boundaries, from an offset
        // already hashed (a resumed upload).
        let chunk_size = PIECE + PIECE / 2;
        let start = 1000;
        let mut hash = ResumableSha256::default();
        hash.update(&bytes[..start as usize]);
        let (mut ahead, first) = ReadAhead::start(
            Arc::clone(&file),
            start,
            chunk_size,
            len,
            chunk_size,
            hash,
            Arc::clone(&counters),
        );
        assert_eq!(
            drain(first).await,
            bytes[start as usize..(start + chunk_size) as usize]
        );
        // The next chunk's first pieces are read before it is asked for.
        read_reaches(&counters, chunk_size + PIECE).await;
        let mut at = start + chunk_size;
        let hash = ahead.hash_at(at).await.unwrap();
        let mut reference = ResumableSha256::default();
        reference.update(&bytes[..at as usize]);
        assert_eq!(hash, reference);
        while at < len {
            let chunk_len = chunk_size.min(len - at);
            let chunk = ahead
                .chunk(at, chunk_len, chunk_size)
                .expect("the reader stands here");
            assert_eq!(
                drain(chunk).await,
                bytes[at as usize..(at + chunk_len) as usize]
            );
            at += chunk_len;
            let mut reference = ResumableSha256::default();
            reference.update(&bytes[..at as usize]);
            assert_eq!(ahead.hash_at(at).await.unwrap(), reference, "hash at {at}");
        }
        assert_eq!(
            counters.read.load(Ordering::Relaxed),
            len - start,
            "each byte read once"
        );
    }

    #[tokio::test]
    async fn a_chunk_left_half_read_makes_the_next_start_again() {
        let len = 4 * PIECE;
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&vec![9u8; len as usize]).unwrap();
        let file = Arc::new(tmp);
        let counters = Arc::new(Counters::default());
        let (ahead, mut first) = ReadAhead::start(
            Arc::clone(&file),
            0,
            2 * PIECE,
            len,
            2 * PIECE,
            ResumableSha256::default(),
            Arc::clone(&counters),
        );
        assert!(first.next_piece().await.unwrap().is_some());
        drop(first);
        assert!(ahead.chunk(2 * PIECE, 2 * PIECE, 2 * PIECE).is_none());
        assert!(
            ahead.chunk(PIECE, 2 * PIECE, 2 * PIECE).is_none(),
            "not mid-chunk either"
        );
    }

    /// A provider may answer "complete" without reading the whole chunk
    /// (movingimage's "upload is complete", api.video's "already
    /// uploaded"): the hash at the chunk's end is then unknown, and asking
    /// for it must say so at once, not wait for a reader that will never
    /// get there.
    /// A read-ahead over two chunks of six pieces, with the first chunk
    /// and one of its pieces taken: the rest of it is left unread.
    async fn a_chunk_read_one_piece_in() -> (ReadAhead, Chunk, u64) {
        let chunk_size = 6 * PIECE;
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&vec![7u8; 2 * chunk_size as usize]).unwrap();
        let (ahead, mut first) = ReadAhead::start(
            Arc::new(tmp),
            0,
            chunk_size,
            2 * chunk_size,
            chunk_size,
            ResumableSha256::default(),
            Arc::new(Counters::default()),
        );
        assert!(first.next_piece().await.unwrap().is_some());
        (ahead, first, chunk_size)
    }

    /// `ahead.hash_at(end)`, which must answer within a deadline.
    async fn hash_at_promptly(ahead: &mut ReadAhead, end: u64) -> Option<ResumableSha256> {
        tokio::time::timeout(std::time::Duration::from_secs(10), ahead.hash_at(end))
            .await
            .expect("hash_at must not wait for bytes nobody will read")
    }

    /// A provider may answer "complete" without reading the whole chunk
    /// (movingimage's "upload is complete", api.video's "already
    /// uploaded"): the hash at the chunk's end is then unknown, and asking
    /// for it must say so at once, not wait for a reader that will never
    /// get there.
    #[tokio::test]
    async fn the_hash_at_the_end_of_a_chunk_left_unread_is_none_at_once() {
        let (mut ahead, first, chunk_size) = a_chunk_read_one_piece_in().await;
        drop(first);
        assert!(hash_at_promptly(&mut ahead, chunk_size).await.is_none());
    }

    /// The same while the request still holds the chunk (a server that
    /// answered before reading the body): the hash is unknown at once, and
    /// no next chunk starts from the reader.
    #[tokio::test]
    async fn the_hash_at_the_end_of_a_chunk_still_held_is_none_at_once() {
        let (mut ahead, held, chunk_size) = a_chunk_read_one_piece_in().await;
        assert!(hash_at_promptly(&mut ahead, chunk_size).await.is_none());
        assert!(ahead.chunk(chunk_size, chunk_size, chunk_size).is_none());
        drop(held);
    }

    #[tokio::test]
    async fn the_following_chunks_digest_is_read_ahead_and_used_once_it_matches() {
        use sha2::Digest;
        let mut tmp = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        tmp.write_all(&bytes).unwrap();
        let file = Arc::new(tmp);
        let counters = Arc::new(Counters::default());
        let first = chunk_of(&file, 0, 4_000, 10_000, &counters);
        let ahead = first
            .digest_following(ChecksumAlgorithm::Sha256, 10_000)
            .unwrap();
        let second = chunk_of(&file, 4_000, 4_000, 10_000, &counters);
        assert!(ahead.is_for(&second, ChecksumAlgorithm::Sha256));
        assert!(!ahead.is_for(&second, ChecksumAlgorithm::Sha1));
        assert!(!ahead.is_for(&first, ChecksumAlgorithm::Sha256));
        // Let the read-ahead finish: using it then reads nothing more.
        while counters.read.load(Ordering::Relaxed) < 4_000 {
            tokio::task::yield_now().await;
        }
        let digest = second
            .digest(ChecksumAlgorithm::Sha256, Some(ahead))
            .await
            .unwrap();
        assert_eq!(digest, sha2::Sha256::digest(&bytes[4_000..8_000]).to_vec());
        assert_eq!(
            counters.read.load(Ordering::Relaxed),
            4_000,
            "read once, ahead"
        );
        // The last chunk is shorter; nothing follows it.
        let last = chunk_of(&file, 8_000, 2_000, 10_000, &counters);
        let ahead = second
            .digest_following(ChecksumAlgorithm::Sha1, 10_000)
            .unwrap();
        assert!(ahead.is_for(&last, ChecksumAlgorithm::Sha1));
        assert!(
            last.digest_following(ChecksumAlgorithm::Sha1, 10_000)
                .is_none()
        );
        // Nor after the end of a lane.
        assert!(
            first
                .digest_following(ChecksumAlgorithm::Sha1, 4_000)
                .is_none()
        );
        // A digest ahead of another file is never used.
        let other = Arc::new(tempfile::tempfile().unwrap());
        assert!(!ahead.is_for(
            &chunk_of(&other, 8_000, 2_000, 10_000, &counters),
            ChecksumAlgorithm::Sha1
        ));
        let digest = first
            .digest(ChecksumAlgorithm::Sha1, Some(ahead))
            .await
            .unwrap();
        assert_eq!(
            digest,
            sha1::Sha1::digest(&bytes[..4_000]).to_vec(),
            "a mismatch computes its own"
        );
    }
}
