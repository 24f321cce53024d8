//! Receiving a request body the way every simulator does: streamed to disk
//! at the right offset, paced by `--throttle`, cut short where the fault
//! dice marked the request for a dropped connection.

use std::io::Write;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::faults::Faults;

/// How a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written.
    pub bytes: u64,
    /// The body did not arrive whole (client gone, or cut by the dice).
    pub broken: bool,
    /// Cut by the dice: the caller should drop the connection now.
    pub cut: bool,
}

/// The body carried more than `max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// Write `stream` into `file` (already positioned), at most `max` bytes;
/// `cut_after` (from the fault dice) stops early; `seen` sees every byte.
///
/// # Errors
/// [`TooLong`] when the body goes past `max`.
pub async fn write_body<S, E>(
    faults: &Faults,
    mut stream: S,
    file: &mut std::fs::File,
    max: u64,
    cut_after: Option<u64>,
    mut seen: impl FnMut(&[u8]),
) -> Result<Received, TooLong>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let _receiving = Receiving::new(faults);
    let mut received = Received {
        bytes: 0,
        broken: false,
        cut: false,
    };
    while let Some(frame) = stream.next().await {
        let Ok(mut bytes) = frame else {
            received.broken = true;
            break;
        };
        if let Some(limit) = cut_after
            && received.bytes + bytes.len() as u64 >= limit
        {
            bytes.truncate((limit - received.bytes) as usize);
            received.cut = true;
        }
        if received.bytes + bytes.len() as u64 > max {
            return Err(TooLong);
        }
        faults.pace(bytes.len()).await;
        if file.write_all(&bytes).is_err() {
            received.broken = true;
            break;
        }
        seen(&bytes);
        received.bytes += bytes.len() as u64;
        if received.cut {
            received.broken = true;
            break;
        }
    }
    Ok(received)
}

/// Counts one body being received, however its request ends.
struct Receiving<'a>(&'a Faults);

impl<'a> Receiving<'a> {
    fn new(faults: &'a Faults) -> Self {
        use std::sync::atomic::Ordering;
        let now = faults.bodies_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        faults
            .bodies_in_flight_peak
            .fetch_max(now, Ordering::SeqCst);
        Receiving(faults)
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.0
            .bodies_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
