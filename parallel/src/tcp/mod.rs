//! The CPU data plane: a full mesh of TCP connections and the collectives over it.
//!
//! ```
//! # use tidemill_parallel as parallel;
//! use parallel::{Collectives, ReduceOp, TcpComm, TcpOptions};
//! let ranks = TcpComm::local_group(3, TcpOptions::default())?;
//! std::thread::scope(|s| {
//!     for comm in &ranks {
//!         s.spawn(move || {
//!             let mut x = vec![1.0f32; 4];
//!             comm.all_reduce(&mut x, ReduceOp::Sum).expect("all_reduce");
//!             assert_eq!(x, [3.0; 4]);
//!         });
//!     }
//! });
//! # Ok::<(), parallel::Error>(())
//! ```
//!
//! Every collective has a deadline (`TcpOptions::timeout` from its start); a rank that
//! misses it, exits or issues a different collective makes the others fail with an error
//! naming it (see `blame`). After such an error the connections are out of step and every
//! later collective fails at once: the job restarts.
//!
//! Groups made by [`Communicator::split`] share the world's connections; collectives on
//! groups that share a peer must not run concurrently from different threads.

mod algo;
mod blame;
mod call;
mod conn;
mod wire;

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use call::{reduce_detail, Call, Fault, Op};
use wire::Peer;

use crate::comm::{Communicator, DType, ReduceOp};
use crate::error::{Error, Result};

/// Settings of the TCP data plane.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Deadline of one collective, from its start.
    pub timeout: Duration,
    /// Deadline for building the whole mesh.
    pub connect_timeout: Duration,
    /// The job's connection token: connections that do not present it are refused.
    pub nonce: u64,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(60),
            nonce: 0,
        }
    }
}

/// The connections, shared by the world group and every group split from it.
struct Shared {
    /// This process's world rank.
    rank: usize,
    /// Indexed by world rank; `None` at `rank`.
    peers: Vec<Option<Peer>>,
    opts: TcpOptions,
    /// Set by the first failed collective: (the rank it named, the error).
    failed: Mutex<Option<(usize, String)>>,
}

impl Shared {
    fn peer(&self, world: usize) -> &Peer {
        self.peers[world]
            .as_ref()
            .expect("collectives never address their own rank")
    }
}

/// A group of ranks over TCP. The world group comes from [`TcpComm::connect`]; sub-groups
/// from [`Communicator::split`] are `TcpComm`s too.
pub struct TcpComm {
    shared: Arc<Shared>,
    /// World rank of each group rank.
    members: Vec<usize>,
    /// This process's group rank.
    rank: usize,
    /// 0 for the world, else a hash of how the group was made; every frame carries it.
    id: u64,
    seq: AtomicU64,
}

impl fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpComm")
            .field("rank", &self.rank)
            .field("members", &self.members)
            .field("id", &format_args!("{:#x}", self.id))
            .field("seq", &self.seq())
            .finish()
    }
}

impl TcpComm {
    /// Build the full mesh. `listener` is this rank's bound data-plane listener (its address
    /// is `addrs[rank]`); `addrs[r]` is rank `r`'s. Rank `r` connects to every lower rank
    /// and accepts every higher one, within `opts.connect_timeout`.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        opts: TcpOptions,
    ) -> Result<TcpComm> {
        let peers = conn::mesh(rank, addrs, listener, opts.nonce, opts.connect_timeout)?;
        let shared = Shared {
            rank,
            peers,
            opts,
            failed: Mutex::new(None),
        };
        Ok(TcpComm {
            shared: Arc::new(shared),
            members: (0..addrs.len()).collect(),
            rank,
            id: 0,
            seq: AtomicU64::new(0),
        })
    }

    /// `n` ranks in this process on 127.0.0.1, in rank order (for tests).
    pub fn local_group(n: usize, opts: TcpOptions) -> Result<Vec<TcpComm>> {
        if n == 0 {
            return Err(Error::InvalidArgument("a group of 0 ranks".into()));
        }
        let bind = |_| TcpListener::bind(("127.0.0.1", 0));
        let listeners = (0..n).map(bind).collect::<io::Result<Vec<_>>>();
        let listeners = listeners.map_err(|e| Error::Connect(format!("binding 127.0.0.1: {e}")))?;
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<Vec<_>>>();
        let addrs = addrs.map_err(|e| Error::Connect(e.to_string()))?;
        let addrs = &addrs;
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let opts = opts.clone();
                    s.spawn(move || TcpComm::connect(r, addrs, l, opts))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// This process's world rank.
    pub fn world_rank(&self) -> usize {
        self.shared.rank
    }

    /// Run one collective (`tick`: counted in `seq`; point to point is not).
    fn run<T>(
        &self,
        op: Op,
        detail: u8,
        tick: bool,
        f: impl FnOnce(&Call) -> Result<T, Fault>,
    ) -> Result<T> {
        let seq = if tick {
            self.seq.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.seq()
        };
        let failed = self
            .shared
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some((peer, what)) = failed {
            let source = io::Error::other(format!(
                "the data plane is down since an earlier failure: {what}"
            ));
            return Err(Error::PeerLost {
                peer,
                rank: self.shared.rank,
                op: op.name(),
                seq,
                source,
            });
        }
        let _in = crate::runtime::position::enter(op.name(), tick);
        let call = Call::new(self, op, detail, seq);
        f(&call).map_err(|fault| {
            let err = blame::conclude(&call, fault);
            let peer = match &err {
                Error::Timeout { peer, .. }
                | Error::PeerLost { peer, .. }
                | Error::Mismatch { peer, .. } => *peer,
                _ => self.shared.rank,
            };
            *self
                .shared
                .failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some((peer, err.to_string()));
            err
        })
    }

    fn check_rank(&self, what: &str, r: usize) -> Result<()> {
        if r < self.members.len() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{what} rank {r} in a group of {}",
                self.members.len()
            )))
        }
    }

    fn check_peer(&self, what: &str, peer: usize) -> Result<()> {
        self.check_rank(what, peer)?;
        if peer == self.rank {
            return Err(Error::InvalidArgument(format!(
                "{what} rank {peer}: this rank itself"
            )));
        }
        Ok(())
    }
}

fn check_elems(what: &str, len: usize, dtype: DType) -> Result<()> {
    if len.is_multiple_of(dtype.size()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what}: {len} bytes is not a whole number of {dtype:?} elements"
        )))
    }
}

/// FNV-1a over words.
fn fnv(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_elems("all_reduce", buf.len(), dtype)?;
        self.run(Op::AllReduce, reduce_detail(dtype, op), true, |call| {
            algo::all_reduce(call, buf, dtype, op)
        })
    }

    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        if output.len() != input.len() * self.size() {
            return Err(Error::InvalidArgument(format!(
                "all_gather of {} bytes over {} ranks into {} bytes",
                input.len(),
                self.size(),
                output.len()
            )));
        }
        self.run(Op::AllGather, 0, true, |call| {
            algo::all_gather(call, input, output)
        })
    }

    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        check_elems("reduce_scatter", output.len(), dtype)?;
        if input.len() != output.len() * self.size() {
            return Err(Error::InvalidArgument(format!(
                "reduce_scatter of {} bytes over {} ranks into {} bytes",
                input.len(),
                self.size(),
                output.len()
            )));
        }
        let detail = reduce_detail(dtype, op);
        self.run(Op::ReduceScatter, detail, true, |call| {
            algo::reduce_scatter(call, input, output, dtype, op)
        })
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_rank("broadcast from", root)?;
        self.run(Op::Broadcast, root as u8, true, |call| {
            algo::broadcast(call, buf, root)
        })
    }

    fn send_bytes(&self, buf: &[u8], peer: usize) -> Result<()> {
        self.check_peer("send to", peer)?;
        self.run(Op::Send, 0, false, |call| call.send(peer, buf))
    }

    fn recv_bytes(&self, buf: &mut [u8], peer: usize) -> Result<()> {
        self.check_peer("recv from", peer)?;
        self.run(Op::Recv, 0, false, |call| call.recv_into(peer, buf))
    }

    fn send_recv_bytes(&self, send: &[u8], to: usize, recv: &mut [u8], from: usize) -> Result<()> {
        self.check_peer("send to", to)?;
        self.check_peer("recv from", from)?;
        self.run(Op::Send, 0, false, |call| {
            call.exchange(to, send, from, recv)
        })
    }

    fn all_to_all_bytes(&self, send: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.size() {
            return Err(Error::InvalidArgument(format!(
                "all_to_all with {} chunks in a group of {}",
                send.len(),
                self.size()
            )));
        }
        self.run(Op::AllToAll, 0, true, |call| algo::all_to_all(call, send))
    }

    fn barrier(&self) -> Result<()> {
        self.run(Op::Barrier, 0, true, algo::barrier)
    }

    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Communicator>> {
        let ascending = ranks.windows(2).all(|w| w[0] < w[1]);
        let Some(rank) = ranks.iter().position(|&r| r == self.rank) else {
            return Err(Error::InvalidArgument(format!(
                "split {ranks:?}: rank {} is not among them",
                self.rank
            )));
        };
        if !ascending || ranks.iter().any(|&r| r >= self.size()) {
            return Err(Error::InvalidArgument(format!(
                "split {ranks:?}: ranks must be ascending and below {}",
                self.size()
            )));
        }
        let members: Vec<usize> = ranks.iter().map(|&r| self.members[r]).collect();
        // Where the group was made (parent and its seq) tells apart groups of the same ranks.
        let words = [self.id, self.seq()]
            .into_iter()
            .chain(members.iter().map(|&w| w as u64));
        let id = fnv(words).max(1);
        Ok(Arc::new(TcpComm {
            shared: Arc::clone(&self.shared),
            members,
            rank,
            id,
            seq: AtomicU64::new(0),
        }))
    }
}
