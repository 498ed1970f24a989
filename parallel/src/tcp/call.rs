//! One collective in flight: its op, seq and deadline, and the checked sends and receives
//! the algorithms are written with. Failures come back as a [`Fault`] naming the peer (world
//! rank); `blame` turns that into the public error.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::wire::{Header, IoFail, Peer, RecvHalf, Statement, OP_STATEMENT};
use super::TcpComm;
use crate::comm::{DType, ReduceOp};

/// Messages at most this long are sent before receiving on the same thread in a
/// full-duplex step; longer ones are sent from a second thread, so that two ranks sending
/// to each other cannot both block on full socket buffers.
const INLINE_SEND: usize = 8 * 1024;

/// The collectives, by wire code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast,
    Send,
    Recv,
    AllToAll,
    Barrier,
}

impl Op {
    pub fn code(self) -> u8 {
        match self {
            Op::AllReduce => 1,
            Op::AllGather => 2,
            Op::ReduceScatter => 3,
            Op::Broadcast => 4,
            // A send is matched by a recv: one code for both.
            Op::Send | Op::Recv => 5,
            Op::AllToAll => 6,
            Op::Barrier => 7,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::Send => "send",
            Op::Recv => "recv",
            Op::AllToAll => "all_to_all",
            Op::Barrier => "barrier",
        }
    }

    /// The name of a wire code (a send and a recv share one).
    pub fn name_of(code: u8) -> &'static str {
        const ALL: [Op; 7] = [
            Op::AllReduce,
            Op::AllGather,
            Op::ReduceScatter,
            Op::Broadcast,
            Op::Send,
            Op::AllToAll,
            Op::Barrier,
        ];
        match code {
            5 => "send/recv",
            _ => ALL
                .into_iter()
                .find(|op| op.code() == code)
                .map_or("an unknown op", Op::name),
        }
    }
}

/// The detail byte of a reduction: both ranks must agree on dtype and reduce op.
pub(super) fn reduce_detail(dtype: DType, op: ReduceOp) -> u8 {
    let d = match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F64 => 2,
        DType::U8 => 3,
        DType::I64 => 4,
    };
    let o = match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
    };
    d * 3 + o
}

fn describe(code: u8, detail: u8) -> String {
    const DTYPES: [&str; 5] = ["f32", "bf16", "f64", "u8", "i64"];
    const OPS: [&str; 3] = ["sum", "avg", "max"];
    let name = Op::name_of(code);
    match code {
        1 | 3 => format!(
            "{name} ({} {})",
            DTYPES.get(usize::from(detail / 3)).unwrap_or(&"?"),
            OPS[usize::from(detail % 3)]
        ),
        4 => format!("{name} (root {detail})"),
        _ => name.to_string(),
    }
}

/// What went wrong, and with which peer (world rank).
#[derive(Debug)]
pub(super) struct Fault {
    pub peer: usize,
    pub kind: FaultKind,
}

#[derive(Debug)]
pub(super) enum FaultKind {
    /// The deadline passed while waiting on the peer.
    Timeout,
    /// The connection broke.
    Lost(io::Error),
    /// The peer sent a frame of another collective.
    Mismatch(String),
    /// The peer gave up and said why.
    Told(Statement),
}

impl FaultKind {
    /// How definite a cause this is: a broken connection beats hearsay beats a timeout.
    fn certainty(&self) -> u8 {
        match self {
            FaultKind::Timeout => 0,
            FaultKind::Told(_) => 1,
            FaultKind::Lost(_) | FaultKind::Mismatch(_) => 2,
        }
    }
}

/// One collective on one group.
pub(super) struct Call<'a> {
    pub comm: &'a TcpComm,
    pub op: Op,
    pub detail: u8,
    pub seq: u64,
    pub deadline: Instant,
    /// Set when one thread of this call failed, so the other stops waiting.
    abort: AtomicBool,
}

impl<'a> Call<'a> {
    pub fn new(comm: &'a TcpComm, op: Op, detail: u8, seq: u64) -> Self {
        let deadline = Instant::now() + comm.shared.opts.timeout;
        Call {
            comm,
            op,
            detail,
            seq,
            deadline,
            abort: AtomicBool::new(false),
        }
    }

    /// This rank in the group.
    pub fn rank(&self) -> usize {
        self.comm.rank
    }

    pub fn size(&self) -> usize {
        self.comm.members.len()
    }

    /// World rank of group rank `g`.
    pub fn world(&self, g: usize) -> usize {
        self.comm.members[g]
    }

    fn peer(&self, g: usize) -> &Peer {
        self.comm.shared.peer(self.world(g))
    }

    fn header(&self, len: usize) -> Header {
        Header {
            group: self.comm.id,
            op: self.op.code(),
            detail: self.detail,
            seq: self.seq,
            len: len as u64,
        }
    }

    fn fault(&self, g: usize, fail: IoFail) -> Fault {
        let kind = match fail {
            IoFail::Timeout | IoFail::Aborted => FaultKind::Timeout,
            IoFail::Io(e) => FaultKind::Lost(e),
        };
        Fault {
            peer: self.world(g),
            kind,
        }
    }

    /// Send `data` to group rank `to`.
    pub fn send(&self, to: usize, data: &[u8]) -> Result<(), Fault> {
        let mut half = self.peer(to).sender();
        half.send(&self.header(data.len()), data, self.deadline, &self.abort)
            .map_err(|f| self.fault(to, f))
    }

    /// Receive one frame of this call from group rank `from`: check its header, then let
    /// `take` read the payload (given its length).
    fn receive<T>(
        &self,
        from: usize,
        take: impl FnOnce(&mut RecvHalf, usize) -> Result<T, Fault>,
    ) -> Result<T, Fault> {
        let mut half = self.peer(from).receiver();
        let got = half
            .read_header(self.deadline)
            .map_err(|f| self.fault(from, f))?;
        if got.op == OP_STATEMENT {
            let st = half
                .read_statement(&got, self.deadline)
                .map_err(|f| self.fault(from, f))?;
            return Err(Fault {
                peer: self.world(from),
                kind: FaultKind::Told(st),
            });
        }
        let want = self.header(0);
        if (got.group, got.op, got.detail, got.seq) != (want.group, want.op, want.detail, want.seq)
        {
            let message = format!(
                "expected {} #{} on group {:#x}, got {} #{} on group {:#x}",
                describe(want.op, want.detail),
                want.seq,
                want.group,
                describe(got.op, got.detail),
                got.seq,
                got.group
            );
            return Err(Fault {
                peer: self.world(from),
                kind: FaultKind::Mismatch(message),
            });
        }
        let len = usize::try_from(got.len).map_err(|_| Fault {
            peer: self.world(from),
            kind: FaultKind::Mismatch(format!("a frame of {} bytes", got.len)),
        })?;
        take(&mut half, len)
    }

    /// Receive exactly `buf.len()` bytes from group rank `from`.
    pub fn recv_into(&self, from: usize, buf: &mut [u8]) -> Result<(), Fault> {
        self.receive(from, |half, len| {
            if len != buf.len() {
                let message = format!(
                    "{} #{}: expected {} bytes, got {len}",
                    self.op.name(),
                    self.seq,
                    buf.len()
                );
                return Err(Fault {
                    peer: self.world(from),
                    kind: FaultKind::Mismatch(message),
                });
            }
            half.read_payload(buf, self.deadline)
                .map_err(|f| self.fault(from, f))
        })
    }

    /// Receive a frame of any length from group rank `from`.
    pub fn recv_vec(&self, from: usize) -> Result<Vec<u8>, Fault> {
        self.receive(from, |half, len| {
            let mut buf = vec![0u8; len];
            half.read_payload(&mut buf, self.deadline)
                .map_err(|f| self.fault(from, f))?;
            Ok(buf)
        })
    }

    /// Send `data` to `to` while receiving `buf.len()` bytes from `from`.
    pub fn exchange(
        &self,
        to: usize,
        data: &[u8],
        from: usize,
        buf: &mut [u8],
    ) -> Result<(), Fault> {
        self.duplex(to, data, || self.recv_into(from, buf))
    }

    /// Send `data` to `to` while receiving a frame of any length from `from`.
    pub fn exchange_vec(&self, to: usize, data: &[u8], from: usize) -> Result<Vec<u8>, Fault> {
        self.duplex(to, data, || self.recv_vec(from))
    }

    fn duplex<T>(
        &self,
        to: usize,
        data: &[u8],
        recv: impl FnOnce() -> Result<T, Fault>,
    ) -> Result<T, Fault> {
        if data.len() <= INLINE_SEND {
            self.send(to, data)?;
            return recv();
        }
        std::thread::scope(|s| {
            let sender = s.spawn(|| self.send(to, data));
            let got = recv();
            if got.is_err() {
                self.abort.store(true, Ordering::Relaxed);
            }
            let sent = sender
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            match (got, sent) {
                (Ok(v), Ok(())) => Ok(v),
                (Ok(_), Err(f)) => Err(f),
                // Blame the receive unless only the send has a definite cause.
                (Err(r), Err(w)) if w.kind.certainty() > r.kind.certainty() => Err(w),
                (Err(r), _) => Err(r),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_codes_are_distinct_and_named() {
        let all = [
            Op::AllReduce,
            Op::AllGather,
            Op::ReduceScatter,
            Op::Broadcast,
            Op::Send,
            Op::AllToAll,
            Op::Barrier,
        ];
        let mut codes: Vec<u8> = all.iter().map(|op| op.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(Op::Recv.code(), Op::Send.code());
        assert_eq!(Op::name_of(5), "send/recv");
        assert_eq!(
            describe(1, reduce_detail(DType::BF16, ReduceOp::Max)),
            "all_reduce (bf16 max)"
        );
        assert_eq!(describe(4, 3), "broadcast (root 3)");
    }
}
