//! Frames on a peer connection, and reads and writes that honour a collective's deadline.
//!
//! A frame is a 26-byte [`Header`] (group id, op code, op detail, seq, payload length, all
//! little endian) followed by the payload. Each peer connection is split into a send half
//! and a receive half (two handles on one socket), each behind its own mutex, so a rank can
//! write to a peer on one thread while it reads from the same peer on another.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub(super) const HEADER_LEN: usize = 26;
/// Op code of a [`Statement`] frame: a rank telling its group why it gives up.
pub(super) const OP_STATEMENT: u8 = 0xFF;
const STATEMENT_LEN: usize = 9;
/// A blocked write wakes up this often to notice that its collective gave up.
const WRITE_SLICE: Duration = Duration::from_millis(100);
const MIN_WAIT: Duration = Duration::from_millis(1);

/// What precedes every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    /// 0 for the world, a hash of the members for a sub-group.
    pub group: u64,
    pub op: u8,
    /// Op-specific: dtype and reduce op, or the broadcast root.
    pub detail: u8,
    pub seq: u64,
    pub len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.group.to_le_bytes());
        b[8] = self.op;
        b[9] = self.detail;
        b[10..18].copy_from_slice(&self.seq.to_le_bytes());
        b[18..26].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Header {
            group: u64_at(0),
            op: b[8],
            detail: b[9],
            seq: u64_at(10),
            len: u64_at(18),
        }
    }
}

/// Why a rank abandoned a collective, sent to the rest of its group so that every rank
/// can name the process that actually stopped answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Statement {
    pub kind: StatementKind,
    /// World rank the sender blames (or waits on, for `Blocked`).
    pub target: usize,
    /// The sender's op code and seq when it gave up.
    pub op: u8,
    pub seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StatementKind {
    /// The sender's deadline passed while it waited on `target`.
    Blocked,
    /// The sender's connection to `target` broke.
    Lost,
    /// `target` sent the sender a frame of another collective.
    Mismatch,
}

impl Statement {
    pub fn frame(&self) -> (Header, [u8; STATEMENT_LEN]) {
        let header = Header {
            group: 0,
            op: OP_STATEMENT,
            detail: self.op,
            seq: self.seq,
            len: STATEMENT_LEN as u64,
        };
        let mut body = [0u8; STATEMENT_LEN];
        body[0] = match self.kind {
            StatementKind::Blocked => 0,
            StatementKind::Lost => 1,
            StatementKind::Mismatch => 2,
        };
        body[1..9].copy_from_slice(&(self.target as u64).to_le_bytes());
        (header, body)
    }

    fn parse(header: &Header, body: &[u8]) -> Option<Self> {
        let kind = match body.first()? {
            0 => StatementKind::Blocked,
            1 => StatementKind::Lost,
            2 => StatementKind::Mismatch,
            _ => return None,
        };
        let target = u64::from_le_bytes(body.get(1..9)?.try_into().ok()?);
        Some(Statement {
            kind,
            target: usize::try_from(target).ok()?,
            op: header.detail,
            seq: header.seq,
        })
    }
}

/// How a deadline-bound read or write failed.
#[derive(Debug)]
pub(super) enum IoFail {
    Timeout,
    /// The collective gave up (another thread of it failed) while this write waited.
    Aborted,
    Io(io::Error),
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Time left until `deadline`, at least [`MIN_WAIT`]: data already there is still taken
/// after the deadline, and a read or write only fails once it really waited.
fn wait_for(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(MIN_WAIT)
}

/// `read_exact` that gives up when nothing arrives until `deadline`. On failure, also
/// returns how much it read.
fn read_exact(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), (IoFail, usize)> {
    let mut at = 0;
    while at < buf.len() {
        s.set_read_timeout(Some(wait_for(deadline)))
            .map_err(|e| (IoFail::Io(e), at))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err((IoFail::Io(io::ErrorKind::UnexpectedEof.into()), at)),
            Ok(k) => at += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err((IoFail::Timeout, at)),
            Err(e) => return Err((IoFail::Io(e), at)),
        }
    }
    Ok(())
}

/// `write_all` that gives up when the peer takes nothing until `deadline`, or once `abort`
/// is set. On failure, also returns how much it wrote.
fn write_all(
    s: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<(), (IoFail, usize)> {
    let mut at = 0;
    while at < buf.len() {
        if abort.load(Ordering::Relaxed) {
            return Err((IoFail::Aborted, at));
        }
        s.set_write_timeout(Some(wait_for(deadline).min(WRITE_SLICE)))
            .map_err(|e| (IoFail::Io(e), at))?;
        match s.write(&buf[at..]) {
            Ok(0) => return Err((IoFail::Io(io::ErrorKind::WriteZero.into()), at)),
            Ok(k) => at += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
            Err(e) if is_timeout(&e) => return Err((IoFail::Timeout, at)),
            Err(e) => return Err((IoFail::Io(e), at)),
        }
    }
    Ok(())
}

/// The connection to one peer.
pub(super) struct Peer {
    pub send: Mutex<SendHalf>,
    pub recv: Mutex<RecvHalf>,
}

impl Peer {
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        let reader = stream.try_clone()?;
        Ok(Peer {
            send: Mutex::new(SendHalf {
                stream,
                in_sync: true,
            }),
            recv: Mutex::new(RecvHalf {
                stream: reader,
                pending: Pending::None,
            }),
        })
    }

    pub fn sender(&self) -> MutexGuard<'_, SendHalf> {
        self.send.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn receiver(&self) -> MutexGuard<'_, RecvHalf> {
        self.recv.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct SendHalf {
    stream: TcpStream,
    /// False once a frame was cut off half-way: the peer can no longer parse this stream.
    pub in_sync: bool,
}

/// Frames up to this size go out in one write, header and payload together.
const COALESCE: usize = 64 * 1024;

impl SendHalf {
    pub fn send(
        &mut self,
        header: &Header,
        payload: &[u8],
        deadline: Instant,
        abort: &AtomicBool,
    ) -> Result<(), IoFail> {
        if !self.in_sync {
            return Err(IoFail::Io(io::Error::other(
                "the connection is out of step after an earlier failure",
            )));
        }
        let head = header.encode();
        let total = HEADER_LEN + payload.len();
        let result = if payload.len() <= COALESCE {
            let mut frame = Vec::with_capacity(total);
            frame.extend_from_slice(&head);
            frame.extend_from_slice(payload);
            write_all(&mut self.stream, &frame, deadline, abort)
        } else {
            write_all(&mut self.stream, &head, deadline, abort).and_then(|()| {
                write_all(&mut self.stream, payload, deadline, abort)
                    .map_err(|(f, k)| (f, k + HEADER_LEN))
            })
        };
        result.map_err(|(fail, written)| {
            if written > 0 && written < total {
                self.in_sync = false;
            }
            fail
        })
    }
}

/// Where the receive half stands between frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// At a frame boundary.
    None,
    /// This many payload bytes of the current frame are still unread.
    Payload(u64),
    /// A header was cut off: the stream cannot be parsed any more.
    Lost,
}

pub(super) struct RecvHalf {
    stream: TcpStream,
    pending: Pending,
}

impl RecvHalf {
    /// The next header; its payload must then be read with [`read_payload`] or skipped.
    pub fn read_header(&mut self, deadline: Instant) -> Result<Header, IoFail> {
        if self.pending != Pending::None {
            return Err(IoFail::Io(io::Error::other(
                "the connection is out of step after an earlier failure",
            )));
        }
        let mut b = [0u8; HEADER_LEN];
        read_exact(&mut self.stream, &mut b, deadline).map_err(|(fail, got)| {
            if got > 0 {
                self.pending = Pending::Lost;
            }
            fail
        })?;
        let header = Header::decode(&b);
        self.pending = Pending::Payload(header.len);
        Ok(header)
    }

    /// The payload of the header just read; `buf` must be exactly its length.
    pub fn read_payload(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), IoFail> {
        if self.pending != Pending::Payload(buf.len() as u64) {
            return Err(IoFail::Io(io::Error::other(
                "payload read out of step with its header",
            )));
        }
        read_exact(&mut self.stream, buf, deadline).map_err(|(fail, got)| {
            self.pending = Pending::Payload((buf.len() - got) as u64);
            fail
        })?;
        self.pending = Pending::None;
        Ok(())
    }

    /// Discard the rest of the current frame, if any.
    pub fn skip_payload(&mut self, deadline: Instant) -> Result<(), IoFail> {
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match self.pending {
                Pending::None => return Ok(()),
                Pending::Lost => return Err(IoFail::Io(io::Error::other("stream cut mid-header"))),
                Pending::Payload(n) => {
                    let k = n.min(scratch.len() as u64) as usize;
                    read_exact(&mut self.stream, &mut scratch[..k], deadline).map_err(
                        |(fail, got)| {
                            self.pending = Pending::Payload(n - got as u64);
                            fail
                        },
                    )?;
                    self.pending = if n == k as u64 {
                        Pending::None
                    } else {
                        Pending::Payload(n - k as u64)
                    };
                }
            }
        }
    }

    /// The body of a statement frame whose header was just read.
    pub fn read_statement(
        &mut self,
        header: &Header,
        deadline: Instant,
    ) -> Result<Statement, IoFail> {
        if header.len != STATEMENT_LEN as u64 {
            return Err(IoFail::Io(io::Error::other(format!(
                "a statement frame of {} bytes",
                header.len
            ))));
        }
        let mut body = [0u8; STATEMENT_LEN];
        self.read_payload(&mut body, deadline)?;
        Statement::parse(header, &body)
            .ok_or_else(|| IoFail::Io(io::Error::other("a malformed statement frame")))
    }

    /// Skip data frames until a statement arrives or `deadline` passes.
    pub fn next_statement(&mut self, deadline: Instant) -> Option<Statement> {
        loop {
            self.skip_payload(deadline).ok()?;
            let header = self.read_header(deadline).ok()?;
            if header.op == OP_STATEMENT {
                return self.read_statement(&header, deadline).ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            group: 0xdead_beef_0123_4567,
            op: 3,
            detail: 7,
            seq: u64::MAX - 1,
            len: 1 << 40,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn statement_round_trips() {
        for kind in [
            StatementKind::Blocked,
            StatementKind::Lost,
            StatementKind::Mismatch,
        ] {
            let st = Statement {
                kind,
                target: 4097,
                op: 2,
                seq: 99,
            };
            let (header, body) = st.frame();
            let header = Header::decode(&header.encode());
            assert_eq!(header.op, OP_STATEMENT);
            assert_eq!(Statement::parse(&header, &body), Some(st));
        }
    }
}
