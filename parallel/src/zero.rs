//! ZeRO-1's two collectives over one group, on flat f32 tensors: the gradients'
//! reduce-scatter (each rank gets the sums of the parameters it owns) and the parameters'
//! all-gather (every rank gets every owner's new values).
//!
//! Each rank owns a contiguous run of the group's parameters in path order
//! ([`crate::dp::partition`], balanced by elements). A bucket cut in path order would hold
//! mostly one owner's parameters, and the uneven collectives pad every chunk to the
//! largest: up to `n` times the traffic. Instead each owner's run, flattened, is cut into
//! windows of `limit / n` elements, and bucket `j` is every owner's `j`-th window in rank
//! order: the chunks of a bucket are (nearly) equal, as an even ring wants, and a bucket
//! holds at most `limit` elements.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Slice, TensorMetadata};

use crate::comm::{Communicator, ReduceOp};
use crate::device::{self, DeviceBackend};
use crate::error::{Error, Result};

/// The windows of a group's runs: parameter `i` has `sizes[i]` elements and is owned by
/// `owners[i]` (non-decreasing).
#[derive(Clone, Debug)]
pub struct Windows {
    /// Per rank, its run: parameters `[first, end)`.
    runs: Vec<(usize, usize)>,
    /// Elements of each rank's run.
    lens: Vec<usize>,
    /// Parameters' element offsets within their owner's run.
    offsets: Vec<usize>,
    width: usize,
    buckets: usize,
}

impl Windows {
    pub fn new(sizes: &[usize], owners: &[usize], ranks: usize, limit: usize) -> Result<Self> {
        if sizes.len() != owners.len() || owners.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::InvalidArgument(format!(
                "ZeRO-1 windows: owners {owners:?} must be one per parameter and non-decreasing"
            )));
        }
        if let Some(&o) = owners.iter().find(|&&o| o >= ranks) {
            return Err(Error::InvalidArgument(format!(
                "ZeRO-1 windows: owner {o} in a group of {ranks}"
            )));
        }
        let mut runs = vec![(0, 0); ranks];
        let mut lens = vec![0; ranks];
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut first = 0;
        for (r, run) in runs.iter_mut().enumerate() {
            let end = first + owners[first..].iter().take_while(|&&o| o == r).count();
            *run = (first, end);
            for &s in &sizes[first..end] {
                offsets.push(lens[r]);
                lens[r] += s;
            }
            first = end;
        }
        let width = (limit / ranks.max(1)).max(1);
        let buckets = lens.iter().map(|l| l.div_ceil(width)).max().unwrap_or(0);
        Ok(Self {
            runs,
            lens,
            offsets,
            width,
            buckets,
        })
    }

    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Rank `r`'s window in bucket `j`: elements `[a, b)` of its run.
    pub fn window(&self, r: usize, j: usize) -> (usize, usize) {
        let a = (j * self.width).min(self.lens[r]);
        (a, (a + self.width).min(self.lens[r]))
    }

    /// Each rank's chunk of bucket `j`.
    pub fn counts(&self, j: usize) -> Vec<usize> {
        (0..self.runs.len())
            .map(|r| {
                let (a, b) = self.window(r, j);
                b - a
            })
            .collect()
    }

    /// Rank `r`'s run: parameters `[first, end)`.
    pub fn run(&self, r: usize) -> (usize, usize) {
        self.runs[r]
    }

    /// The pieces of parameters covering elements `[a, b)` of rank `r`'s run:
    /// `(parameter, start, end)` within the parameter.
    fn pieces(&self, sizes: &[usize], r: usize, a: usize, b: usize) -> Vec<(usize, usize, usize)> {
        let (first, end) = self.runs[r];
        (first..end)
            .filter_map(|i| {
                let (lo, hi) = (self.offsets[i], self.offsets[i] + sizes[i]);
                let (s, e) = (a.max(lo), b.min(hi));
                (s < e).then(|| (i, s - lo, e - lo))
            })
            .collect()
    }
}

fn slice1<B: DeviceBackend>(x: FloatTensor<B>, a: usize, b: usize) -> FloatTensor<B> {
    B::float_slice(x, &[Slice::new(a as isize, Some(b as isize), 1)])
}

fn cat<B: DeviceBackend>(mut parts: Vec<FloatTensor<B>>, device: &B::Device) -> FloatTensor<B> {
    match parts.len() {
        0 => B::float_zeros([0].into(), device, FloatDType::F32),
        1 => parts.remove(0),
        _ => B::float_cat(parts, 0),
    }
}

fn len<B: DeviceBackend>(x: &FloatTensor<B>) -> usize {
    x.shape().num_elements()
}

/// The reduce-scatter: `grads[i]` is this rank's gradient of parameter `i` (flat f32,
/// `None` counts as zeros); returns the group's sums of this rank's parameters, in order
/// (`Windows::run(rank)`).
pub fn reduce_scatter<B: DeviceBackend>(
    comm: &dyn Communicator,
    windows: &Windows,
    sizes: &[usize],
    grads: &[Option<FloatTensor<B>>],
    device: &B::Device,
) -> Result<Vec<FloatTensor<B>>> {
    let me = comm.rank();
    let mut mine = Vec::with_capacity(windows.buckets());
    for j in 0..windows.buckets() {
        let mut parts = Vec::new();
        for r in 0..comm.size() {
            let (a, b) = windows.window(r, j);
            for (i, s, e) in windows.pieces(sizes, r, a, b) {
                parts.push(match &grads[i] {
                    Some(g) => slice1::<B>(g.clone(), s, e),
                    None => B::float_zeros([e - s].into(), device, FloatDType::F32),
                });
            }
        }
        let input = cat::<B>(parts, device);
        mine.push(device::reduce_scatter_v::<B>(
            comm,
            input,
            &windows.counts(j),
            ReduceOp::Sum,
        )?);
    }
    mine.retain(|m| len::<B>(m) > 0);
    let run = cat::<B>(mine, device);
    let (first, end) = windows.run(me);
    let mut at = 0;
    Ok((first..end)
        .map(|i| {
            let g = slice1::<B>(run.clone(), at, at + sizes[i]);
            at += sizes[i];
            g
        })
        .collect())
}

/// The all-gather: `mine` holds this rank's parameters' values (flat f32, in order);
/// `done` gets, after each bucket, the `(parameter, value)` pairs of the group's
/// parameters that bucket completed, so that no second copy of the whole model is ever
/// held. Every parameter is handed over exactly once, provided some run has an element.
pub fn all_gather<B: DeviceBackend>(
    comm: &dyn Communicator,
    windows: &Windows,
    sizes: &[usize],
    mine: Vec<FloatTensor<B>>,
    device: &B::Device,
    mut done: impl FnMut(Vec<(usize, FloatTensor<B>)>),
) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    let run = cat::<B>(mine, device);
    if len::<B>(&run) != windows.lens[me] {
        return Err(Error::InvalidArgument(format!(
            "ZeRO-1 all-gather: rank {me} gives {} elements for a run of {}",
            len::<B>(&run),
            windows.lens[me]
        )));
    }
    // Per rank: what has arrived of its next parameters, and the next parameter.
    let mut pending: Vec<(Vec<FloatTensor<B>>, usize)> = vec![(Vec::new(), 0); n];
    let mut next: Vec<usize> = (0..n).map(|r| windows.run(r).0).collect();
    for j in 0..windows.buckets() {
        let (a, b) = windows.window(me, j);
        let counts = windows.counts(j);
        let all = device::all_gather_v::<B>(comm, slice1::<B>(run.clone(), a, b), &counts)?;
        let mut complete = Vec::new();
        let mut at = 0;
        for r in 0..n {
            if counts[r] > 0 {
                pending[r]
                    .0
                    .push(slice1::<B>(all.clone(), at, at + counts[r]));
                pending[r].1 += counts[r];
            }
            at += counts[r];
            let end = windows.run(r).1;
            while next[r] < end && pending[r].1 >= sizes[next[r]] {
                let joined = cat::<B>(std::mem::take(&mut pending[r].0), device);
                let size = sizes[next[r]];
                complete.push((next[r], slice1::<B>(joined.clone(), 0, size)));
                let rest = pending[r].1 - size;
                if rest > 0 {
                    pending[r].0.push(slice1::<B>(joined, size, size + rest));
                }
                pending[r].1 = rest;
                next[r] += 1;
            }
        }
        if !complete.is_empty() {
            done(complete);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_each_run_in_nearly_equal_chunks() {
        let sizes = [5, 40, 3, 3, 17, 1, 30, 2];
        let owners = [0, 0, 1, 1, 1, 2, 2, 2];
        let w = Windows::new(&sizes, &owners, 3, 12).unwrap();
        // Runs of 45, 23 and 33 elements in windows of 4.
        assert_eq!(w.buckets(), 12);
        for r in 0..3 {
            let covered: usize = (0..w.buckets()).map(|j| w.counts(j)[r]).sum();
            assert_eq!(covered, [45, 23, 33][r]);
            let mut pieces = Vec::new();
            for j in 0..w.buckets() {
                let (a, b) = w.window(r, j);
                pieces.extend(w.pieces(&sizes, r, a, b));
            }
            // Every element of every parameter of the run, once, in order.
            let (first, end) = w.run(r);
            let mut want = Vec::new();
            for i in first..end {
                want.extend((0..sizes[i]).map(|k| (i, k)));
            }
            let got: Vec<_> = pieces
                .iter()
                .flat_map(|&(i, s, e)| (s..e).map(move |k| (i, k)))
                .collect();
            assert_eq!(got, want, "rank {r}");
        }
        assert!((0..w.buckets()).all(|j| w.counts(j).iter().all(|&c| c <= 4)));
        assert!(Windows::new(&sizes, &[0, 1, 0, 1, 1, 2, 2, 2], 3, 12).is_err());
        // A rank owning nothing.
        let w = Windows::new(&[4, 4], &[0, 2], 3, 6).unwrap();
        assert_eq!(w.run(1), (1, 1));
        assert_eq!(w.counts(0), vec![2, 0, 2]);
    }
}
