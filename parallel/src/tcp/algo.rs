//! The collective algorithms, in group ranks, over a [`Call`]'s checked sends and receives.
//!
//! - small all-reduce: binomial-tree reduce to rank 0, then binomial-tree broadcast of the
//!   final value (so every rank ends bit-identical);
//! - large all-reduce: ring reduce-scatter then ring all-gather over `n` uneven chunks; each
//!   chunk's final value is computed by one rank and copied to the others;
//! - all-gather and reduce-scatter: ring; broadcast: binomial tree from the root;
//! - all-to-all: `n - 1` pairwise steps (send to `r + s`, receive from `r - s`);
//! - barrier: dissemination (`log2 n` rounds of empty messages).

use std::ops::Range;

use super::call::{Call, Fault};
use crate::comm::{finish_avg, reduce_into, DType, ReduceOp};

/// All-reduces of fewer bytes than this use the tree (latency bound), larger the ring
/// (bandwidth bound).
pub(super) const TREE_MAX_BYTES: usize = 64 * 1024;

pub(super) fn all_reduce(
    call: &Call,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<(), Fault> {
    let n = call.size();
    if buf.len() < TREE_MAX_BYTES || buf.len() / dtype.size() < n {
        tree_all_reduce(call, buf, dtype, op)
    } else {
        let bounds = chunk_bounds(buf.len() / dtype.size(), n, dtype.size());
        ring_reduce_scatter(call, buf, &bounds, dtype, op)?;
        if op == ReduceOp::Avg {
            finish_avg(&mut buf[bounds[call.rank()].clone()], dtype, n);
        }
        ring_all_gather(call, buf, &bounds)
    }
}

fn tree_all_reduce(call: &Call, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<(), Fault> {
    let (n, r) = (call.size(), call.rank());
    let mut scratch = Vec::new();
    let mut mask = 1;
    while mask < n {
        if r & mask != 0 {
            call.send(r - mask, buf)?;
            break;
        }
        if r + mask < n {
            scratch.resize(buf.len(), 0);
            call.recv_into(r + mask, &mut scratch)?;
            reduce_into(buf, &scratch, dtype, op);
        }
        mask <<= 1;
    }
    if r == 0 && op == ReduceOp::Avg {
        finish_avg(buf, dtype, n);
    }
    broadcast(call, buf, 0)
}

/// Binomial tree from `root`: a rank receives from its parent, then sends to its children
/// (largest subtree first).
pub(super) fn broadcast(call: &Call, buf: &mut [u8], root: usize) -> Result<(), Fault> {
    let n = call.size();
    let vr = (call.rank() + n - root) % n;
    let mut mask = 1;
    while mask < n {
        if vr & mask != 0 {
            call.recv_into((vr - mask + root) % n, buf)?;
            break;
        }
        mask <<= 1;
    }
    mask >>= 1;
    while mask > 0 {
        if vr + mask < n {
            call.send((vr + mask + root) % n, buf)?;
        }
        mask >>= 1;
    }
    Ok(())
}

/// Byte ranges of `n` chunks of `elems` elements of `size` bytes, as even as possible.
pub(super) fn chunk_bounds(elems: usize, n: usize, size: usize) -> Vec<Range<usize>> {
    (0..n)
        .map(|i| (i * elems / n) * size..((i + 1) * elems / n) * size)
        .collect()
}

/// Ring reduce-scatter in place: afterwards chunk `r` of rank `r` holds the reduction of
/// every rank's chunk `r` (other chunks hold partial sums).
fn ring_reduce_scatter(
    call: &Call,
    buf: &mut [u8],
    bounds: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
) -> Result<(), Fault> {
    let (n, r) = (call.size(), call.rank());
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let mut scratch = vec![0u8; bounds.iter().map(|b| b.len()).max().unwrap_or(0)];
    for s in 0..n.saturating_sub(1) {
        let send = bounds[(r + 2 * n - 1 - s) % n].clone();
        let recv = bounds[(r + 2 * n - 2 - s) % n].clone();
        let got = &mut scratch[..recv.len()];
        call.exchange(right, &buf[send], left, got)?;
        reduce_into(&mut buf[recv], got, dtype, op);
    }
    Ok(())
}

/// Ring all-gather in place: rank `r` contributes chunk `r`.
fn ring_all_gather(call: &Call, buf: &mut [u8], bounds: &[Range<usize>]) -> Result<(), Fault> {
    let (n, r) = (call.size(), call.rank());
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    for s in 0..n.saturating_sub(1) {
        let send = bounds[(r + n - s) % n].clone();
        let recv = bounds[(r + 2 * n - 1 - s) % n].clone();
        let (out, into) = disjoint(buf, send, recv);
        call.exchange(right, out, left, into)?;
    }
    Ok(())
}

/// `(&buf[a], &mut buf[b])` for ranges that do not overlap.
fn disjoint(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        let len = a.len();
        (&hi[..len], &mut lo[b])
    }
}

pub(super) fn all_gather(call: &Call, input: &[u8], output: &mut [u8]) -> Result<(), Fault> {
    let m = input.len();
    output[call.rank() * m..(call.rank() + 1) * m].copy_from_slice(input);
    let bounds: Vec<_> = (0..call.size()).map(|i| i * m..(i + 1) * m).collect();
    ring_all_gather(call, output, &bounds)
}

pub(super) fn reduce_scatter(
    call: &Call,
    input: &[u8],
    output: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<(), Fault> {
    let (n, m) = (call.size(), output.len());
    let bounds: Vec<_> = (0..n).map(|i| i * m..(i + 1) * m).collect();
    let mut work = input.to_vec();
    ring_reduce_scatter(call, &mut work, &bounds, dtype, op)?;
    output.copy_from_slice(&work[bounds[call.rank()].clone()]);
    if op == ReduceOp::Avg {
        finish_avg(output, dtype, n);
    }
    Ok(())
}

pub(super) fn all_to_all(call: &Call, send: &[&[u8]]) -> Result<Vec<Vec<u8>>, Fault> {
    let (n, r) = (call.size(), call.rank());
    let mut out = vec![Vec::new(); n];
    out[r] = send[r].to_vec();
    for s in 1..n {
        let (to, from) = ((r + s) % n, (r + n - s) % n);
        out[from] = call.exchange_vec(to, send[to], from)?;
    }
    Ok(out)
}

pub(super) fn barrier(call: &Call) -> Result<(), Fault> {
    let (n, r) = (call.size(), call.rank());
    let mut dist = 1;
    while dist < n {
        call.exchange((r + dist) % n, &[], (r + n - dist) % n, &mut [])?;
        dist <<= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_evenly() {
        for elems in [0, 1, 2, 5, 7, 16, 1001] {
            for n in 1..=7 {
                let b = chunk_bounds(elems, n, 4);
                assert_eq!(b.len(), n);
                assert_eq!(b[0].start, 0);
                assert_eq!(b[n - 1].end, elems * 4);
                for w in b.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = b.iter().map(|r| r.len() / 4).collect();
                let (lo, hi) = (lens.iter().min().copied(), lens.iter().max().copied());
                assert!(
                    hi.unwrap_or(0) - lo.unwrap_or(0) <= 1,
                    "{elems} over {n}: {lens:?}"
                );
            }
        }
    }

    #[test]
    fn disjoint_handles_empty_and_either_order() {
        let mut buf: Vec<u8> = (0..10).collect();
        let (a, b) = disjoint(&mut buf, 5..5, 5..9);
        assert!(a.is_empty());
        assert_eq!(b, &[5, 6, 7, 8]);
        let (a, b) = disjoint(&mut buf, 5..9, 5..5);
        assert_eq!(a, &[5, 6, 7, 8]);
        assert!(b.is_empty());
        let (a, b) = disjoint(&mut buf, 6..8, 1..3);
        assert_eq!(a, &[6, 7]);
        b.copy_from_slice(&[9, 9]);
        assert_eq!(&buf[..4], &[0, 9, 9, 3]);
    }
}
