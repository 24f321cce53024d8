//! A long link on loopback, for the parallel-parts rows of bench/run: this
//! machine has no `netem`, so a TCP proxy holds every byte for half the
//! round trip in each direction and lets each connection have at most a
//! window of bytes in flight, a byte counting as in flight from the moment
//! it is read until a full round trip later (when its acknowledgement would
//! be back). One stream is then capped at window / RTT, as on a WAN whose
//! TCP window does not grow; several streams each get their own window.
//!
//! ```sh
//! cargo build --release --example delay_proxy
//! target/release/examples/delay_proxy UPSTREAM [RTT_MS] [WINDOW_BYTES]
//! # prints "delay proxy listening on 127.0.0.1:PORT"; defaults 100 ms, 256 KiB
//! ```
//!
//! Not modelled: connection set-up (a new connection costs no round trip
//! here), loss, and a window that grows; each is a reason a real link is
//! slower, never faster, so the ratios this gives are not flattering.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

/// Bytes read off a socket at once; the window is counted in these.
const PIECE: usize = 16 << 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: delay_proxy UPSTREAM_IP:PORT [RTT_MS] [WINDOW_BYTES]";
    let upstream: SocketAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let rtt = Duration::from_millis(args.next().map_or(Ok(100), |a| a.parse())?);
    let window: usize = args.next().map_or(Ok(256 << 10), |a| a.parse())?;
    anyhow::ensure!(window >= PIECE, "the window must be at least {PIECE} bytes");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("delay proxy listening on {}", listener.local_addr()?);
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                carry(client_read, server_write, rtt, window),
                carry(server_read, client_write, rtt, window),
            );
        });
    }
}

/// One direction of one connection: read while the window has room, deliver
/// each piece half a round trip after it was read, free its room a whole
/// round trip after.
async fn carry(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, rtt: Duration, window: usize) {
    let room = Arc::new(Semaphore::new(window));
    let (pieces, mut arriving) =
        mpsc::unbounded_channel::<(Instant, Vec<u8>, OwnedSemaphorePermit)>();
    let read = async move {
        let mut buf = vec![0u8; PIECE];
        loop {
            let Ok(permit) = Arc::clone(&room).acquire_many_owned(PIECE as u32).await else {
                return;
            };
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if pieces
                        .send((Instant::now(), buf[..n].to_vec(), permit))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let deliver = async move {
        while let Some((read_at, bytes, permit)) = arriving.recv().await {
            tokio::time::sleep_until(read_at + rtt / 2).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
            tokio::spawn(async move {
                tokio::time::sleep_until(read_at + rtt).await;
                drop(permit);
            });
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, deliver);
}
