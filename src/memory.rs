//! The process's memory as the allocator sees it. glibc keeps freed heap
//! memory for reuse: after a burst (100,000 files discovered at once) the
//! live heap falls back while resident memory stays at the burst's peak.
//! The daemon gives free pages back now and then, and `/metrics` shows both
//! the live heap and what the heap holds, so a leak (live heap growing) is
//! told apart from a high-water mark.

/// Fix glibc's mmap threshold. glibc raises it each time a large block is
/// freed, after which the 1 MiB read buffers come from the heap, fragment
/// it, and stay in the process after they are freed (78 -> 127 MiB over
/// 4,000 files, the live heap near 40 MiB); a fixed threshold keeps such
/// buffers in their own mappings, returned to the system when freed.
/// Call before any other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Other allocators (musl's, in the static build) do not grow a threshold.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Bytes of live heap allocations, and bytes the heap holds from the system
/// (in use or free). `None` where the allocator does not say.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap() -> Option<(u64, u64)> {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    let in_use = (info.uordblks + info.hblkhd) as u64;
    let held = (info.arena + info.hblkhd) as u64;
    Some((in_use, held))
}

/// Other allocators do not say.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap() -> Option<(u64, u64)> {
    None
}

/// [`heap`], read at most once per [`HEAP_READ_EVERY`]: glibc's
/// `mallinfo2` walks every arena under its lock, and the daemon's
/// allocations wait meanwhile (a `/metrics` scrape every 20 ms during a
/// drop of 10,000 small files was about 5% of the daemon's time under
/// `perf`). Figures a second old serve a scrape as well.
pub fn heap_recent() -> Option<(u64, u64)> {
    type Read = Option<(std::time::Instant, Option<(u64, u64)>)>;
    static LAST: std::sync::Mutex<Read> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    match *last {
        Some((at, figures)) if at.elapsed() < HEAP_READ_EVERY => figures,
        _ => {
            let figures = heap();
            *last = Some((std::time::Instant::now(), figures));
            figures
        }
    }
}

/// How old [`heap_recent`]'s figures may be.
pub const HEAP_READ_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Give whole free pages of the heap back to the system (blocking: it
/// walks every arena; a few milliseconds).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back_free_memory() {
    // SAFETY: malloc_trim only releases memory no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory their own way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heap_is_read_at_most_once_a_second() {
        let first = heap_recent();
        // Several MiB more in use, in blocks below every mmap threshold.
        let grown: Vec<Vec<u8>> = (0..64).map(|n| vec![n as u8; 100_000]).collect();
        assert_eq!(
            heap_recent(),
            first,
            "read again within {HEAP_READ_EVERY:?}"
        );
        drop(grown);
    }
}
