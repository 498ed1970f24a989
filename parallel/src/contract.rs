//! The contract every communicator keeps, as one suite each implementation runs: the TCP
//! group in the test suite (1 to 4 ranks, threads on loopback), NCCL where a GPU is at
//! hand (`launch comm-check --device cuda`, one process per GPU under `launch run`).
//!
//! Every rank calls [`check`] at the same time with its own member of the group; inputs
//! are derived from `(case, rank, index)` so that each rank computes every reference
//! itself. Values are small multiples of 1/4, so sums are exact in f32 and bf16 whatever
//! order a collective adds them in; averages are compared to rounding.
//! Tensor collectives go through [`crate::device`] with backend `B` (the device path on a
//! group with device collectives), host buffers through [`Collectives`].

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use crate::comm::{Collectives, Communicator, ReduceOp};
use crate::device::{self, DeviceBackend, Expect};
use crate::zero;

/// What failed, or how many cases passed.
pub type Outcome = std::result::Result<usize, String>;

/// Run every case on this rank's member of the group (all members at once). A case whose
/// values are wrong on one rank does not stop that rank early (its peers would wait in the
/// next collective): every case runs, then the ranks agree whether any failed.
pub fn check<B: DeviceBackend>(comm: &dyn Communicator, device: &B::Device) -> Outcome {
    let mut cases = 0;
    let mut first: Option<String> = None;
    let mut run = |name: &str, r: std::result::Result<(), String>| {
        cases += 1;
        if let Err(e) = r {
            first.get_or_insert_with(|| {
                format!("{name} (rank {} of {}): {e}", comm.rank(), comm.size())
            });
        }
    };
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        for len in [1, 7, 1000, 65_537] {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                run(
                    &format!("all_reduce {op:?} of {len} {dtype:?}"),
                    all_reduce::<B>(comm, device, len, dtype, op),
                );
            }
        }
        run(
            &format!("all_gather_v {dtype:?}"),
            all_gather_v::<B>(comm, device, dtype),
        );
        run(
            &format!("reduce_scatter_v {dtype:?}"),
            reduce_scatter_v::<B>(comm, device, dtype),
        );
        run(
            &format!("all_to_all {dtype:?}"),
            all_to_all::<B>(comm, device, dtype),
        );
    }
    for root in 0..comm.size() {
        run(
            &format!("broadcast from {root}"),
            broadcast::<B>(comm, device, root),
        );
    }
    run("paired send/recv", send_recv::<B>(comm, device));
    run(
        "ZeRO-1 windowed reduce-scatter and all-gather",
        zero1::<B>(comm, device),
    );
    run("host all_reduce and all_to_all", host(comm));
    run("split", split::<B>(comm, device));
    let mut failed = [u8::from(first.is_some())];
    comm.all_reduce(&mut failed, ReduceOp::Max).map_err(err)?;
    match (first, failed[0]) {
        (Some(e), _) => Err(e),
        (None, 0) => Ok(cases),
        (None, _) => Err(format!(
            "another rank of the group failed a case (rank {} passed all {cases})",
            comm.rank()
        )),
    }
}

/// Rank `r`'s `i`-th input of case `case`: a multiple of 1/4 in [-4, 4].
fn value(case: u64, rank: usize, i: usize) -> f32 {
    let mut z = case
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((rank as u64) << 32)
        .wrapping_add(i as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % 33) as f32 / 4.0 - 4.0
}

fn inputs(case: u64, rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(case, rank, i)).collect()
}

fn tensor<B: Backend>(
    values: Vec<f32>,
    shape: impl Into<Shape>,
    dtype: FloatDType,
    device: &B::Device,
) -> FloatTensor<B> {
    let data = TensorData::new(values, shape.into());
    B::float_from_data(data.convert_dtype(dtype.into()), device)
}

fn values<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    let shape = t.shape();
    let t: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(B::float_reshape(
        t,
        [shape.num_elements()].into(),
    )));
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

fn same(got: &[f32], want: &[f32], tol: f32) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} values where {} were expected",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(g, w)| (g - w).abs() > tol) {
        Some(i) => Err(format!(
            "value {i} is {} where {} was expected",
            got[i], want[i]
        )),
        None => Ok(()),
    }
}

/// How far a reduction of `n` ranks' inputs (multiples of 1/4 in [-4, 4]) may be from the
/// exact one: sums and maxima are exact in every dtype; an average may round `1/n` and each
/// of its `n` partial sums, each at most 4 (NCCL multiplies every input by `1/n` in the
/// element type, then adds them along the ring, rounding at each step): per rounding,
/// half a unit in the last place of numbers in [2, 4) — bf16's 1/128; f32's 2^-23,
/// allowed twice over.
fn tol(dtype: FloatDType, op: ReduceOp, n: usize) -> f32 {
    let per_rounding = match dtype {
        FloatDType::BF16 => 1.0 / 128.0,
        _ => 4.0 * f32::EPSILON / 2.0,
    };
    match op {
        ReduceOp::Sum | ReduceOp::Max => 0.0,
        ReduceOp::Avg => (n as f32 + 1.0) * per_rounding,
    }
}

fn err(e: crate::Error) -> String {
    e.to_string()
}

fn all_reduce<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
    len: usize,
    dtype: FloatDType,
    op: ReduceOp,
) -> std::result::Result<(), String> {
    let case = 1 + len as u64;
    let n = comm.size();
    let x = tensor::<B>(inputs(case, comm.rank(), len), [len], dtype, device);
    let got = values::<B>(device::all_reduce::<B>(comm, x, op).map_err(err)?);
    let want: Vec<f32> = (0..len)
        .map(|i| {
            let all = (0..n).map(|r| value(case, r, i));
            match op {
                ReduceOp::Sum => all.sum(),
                ReduceOp::Avg => all.sum::<f32>() / n as f32,
                ReduceOp::Max => all.fold(f32::MIN, f32::max),
            }
        })
        .collect();
    same(&got, &want, tol(dtype, op, n))
}

/// Uneven counts, one rank giving nothing where there are several.
fn counts(case: u64, n: usize, scale: usize) -> Vec<usize> {
    (0..n)
        .map(|r| {
            if n > 1 && r == 1 {
                0
            } else {
                scale * (1 + (case as usize + 3 * r) % 4) + r
            }
        })
        .collect()
}

fn all_gather_v<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
    dtype: FloatDType,
) -> std::result::Result<(), String> {
    let (case, n) = (101, comm.size());
    let counts = counts(case, n, 300);
    let mine = counts[comm.rank()];
    let x = tensor::<B>(inputs(case, comm.rank(), mine), [mine], dtype, device);
    let got = values::<B>(device::all_gather_v::<B>(comm, x, &counts).map_err(err)?);
    let want: Vec<f32> = (0..n).flat_map(|r| inputs(case, r, counts[r])).collect();
    same(&got, &want, 0.0)
}

fn reduce_scatter_v<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
    dtype: FloatDType,
) -> std::result::Result<(), String> {
    let (case, n, me) = (202, comm.size(), comm.rank());
    let counts = counts(case, n, 250);
    let total: usize = counts.iter().sum();
    let x = tensor::<B>(inputs(case, me, total), [total], dtype, device);
    let got =
        values::<B>(device::reduce_scatter_v::<B>(comm, x, &counts, ReduceOp::Sum).map_err(err)?);
    let at: usize = counts[..me].iter().sum();
    let want: Vec<f32> = (at..at + counts[me])
        .map(|i| (0..n).map(|r| value(case, r, i)).sum())
        .collect();
    same(&got, &want, 0.0)
}

/// Rows rank `from` sends rank `to` in the all-to-all case (zero for some pairs).
fn rows(from: usize, to: usize) -> usize {
    (from * 3 + to * 5) % 4
}

fn all_to_all<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
    dtype: FloatDType,
) -> std::result::Result<(), String> {
    let (case, n, me, width) = (303, comm.size(), comm.rank(), 5);
    let send: Vec<usize> = (0..n).map(|j| rows(me, j)).collect();
    let recv: Vec<usize> = (0..n).map(|j| rows(j, me)).collect();
    // Two rows more than are sent: they stay.
    let total = send.iter().sum::<usize>() + 2;
    let x = tensor::<B>(
        inputs(case, me, total * width),
        [total, width],
        dtype,
        device,
    );
    let got = values::<B>(device::all_to_all_rows::<B>(comm, x, &send, &recv).map_err(err)?);
    let mut want = Vec::new();
    for j in 0..n {
        let theirs = inputs(case, j, (0..n).map(|k| rows(j, k)).sum::<usize>() * width);
        let at: usize = (0..me).map(|k| rows(j, k)).sum::<usize>() * width;
        want.extend_from_slice(&theirs[at..at + rows(j, me) * width]);
    }
    same(&got, &want, 0.0)
}

fn broadcast<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
    root: usize,
) -> std::result::Result<(), String> {
    let case = 404 + root as u64;
    let x = tensor::<B>(
        inputs(case, comm.rank(), 4099),
        [4099],
        FloatDType::F32,
        device,
    );
    let got = values::<B>(device::broadcast::<B>(comm, x, root).map_err(err)?);
    same(&got, &inputs(case, root, 4099), 0.0)
}

/// Each rank sends to the next while receiving from the previous (a pipeline's
/// activations and gradients at once); a group of one has no peer.
fn send_recv<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
) -> std::result::Result<(), String> {
    let (case, n, me) = (505, comm.size(), comm.rank());
    if n == 1 {
        return Ok(());
    }
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let len = |r: usize| 1000 + 17 * r;
    let x = tensor::<B>(
        inputs(case, me, len(me)),
        [len(me)],
        FloatDType::F32,
        device,
    );
    let expect = Expect {
        shape: [len(prev)].into(),
        dtype: FloatDType::F32,
    };
    let got = device::send_recv::<B>(comm, Some((x, next)), Some((expect, prev)), device)
        .map_err(err)?
        .ok_or("nothing received")?;
    same(&values::<B>(got), &inputs(case, prev, len(prev)), 0.0)
}

/// ZeRO-1's collectives ([`zero`]) with buckets small enough that parameters span several
/// windows: runs of very different lengths, rank 0 (and with 3 ranks or more rank 1, between
/// owners) owning nothing, empty parameters, and rank 0 without a gradient for parameter 3
/// (an expert no token reached), which counts as zeros. Then each rank all-gathers the
/// expected sums of its own parameters as their new values (not what the reduce-scatter
/// gave it, so that a wrong reduce-scatter cannot make this rank skip the all-gather its
/// peers wait in).
fn zero1<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
) -> std::result::Result<(), String> {
    let (case, n, me) = (606, comm.size(), comm.rank());
    let sizes = [0, 7, 130, 3, 3, 0, 41, 1, 90, 2, 11];
    let owning: Vec<usize> = match n {
        1 => vec![0],
        2 => vec![1],
        _ => (2..n).collect(),
    };
    let owners: Vec<usize> = (0..sizes.len())
        .map(|i| owning[i * owning.len() / sizes.len()])
        .collect();
    let windows = zero::Windows::new(&sizes, &owners, n, 24).map_err(err)?;
    if windows.buckets() <= 3 {
        // The same on every rank: none has called a collective yet.
        return Err(format!("only {} buckets", windows.buckets()));
    }
    let id = |i: usize| case + 10 * i as u64;
    let grads: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            (me != 0 || i != 3)
                .then(|| tensor::<B>(inputs(id(i), me, len), [len], FloatDType::F32, device))
        })
        .collect();
    let want = |i: usize| -> Vec<f32> {
        (0..sizes[i])
            .map(|k| {
                (0..n)
                    .filter(|&r| r != 0 || i != 3)
                    .map(|r| value(id(i), r, k))
                    .sum()
            })
            .collect()
    };
    let sums = zero::reduce_scatter::<B>(comm, &windows, &sizes, &grads, device).map_err(err)?;
    // A wrong value is noted, not returned: the all-gather still runs, as on the peers.
    let (first, end) = windows.run(me);
    let mut wrong = None;
    if sums.len() != end - first {
        wrong = Some(format!(
            "reduce-scatter gave {} parameters for a run of {}",
            sums.len(),
            end - first
        ));
    }
    for (k, s) in sums.iter().enumerate() {
        if let Err(e) = same(&values::<B>(s.clone()), &want(first + k), 0.0) {
            wrong.get_or_insert(format!("reduce-scatter, parameter {}: {e}", first + k));
        }
    }
    let mine = (first..end)
        .map(|i| tensor::<B>(want(i), [sizes[i]], FloatDType::F32, device))
        .collect();
    let mut seen: Vec<Option<Vec<f32>>> = vec![None; sizes.len()];
    zero::all_gather::<B>(comm, &windows, &sizes, mine, device, |done| {
        for (i, v) in done {
            if seen[i].is_some() {
                wrong.get_or_insert(format!("all-gather delivered parameter {i} twice"));
            }
            seen[i] = Some(values::<B>(v));
        }
    })
    .map_err(err)?;
    if let Some(e) = wrong {
        return Err(e);
    }
    for (i, v) in seen.into_iter().enumerate() {
        let v = v.ok_or(format!("all-gather never delivered parameter {i}"))?;
        same(&v, &want(i), 0.0).map_err(|e| format!("all-gather, parameter {i}: {e}"))?;
    }
    Ok(())
}

/// Host buffers (counts, flags, scalars) on the same group.
fn host(comm: &dyn Communicator) -> std::result::Result<(), String> {
    let (n, me) = (comm.size(), comm.rank());
    let mut flags = vec![u8::from(me % 2 == 1); 3];
    comm.all_reduce(&mut flags, ReduceOp::Max).map_err(err)?;
    if flags != vec![u8::from(n > 1); 3] {
        return Err(format!("u8 max: {flags:?}"));
    }
    let mut sums = vec![me as f64, 1.0];
    comm.all_reduce(&mut sums, ReduceOp::Sum).map_err(err)?;
    if sums != vec![(n * (n - 1) / 2) as f64, n as f64] {
        return Err(format!("f64 sum: {sums:?}"));
    }
    let counts: Vec<usize> = (0..n).map(|j| rows(me, j)).collect();
    let ids: Vec<i64> = (0..counts.iter().sum::<usize>())
        .map(|i| (me * 1000 + i) as i64)
        .collect();
    let (got, from) = comm.all_to_all(&ids, &counts).map_err(err)?;
    let want_from: Vec<usize> = (0..n).map(|j| rows(j, me)).collect();
    if from != want_from {
        return Err(format!(
            "all_to_all counts {from:?}, expected {want_from:?}"
        ));
    }
    let mut want = Vec::new();
    for j in 0..n {
        let at: usize = (0..me).map(|k| rows(j, k)).sum();
        want.extend((at..at + rows(j, me)).map(|i| (j * 1000 + i) as i64));
    }
    if got != want {
        return Err(format!("all_to_all values {got:?}, expected {want:?}"));
    }
    Ok(())
}

/// The group split in two (even and odd ranks), each half running its own collective.
fn split<B: DeviceBackend>(
    comm: &dyn Communicator,
    device: &B::Device,
) -> std::result::Result<(), String> {
    let (n, me) = (comm.size(), comm.rank());
    let half: Vec<usize> = (0..n).filter(|r| r % 2 == me % 2).collect();
    let sub = comm.split(&half).map_err(err)?;
    if sub.size() != half.len() || half[sub.rank()] != me {
        return Err(format!(
            "rank {me} is rank {} of {} in the split {half:?}",
            sub.rank(),
            sub.size()
        ));
    }
    let x = tensor::<B>(vec![me as f32; 3], [3], FloatDType::F32, device);
    let got = values::<B>(device::all_reduce::<B>(sub.as_ref(), x, ReduceOp::Sum).map_err(err)?);
    let sum = half.iter().sum::<usize>() as f32;
    same(&got, &[sum; 3], 0.0)
}
