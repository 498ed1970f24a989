//! Differentiable collectives: Megatron's conjugate pair `f` ([`copy_to`]: identity forward,
//! all-reduce of the gradient backward) and `g` ([`reduce_from`]: all-reduce forward,
//! identity backward), as burn autodiff operations with a custom backward.
//!
//! A collective that fails inside a backward pass cannot return an error through burn's
//! autodiff, so the [`Group`] records the first failure, stops communicating (its peers
//! will time out rather than hang) and [`Group::check`] reports it after the pass.

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorMetadata, TensorPrimitive};
use parallel::device::{self, DeviceBackend};
use parallel::{Collectives, Communicator, ReduceOp};

/// A communicator the model's differentiable collectives run over (one tensor- or
/// expert-parallel group), with the first failure kept for [`Group::check`].
#[derive(Clone)]
pub struct Group {
    comm: Arc<dyn Communicator>,
    failure: Arc<Mutex<Option<parallel::Error>>>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Group(rank {} of {})",
            self.comm.rank(),
            self.comm.size()
        )
    }
}

impl Group {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            failure: Arc::new(Mutex::new(None)),
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The first collective failure since the last check, if any.
    pub fn check(&self) -> parallel::Result<()> {
        match self.failure.lock().map(|mut f| f.take()) {
            Ok(Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn failed(&self) -> bool {
        self.failure.lock().map_or(true, |f| f.is_some())
    }

    fn fail(&self, e: parallel::Error) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
    }

    /// `collective(x)`, or zeros of `shape` after a failure (this one recorded, or an
    /// earlier one: the group then stops communicating, so its peers time out rather than
    /// hang).
    fn guarded<B: DeviceBackend>(
        &self,
        x: FloatTensor<B>,
        shape: Shape,
        collective: impl FnOnce(&dyn Communicator, FloatTensor<B>) -> parallel::Result<FloatTensor<B>>,
    ) -> FloatTensor<B> {
        let (device, dtype) = (B::float_device(&x), x.dtype());
        let zeros = |shape| B::float_zeros(shape, &device, dtype.into());
        if self.failed() {
            return zeros(shape);
        }
        match collective(self.comm.as_ref(), x) {
            Ok(out) => out,
            Err(e) => {
                self.fail(e);
                zeros(shape)
            }
        }
    }

    /// Sum `x` over the group (not differentiable).
    pub fn all_reduce_primitive<B: DeviceBackend>(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        if self.comm.size() == 1 {
            return x;
        }
        let shape = x.shape();
        self.guarded::<B>(x, shape, |c, x| {
            device::all_reduce::<B>(c, x, ReduceOp::Sum)
        })
    }

    /// Rows of `x` exchanged over the group as `exchange` says (not differentiable). After a
    /// failure the result is zeros of the right shape.
    pub fn all_to_all_primitive<B: DeviceBackend>(
        &self,
        x: FloatTensor<B>,
        exchange: &Exchange,
    ) -> FloatTensor<B> {
        let width = x.shape().dims::<2>()[1];
        let rows: usize = exchange.recv.iter().sum();
        let out = self.guarded::<B>(x, [rows, width].into(), |c, x| {
            device::all_to_all_rows::<B>(c, x, &exchange.send, &exchange.recv)
        });
        if exchange.pad_out == 0 {
            return out;
        }
        let (device, dtype) = (B::float_device(&out), out.dtype());
        let pad = B::float_zeros([exchange.pad_out, width].into(), &device, dtype.into());
        B::float_cat(vec![out, pad], 0)
    }

    /// Every rank's rows of `x` (`rows[r]` on rank r), concatenated in rank order, on every
    /// rank (not differentiable): sequence parallelism's all-gather.
    pub fn gather_rows_primitive<B: DeviceBackend>(
        &self,
        x: FloatTensor<B>,
        rows: &[usize],
    ) -> FloatTensor<B> {
        let width = x.shape().dims::<2>()[1];
        let total: usize = rows.iter().sum();
        let counts: Vec<usize> = rows.iter().map(|r| r * width).collect();
        let n = x.shape().num_elements();
        let flat = B::float_reshape(x, [n].into());
        let out = self.guarded::<B>(flat, [total * width].into(), |c, x| {
            device::all_gather_v::<B>(c, x, &counts)
        });
        B::float_reshape(out, [total, width].into())
    }

    /// This rank's rows (`rows[rank]` of them, at its offset) of the sum of `x` over the
    /// group (not differentiable): sequence parallelism's reduce-scatter.
    pub fn scatter_rows_primitive<B: DeviceBackend>(
        &self,
        x: FloatTensor<B>,
        rows: &[usize],
    ) -> FloatTensor<B> {
        let width = x.shape().dims::<2>()[1];
        let mine = rows.get(self.rank()).copied().unwrap_or(0);
        let counts: Vec<usize> = rows.iter().map(|r| r * width).collect();
        let n = x.shape().num_elements();
        let flat = B::float_reshape(x, [n].into());
        let out = self.guarded::<B>(flat, [mine * width].into(), |c, x| {
            device::reduce_scatter_v::<B>(c, x, &counts, ReduceOp::Sum)
        });
        B::float_reshape(out, [mine, width].into())
    }

    /// Uneven all-to-all of `i64` metadata (not differentiable): `values` cut into `counts`
    /// (one per rank); what each rank sent here, concatenated in rank order, and how much
    /// came from each. After a failure, nothing.
    pub fn all_to_all_ids(&self, values: &[i64], counts: &[usize]) -> (Vec<i64>, Vec<usize>) {
        if self.failed() {
            return (Vec::new(), vec![0; self.size()]);
        }
        match self.comm.all_to_all(values, counts) {
            Ok(v) => v,
            Err(e) => {
                self.fail(e);
                (Vec::new(), vec![0; self.size()])
            }
        }
    }

    /// Element-wise maximum of `x` over the group (not differentiable).
    pub fn all_max<B: DeviceBackend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = x.into_primitive().tensor();
        let out = if self.comm.size() == 1 {
            x
        } else {
            let shape = x.shape();
            self.guarded::<B>(x, shape, |c, x| {
                device::all_reduce::<B>(c, x, ReduceOp::Max)
            })
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

/// Row counts of an uneven all-to-all over a group: `send[j]` rows of the input go to rank
/// `j`, `recv[j]` rows of the output come from rank `j`. The input's last `pad_in` rows are
/// not sent and the output ends in `pad_out` rows of zeros, so that a rank receiving
/// nothing still holds a non-empty tensor (see [`crate::model::decoder::Moe`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    pub send: Vec<usize>,
    pub recv: Vec<usize>,
    pub pad_in: usize,
    pub pad_out: usize,
}

impl Exchange {
    /// The exchange that brings the rows back: the gradient's way, or the combine after a
    /// dispatch.
    pub fn reversed(&self) -> Self {
        Self {
            send: self.recv.clone(),
            recv: self.send.clone(),
            pad_in: self.pad_out,
            pad_out: self.pad_in,
        }
    }
}

/// Backends the model's tensor-parallel collectives run on.
pub trait ParallelBackend: DeviceBackend {
    /// Identity forward; the gradient is summed over `group` backward (Megatron's `f`).
    fn copy_to(x: FloatTensor<Self>, group: &Group) -> FloatTensor<Self>;
    /// Sum over `group` forward; identity backward (Megatron's `g`).
    fn reduce_from(x: FloatTensor<Self>, group: &Group) -> FloatTensor<Self>;
    /// Rows of `x: [Σ send + pad_in, w]` exchanged over `group` into
    /// `[Σ recv + pad_out, w]`; backward, the gradient goes back by the reversed exchange.
    fn all_to_all(x: FloatTensor<Self>, exchange: &Exchange, group: &Group) -> FloatTensor<Self>;
    /// Sequence parallelism's all-gather of row chunks (`rows[r]` on rank r) along dim 0;
    /// backward, the reduce-scatter.
    fn gather_rows(x: FloatTensor<Self>, rows: &[usize], group: &Group) -> FloatTensor<Self>;
    /// Sequence parallelism's reduce-scatter along dim 0 into chunks of `rows`; backward,
    /// the all-gather.
    fn scatter_rows(x: FloatTensor<Self>, rows: &[usize], group: &Group) -> FloatTensor<Self>;
    /// Bytes of device memory the backend's allocator holds now: its high-water mark, as
    /// its pools are not given back (PyTorch's `max_memory_reserved`). On the CPU, the
    /// process's peak resident memory.
    fn memory_reserved(device: &Self::Device) -> Option<u64> {
        let _ = device;
        crate::backend::peak_rss()
    }

    /// Whether tables shared by the heads (RoPE, the mask) should be copied per head rather
    /// than broadcast: on burn's CPU backend broadcasting and strided slicing are the slow
    /// path (see [`crate::model::rope::Tables`]).
    fn dense_tables() -> bool {
        false
    }
}

/// A training backend whose inner (evaluation) backend runs the same collectives.
pub trait TrainBackend: AutodiffBackend<InnerBackend: ParallelBackend> + ParallelBackend {}

impl<B> TrainBackend for B where B: AutodiffBackend<InnerBackend: ParallelBackend> + ParallelBackend {}

/// Megatron's `f` on a tensor: the input of a column-parallel region.
pub fn copy_to<B: ParallelBackend, const D: usize>(x: Tensor<B, D>, group: &Group) -> Tensor<B, D> {
    let out = B::copy_to(x.into_primitive().tensor(), group);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// [`ParallelBackend::all_to_all`] on a tensor: expert parallelism's dispatch and combine.
pub fn all_to_all<B: ParallelBackend>(
    x: Tensor<B, 2>,
    exchange: &Exchange,
    group: &Group,
) -> Tensor<B, 2> {
    let out = B::all_to_all(x.into_primitive().tensor(), exchange, group);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Megatron's `g` on a tensor: the output of a row-parallel region.
pub fn reduce_from<B: ParallelBackend, const D: usize>(
    x: Tensor<B, D>,
    group: &Group,
) -> Tensor<B, D> {
    let out = B::reduce_from(x.into_primitive().tensor(), group);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

macro_rules! plain_collective {
    (
        $(@[$($generics:tt)*])? $backend:ty,
        dense_tables = $dense:expr $(, $memory:path)?
    ) => {
        impl$(<$($generics)*>)? ParallelBackend for $backend {
            fn dense_tables() -> bool {
                $dense
            }
            $(fn memory_reserved(device: &Self::Device) -> Option<u64> {
                $memory(device)
            })?
            fn copy_to(x: FloatTensor<Self>, _group: &Group) -> FloatTensor<Self> {
                x
            }
            fn reduce_from(x: FloatTensor<Self>, group: &Group) -> FloatTensor<Self> {
                group.all_reduce_primitive::<Self>(x)
            }
            fn all_to_all(
                x: FloatTensor<Self>,
                exchange: &Exchange,
                group: &Group,
            ) -> FloatTensor<Self> {
                group.all_to_all_primitive::<Self>(x, exchange)
            }
            fn gather_rows(
                x: FloatTensor<Self>,
                rows: &[usize],
                group: &Group,
            ) -> FloatTensor<Self> {
                group.gather_rows_primitive::<Self>(x, rows)
            }
            fn scatter_rows(
                x: FloatTensor<Self>,
                rows: &[usize],
                group: &Group,
            ) -> FloatTensor<Self> {
                group.scatter_rows_primitive::<Self>(x, rows)
            }
        }
    };
}

plain_collective!(burn::backend::Flex, dense_tables = true);
#[cfg(feature = "cuda")]
plain_collective!(
    burn::backend::Cuda,
    dense_tables = false,
    crate::backend::cuda_memory_reserved
);
// A developer's check of the cubecl kernels without a GPU (tests/it/cubecl.rs): the tables
// as on CUDA, so that the GPU-shaped inputs are what it runs.
#[cfg(feature = "wgpu")]
plain_collective!(burn::backend::Wgpu, dense_tables = false);
// burn's kernel fusion over either (`job.fusion`): its collectives are the inner backend's,
// through the fused tensors' device buffers (`parallel::device`).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
plain_collective!(
    @[B: ParallelBackend + burn_fusion::FusionBackend] burn_fusion::Fusion<B>,
    dense_tables = B::dense_tables(),
    B::memory_reserved
);

#[derive(Debug)]
struct CopyTo;

impl<B: ParallelBackend> Backward<B, 1> for CopyTo {
    type State = Group;

    fn backward(self, ops: Ops<Group, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let group = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| B::reduce_from(g, &group));
    }
}

#[derive(Debug)]
struct ReduceFrom;

impl<B: ParallelBackend> Backward<B, 1> for ReduceFrom {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        unary::<B, _>(ops.parents, ops.node, grads, |g| g);
    }
}

#[derive(Debug)]
struct AllToAll;

impl<B: ParallelBackend> Backward<B, 1> for AllToAll {
    type State = (Group, Exchange);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (group, exchange) = ops.state;
        let back = exchange.reversed();
        unary::<B, _>(ops.parents, ops.node, grads, |g| {
            B::all_to_all(g, &back, &group)
        });
    }
}

/// Sequence parallelism's all-gather (`gather: true`) or reduce-scatter of rows; each is
/// the other's backward.
#[derive(Debug)]
struct Rows {
    gather: bool,
}

impl<B: ParallelBackend> Backward<B, 1> for Rows {
    type State = (Group, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (group, rows) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| match self.gather {
            true => B::scatter_rows(g, &rows, &group),
            false => B::gather_rows(g, &rows, &group),
        });
    }
}

/// `compute` (a collective) applied to `x`, recorded for autodiff as `op` with `state`.
fn recorded<B: ParallelBackend, C: CheckpointStrategy, O: Backward<B, 1>>(
    op: O,
    state: O::State,
    x: FloatTensor<Autodiff<B, C>>,
    compute: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let prepared = op.prepare::<C>([x.node.clone()]).compute_bound().stateful();
    let out = compute(x.primitive);
    match prepared {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

impl<B: ParallelBackend, C: CheckpointStrategy> ParallelBackend for Autodiff<B, C> {
    fn memory_reserved(device: &Self::Device) -> Option<u64> {
        B::memory_reserved(device)
    }

    fn dense_tables() -> bool {
        B::dense_tables()
    }

    fn copy_to(x: FloatTensor<Self>, group: &Group) -> FloatTensor<Self> {
        recorded::<B, C, _>(CopyTo, group.clone(), x, |x| x)
    }

    fn reduce_from(x: FloatTensor<Self>, group: &Group) -> FloatTensor<Self> {
        let out = B::reduce_from(x.primitive, group);
        ReduceFrom
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateless(out)
    }

    fn all_to_all(x: FloatTensor<Self>, exchange: &Exchange, group: &Group) -> FloatTensor<Self> {
        recorded::<B, C, _>(AllToAll, (group.clone(), exchange.clone()), x, |x| {
            B::all_to_all(x, exchange, group)
        })
    }

    fn gather_rows(x: FloatTensor<Self>, rows: &[usize], group: &Group) -> FloatTensor<Self> {
        let state = (group.clone(), rows.to_vec());
        recorded::<B, C, _>(Rows { gather: true }, state, x, |x| {
            B::gather_rows(x, rows, group)
        })
    }

    fn scatter_rows(x: FloatTensor<Self>, rows: &[usize], group: &Group) -> FloatTensor<Self> {
        let state = (group.clone(), rows.to_vec());
        recorded::<B, C, _>(Rows { gather: false }, state, x, |x| {
            B::scatter_rows(x, rows, group)
        })
    }
}

/// The tensor-parallel group of a forward pass, as the model's layers see it: Megatron's
/// `f`/`g` at the edges of each tensor-parallel region, or, under sequence parallelism
/// (each rank holding `rows[rank]` consecutive rows of the tokens outside the regions), an
/// all-gather entering and a reduce-scatter leaving.
#[derive(Clone, Debug)]
pub struct TpRegion {
    pub group: Group,
    pub rows: Option<Vec<usize>>,
}

impl TpRegion {
    /// The input of a column-parallel region (all tokens, the same on every rank).
    pub fn enter<B: ParallelBackend>(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.rows {
            None => copy_to(x, &self.group),
            Some(rows) => {
                let out = B::gather_rows(x.into_primitive().tensor(), rows, &self.group);
                Tensor::from_primitive(TensorPrimitive::Float(out))
            }
        }
    }

    /// The output of a row-parallel region: the sum over the group (this rank's rows of it
    /// under sequence parallelism).
    pub fn leave<B: ParallelBackend>(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.rows {
            None => reduce_from(x, &self.group),
            Some(rows) => {
                let out = B::scatter_rows(x.into_primitive().tensor(), rows, &self.group);
                Tensor::from_primitive(TensorPrimitive::Float(out))
            }
        }
    }
}

/// `n` rows cut into `parts` consecutive chunks as evenly as possible.
pub fn split_rows(n: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|r| (r + 1) * n / parts - r * n / parts)
        .collect()
}

/// The input of a column-parallel region when tensor parallel (see [`TpRegion::enter`]).
pub fn enter<B: ParallelBackend>(x: Tensor<B, 2>, tp: Option<&TpRegion>) -> Tensor<B, 2> {
    match tp {
        Some(r) => r.enter(x),
        None => x,
    }
}

/// The output of a row-parallel region when tensor parallel (see [`TpRegion::leave`]).
pub fn leave<B: ParallelBackend>(x: Tensor<B, 2>, tp: Option<&TpRegion>) -> Tensor<B, 2> {
    match tp {
        Some(r) => r.leave(x),
        None => x,
    }
}
