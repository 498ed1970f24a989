//! Building the full mesh: rank `r` connects to every lower rank and accepts every higher
//! one. The connector says who it is (magic, job token, rank, world size); the acceptor
//! drops anything else (a port scanner, a worker of an earlier run of the job) and answers
//! with its own magic, token and rank.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::wire::Peer;
use crate::error::{Error, Result};

const MAGIC: u64 = u64::from_le_bytes(*b"TIDEMILL");
const HELLO_LEN: usize = 32;
const REPLY_LEN: usize = 24;
/// The longest one handshake step may take, so a silent stray connection cannot hold up
/// the acceptor for the whole connect timeout.
const HANDSHAKE_STEP: Duration = Duration::from_secs(5);

/// Connections to every other rank (`None` at `rank`), TCP_NODELAY on.
pub(super) fn mesh(
    rank: usize,
    addrs: &[SocketAddr],
    listener: TcpListener,
    nonce: u64,
    timeout: Duration,
) -> Result<Vec<Option<Peer>>> {
    let n = addrs.len();
    if rank >= n {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} of a world of {n}"
        )));
    }
    let deadline = Instant::now() + timeout;
    let stop = AtomicBool::new(false);
    let (accepted, connected) = std::thread::scope(|s| {
        let acceptor = s.spawn(|| accept_higher(rank, n, &listener, nonce, deadline, &stop));
        let connected = connect_lower(rank, addrs, nonce, deadline);
        if connected.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let accepted = acceptor
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (accepted, connected)
    });
    let mut streams: Vec<Option<TcpStream>> = connected?;
    streams.push(None);
    streams.extend(accepted?.into_iter().map(Some));
    streams
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            s.map(|s| {
                s.set_nodelay(true)
                    .and_then(|()| Peer::new(s))
                    .map_err(|e| {
                        Error::Connect(format!(
                            "rank {rank}: setting up the connection to rank {r}: {e}"
                        ))
                    })
            })
            .transpose()
        })
        .collect()
}

fn step_deadline(deadline: Instant) -> Option<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    (!d.is_zero()).then(|| d.min(HANDSHAKE_STEP).max(Duration::from_millis(1)))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Connections from ranks `rank + 1..n`, in rank order.
fn accept_higher(
    rank: usize,
    n: usize,
    listener: &TcpListener,
    nonce: u64,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Vec<TcpStream>> {
    let mut got: Vec<Option<TcpStream>> = (rank + 1..n).map(|_| None).collect();
    if got.is_empty() {
        return Ok(Vec::new());
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Connect(format!("rank {rank}: listener: {e}")))?;
    while got.iter().any(Option::is_none) {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            let missing: Vec<usize> = (rank + 1..n)
                .filter(|r| got[r - rank - 1].is_none())
                .collect();
            return Err(Error::Connect(format!(
                "rank {rank}: ranks {missing:?} did not connect in time"
            )));
        }
        match listener.accept() {
            Ok((stream, from)) => match greet(stream, rank, n, nonce, deadline) {
                Ok((peer, stream)) if got[peer - rank - 1].is_none() => {
                    got[peer - rank - 1] = Some(stream)
                }
                Ok((peer, _)) => {
                    tracing::warn!(rank, peer, %from, "refused a second data-plane connection")
                }
                Err(why) => tracing::warn!(rank, %from, "refused a data-plane connection: {why}"),
            },
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                tracing::warn!(rank, "accepting a data-plane connection: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// The acceptor's side of the handshake: the connecting rank, if it is one of ours.
fn greet(
    mut s: TcpStream,
    rank: usize,
    n: usize,
    nonce: u64,
    deadline: Instant,
) -> Result<(usize, TcpStream), String> {
    let io = |e: io::Error| e.to_string();
    s.set_nonblocking(false).map_err(io)?;
    s.set_read_timeout(step_deadline(deadline)).map_err(io)?;
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(io)?;
    if u64_at(&hello, 0) != MAGIC {
        return Err("not a tidemill data-plane peer".into());
    }
    if u64_at(&hello, 8) != nonce {
        return Err("the job token does not match (a worker of another job or run?)".into());
    }
    let (peer, world) = (u64_at(&hello, 16), u64_at(&hello, 24));
    if world != n as u64 {
        return Err(format!("it thinks the world has {world} ranks, not {n}"));
    }
    let peer = usize::try_from(peer)
        .ok()
        .filter(|&p| p > rank && p < n)
        .ok_or(format!("rank {peer} should not connect to rank {rank}"))?;
    let mut reply = [0u8; REPLY_LEN];
    reply[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    reply[8..16].copy_from_slice(&nonce.to_le_bytes());
    reply[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
    s.set_write_timeout(step_deadline(deadline)).map_err(io)?;
    s.write_all(&reply).map_err(io)?;
    s.set_read_timeout(None).map_err(io)?;
    s.set_write_timeout(None).map_err(io)?;
    Ok((peer, s))
}

/// Connections to ranks `0..rank`, retried until `deadline` (a peer may not listen yet).
fn connect_lower(
    rank: usize,
    addrs: &[SocketAddr],
    nonce: u64,
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>> {
    let n = addrs.len();
    let mut out = Vec::with_capacity(rank);
    for (peer, addr) in addrs.iter().enumerate().take(rank) {
        let fail =
            |what: String| Error::Connect(format!("rank {rank} to rank {peer} at {addr}: {what}"));
        let mut s = loop {
            let Some(wait) = step_deadline(deadline) else {
                return Err(fail("no connection before the connect timeout".into()));
            };
            match TcpStream::connect_timeout(addr, wait) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(fail(e.to_string())),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let io = |e: io::Error| fail(format!("handshake: {e}"));
        let mut hello = [0u8; HELLO_LEN];
        hello[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        hello[8..16].copy_from_slice(&nonce.to_le_bytes());
        hello[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
        hello[24..32].copy_from_slice(&(n as u64).to_le_bytes());
        s.set_write_timeout(step_deadline(deadline)).map_err(io)?;
        s.write_all(&hello).map_err(io)?;
        // The acceptor may be busy with other ranks' handshakes: wait up to the deadline.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).map_err(io)?;
        let mut reply = [0u8; REPLY_LEN];
        s.read_exact(&mut reply).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                fail("refused by the listener (another job's worker?)".into())
            }
            _ => io(e),
        })?;
        if u64_at(&reply, 0) != MAGIC
            || u64_at(&reply, 8) != nonce
            || u64_at(&reply, 16) != peer as u64
        {
            return Err(fail(
                "the listener is not this job's rank (stale address?)".into(),
            ));
        }
        s.set_read_timeout(None).map_err(io)?;
        s.set_write_timeout(None).map_err(io)?;
        out.push(Some(s));
    }
    Ok(out)
}
