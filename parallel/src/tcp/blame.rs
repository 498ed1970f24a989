//! Turning a failed collective into an error that names the process at fault.
//!
//! The rank that notices a failure is often not next to its cause: in a tree all-reduce
//! rank 1 waits on rank 0, which waits on the stopped rank 2. So a rank that gives up tells
//! the rest of its group why, in a statement frame: a broken connection or a mismatch is
//! final and forwarded as is; a timeout says whom the rank was blocked on. A rank whose
//! deadline passed sends its own `Blocked` statement, listens a short grace period for the
//! others', then follows the chain of waits to the first rank that said nothing (it is the
//! one not answering). A chain that comes back to a rank is a deadlock between ranks that
//! issued different collectives.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::call::{Call, Fault, FaultKind, Op};
use super::wire::{Statement, StatementKind};
use crate::error::Error;

/// How long a rank that timed out listens for the others' statements.
pub(super) fn grace(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Where a chain of waits ends.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// This rank said nothing: it is the one not answering.
    Silent(usize),
    /// `by` reported a final fault (lost connection, mismatch) with `st.target`.
    Reported { by: usize, st: Statement },
    /// The ranks visited, starting at the first waited on, ending with the one seen twice.
    Cycle(Vec<usize>),
}

/// Follow the waits from `start` (the rank `me` was blocked on) through the statements
/// received (by sender world rank).
pub(super) fn resolve_chain(
    me: usize,
    start: usize,
    statements: &HashMap<usize, Statement>,
) -> Verdict {
    let mut path = Vec::new();
    let mut cur = start;
    loop {
        let seen = cur == me || path.contains(&cur);
        path.push(cur);
        if seen {
            return Verdict::Cycle(path);
        }
        match statements.get(&cur) {
            None => return Verdict::Silent(cur),
            Some(st) if st.kind == StatementKind::Blocked => cur = st.target,
            Some(st) => return Verdict::Reported { by: cur, st: *st },
        }
    }
}

/// The error for `fault`, after telling the group (best effort) why this rank gives up.
pub(super) fn conclude(call: &Call, fault: Fault) -> Error {
    let me = call.world(call.rank());
    let Fault { peer, kind } = fault;
    let final_statement = |kind| Statement {
        kind,
        target: peer,
        op: call.op.code(),
        seq: call.seq,
    };
    match kind {
        FaultKind::Lost(source) => {
            tell(call, final_statement(StatementKind::Lost), Some(peer));
            Error::PeerLost {
                peer,
                rank: me,
                op: call.op.name(),
                seq: call.seq,
                source,
            }
        }
        FaultKind::Mismatch(message) => {
            tell(call, final_statement(StatementKind::Mismatch), None);
            Error::Mismatch {
                peer,
                rank: me,
                message,
            }
        }
        FaultKind::Told(st) if st.kind != StatementKind::Blocked => {
            tell(call, st, Some(peer));
            reported(call, peer, st)
        }
        FaultKind::Told(st) => timed_out(call, peer, Some(st)),
        FaultKind::Timeout => timed_out(call, peer, None),
    }
}

/// Send `st` to every other member of the group but `skip`, each with a short deadline.
fn tell(call: &Call, st: Statement, skip: Option<usize>) {
    let until = Instant::now() + grace(call.comm.shared.opts.timeout) / 2;
    let others = others(call).filter(|&w| Some(w) != skip);
    std::thread::scope(|s| {
        for w in others {
            s.spawn(move || send_statement(call, w, &st, until));
        }
    });
}

fn others<'a>(call: &'a Call) -> impl Iterator<Item = usize> + 'a {
    let me = call.world(call.rank());
    call.comm.members.iter().copied().filter(move |&w| w != me)
}

fn send_statement(call: &Call, w: usize, st: &Statement, until: Instant) {
    let mut half = call.comm.shared.peer(w).sender();
    if half.in_sync {
        let (header, body) = st.frame();
        // Best effort: a peer that does not read learns nothing, and is blamed anyway.
        let _ = half.send(&header, &body, until, &AtomicBool::new(false));
    }
}

/// This rank waited on `peer` in vain (or `peer` said it waits on someone): exchange
/// statements with the group and follow the chain.
fn timed_out(call: &Call, peer: usize, told: Option<Statement>) -> Error {
    let me = call.world(call.rank());
    let grace = grace(call.comm.shared.opts.timeout);
    let waited_full = Instant::now() + grace >= call.deadline;
    let mine = Statement {
        kind: StatementKind::Blocked,
        target: peer,
        op: call.op.code(),
        seq: call.seq,
    };
    let (said_until, listen_until) = (Instant::now() + grace / 2, Instant::now() + grace);
    let mut statements: HashMap<usize, Statement> = told.map(|st| (peer, st)).into_iter().collect();
    let known: Vec<usize> = statements.keys().copied().collect();
    let heard: Vec<(usize, Option<Statement>)> = std::thread::scope(|s| {
        let handles: Vec<_> = others(call)
            .map(|w| {
                let known = &known;
                s.spawn(move || {
                    send_statement(call, w, &mine, said_until);
                    if known.contains(&w) {
                        return (w, None);
                    }
                    (
                        w,
                        call.comm
                            .shared
                            .peer(w)
                            .receiver()
                            .next_statement(listen_until),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    statements.extend(heard.into_iter().filter_map(|(w, st)| Some((w, st?))));

    let timeout = |culprit| Error::Timeout {
        peer: culprit,
        rank: me,
        op: call.op.name(),
        seq: call.seq,
        after: call.comm.shared.opts.timeout,
    };
    match resolve_chain(me, peer, &statements) {
        Verdict::Silent(culprit) => timeout(culprit),
        Verdict::Reported { by, st } => reported(call, by, st),
        // The others gave up on this rank before it had waited its own deadline: it came late.
        Verdict::Cycle(path) if !waited_full && path.last() == Some(&me) => timeout(me),
        Verdict::Cycle(path) => {
            let mut waits = vec![format!(
                "rank {me} waits on rank {peer} in {} #{}",
                call.op.name(),
                call.seq
            )];
            for w in &path[..path.len() - 1] {
                if let Some(st) = statements.get(w) {
                    waits.push(format!(
                        "rank {w} waits on rank {} in {} #{}",
                        st.target,
                        Op::name_of(st.op),
                        st.seq
                    ));
                }
            }
            let message = format!(
                "the ranks issued different collectives and wait on each other: {}",
                waits.join(", ")
            );
            Error::Mismatch {
                peer,
                rank: me,
                message,
            }
        }
    }
}

/// The error for a final statement `st` made by rank `by`.
fn reported(call: &Call, by: usize, st: Statement) -> Error {
    let me = call.world(call.rank());
    let during = format!("{} #{}", Op::name_of(st.op), st.seq);
    match st.kind {
        StatementKind::Mismatch => Error::Mismatch {
            peer: st.target,
            rank: me,
            message: format!(
                "rank {by} received a frame of another collective from it during {during}"
            ),
        },
        StatementKind::Lost | StatementKind::Blocked => Error::PeerLost {
            peer: st.target,
            rank: me,
            op: call.op.name(),
            seq: call.seq,
            source: io::Error::other(format!(
                "rank {by} lost its connection to rank {} during {during}",
                st.target
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(target: usize) -> Statement {
        Statement {
            kind: StatementKind::Blocked,
            target,
            op: 1,
            seq: 7,
        }
    }

    #[test]
    fn the_chain_ends_at_the_silent_rank() {
        // Rank 1 waits on 0, which waits on 2, which said nothing.
        let st = HashMap::from([(0, blocked(2))]);
        assert_eq!(resolve_chain(1, 0, &st), Verdict::Silent(2));
        assert_eq!(resolve_chain(1, 3, &st), Verdict::Silent(3));
    }

    #[test]
    fn a_final_report_ends_the_chain() {
        let lost = Statement {
            kind: StatementKind::Lost,
            target: 4,
            op: 1,
            seq: 7,
        };
        let st = HashMap::from([(0, blocked(2)), (2, lost)]);
        assert_eq!(
            resolve_chain(1, 0, &st),
            Verdict::Reported { by: 2, st: lost }
        );
    }

    #[test]
    fn waits_that_loop_are_a_cycle() {
        // 0 and 1 wait on each other: seen from 0.
        assert_eq!(
            resolve_chain(0, 1, &HashMap::from([(1, blocked(0))])),
            Verdict::Cycle(vec![1, 0])
        );
        // 2 waits on 3 and 3 on 2; rank 0 waits on 2.
        let st = HashMap::from([(2, blocked(3)), (3, blocked(2))]);
        assert_eq!(resolve_chain(0, 2, &st), Verdict::Cycle(vec![2, 3, 2]));
    }

    #[test]
    fn grace_scales_with_the_timeout_within_bounds() {
        assert_eq!(
            grace(Duration::from_millis(300)),
            Duration::from_millis(100)
        );
        assert_eq!(grace(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(grace(Duration::from_secs(300)), Duration::from_secs(5));
    }
}
