//! Data parallelism over a communicator: gradient all-reduce in buckets ordered by module
//! path, and ZeRO-1 (gradients reduce-scattered to the rank that owns each parameter, which
//! alone keeps its optimizer state and steps it; the new values are all-gathered after the
//! step, see [`crate::zero`]).
//!
//! Parameters are identified across ranks by their module path (`layers.0.attn.q_proj.weight`),
//! never by burn's `ParamId`, which is random per process.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{FloatDType, Slice, Tensor, TensorData, TensorPrimitive};

use crate::comm::{Collectives, Communicator, ReduceOp};
use crate::device::{self, DeviceBackend};
use crate::error::{Error, Result};
use crate::zero;

/// Elements per all-reduce bucket (25 MiB of f32, DDP's default).
pub const DEFAULT_BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// A float parameter as every rank sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Float parameters of `module`, sorted by module path.
pub fn params_by_path<B: Backend, M: burn::module::Module<B>>(module: &M) -> Vec<ParamInfo> {
    let mut v = PathVisitor {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    let mut out = v.out;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

struct PathVisitor {
    path: Vec<String>,
    out: Vec<ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for PathVisitor {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        self.out.push(ParamInfo {
            path: self.path.join("."),
            id: param.id,
            shape: tensor.dims().to_vec(),
            trainable: param.is_require_grad(),
        });
    }
}

/// Data-parallel training over one group of ranks.
pub struct DataParallel {
    comm: Arc<dyn Communicator>,
    zero1: bool,
    narrow: Option<Narrow>,
    /// Elements of f32 per gradient bucket (ZeRO-1: per bucket of all owners' windows).
    bucket_elems: usize,
}

/// Parameters replicated over a sub-group only (experts under expert parallelism: each is
/// held by the ranks of one ep index), with the sub-group their gradients sum over.
struct Narrow {
    comm: Arc<dyn Communicator>,
    applies: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl DataParallel {
    pub fn new(comm: Arc<dyn Communicator>, zero1: bool) -> Self {
        Self {
            comm,
            zero1,
            narrow: None,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
        }
    }

    /// Buckets of at most `elems` f32 elements (at least 1) instead of
    /// [`DEFAULT_BUCKET_ELEMS`]: PyTorch DDP's `bucket_cap_mb`, Megatron's
    /// `--ddp-bucket-size`. Larger buckets mean fewer collectives, smaller ones less memory
    /// held for them.
    pub fn with_bucket_elems(mut self, elems: usize) -> Self {
        self.bucket_elems = elems.max(1);
        self
    }

    /// Parameters whose module path satisfies `applies` are replicated only over `comm` (a
    /// sub-group of this one): their gradients sum, and under ZeRO-1 their optimizer state
    /// is shared out, over `comm` instead.
    pub fn with_narrow_group(
        mut self,
        comm: Arc<dyn Communicator>,
        applies: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.narrow = Some(Narrow {
            comm,
            applies: Box::new(applies),
        });
        self
    }

    /// The trainable parameters of `module` by the group they are replicated over: the
    /// whole group's first, then the narrow group's (the same order on every rank).
    fn groups<B: Backend, M: burn::module::Module<B>>(
        &self,
        module: &M,
    ) -> Vec<(&dyn Communicator, Vec<ParamInfo>)> {
        let trainable = params_by_path(module).into_iter().filter(|p| p.trainable);
        match &self.narrow {
            None => vec![(self.comm.as_ref(), trainable.collect())],
            Some(n) => {
                let (narrow, wide): (Vec<_>, Vec<_>) =
                    trainable.partition(|p| (n.applies)(&p.path));
                vec![(self.comm.as_ref(), wide), (n.comm.as_ref(), narrow)]
            }
        }
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    pub fn zero1(&self) -> bool {
        self.zero1
    }

    /// Sum every trainable parameter's gradient over the group it is replicated over, in
    /// buckets in module-path order. A parameter with no gradient on some rank (an expert
    /// no local token reached) counts as zeros there; it gets a gradient afterwards iff it
    /// had one on any rank, as a single process over the whole batch would.
    pub fn all_reduce_grads<B, M>(&self, module: &M, grads: &mut GradientsParams) -> Result<()>
    where
        B: AutodiffBackend<InnerBackend: DeviceBackend>,
        M: AutodiffModule<B>,
    {
        for (comm, params) in self.groups(module) {
            all_reduce_params::<B, M>(comm, module, &params, grads, self.bucket_elems)?;
        }
        Ok(())
    }

    /// Complete every trainable parameter's gradient over the group it is replicated over:
    /// all-reduced ([`Self::all_reduce_grads`]), or under ZeRO-1 reduce-scattered, each
    /// rank keeping only the summed gradients of the parameters it owns — the ones its
    /// optimizer steps. That is half an all-reduce's traffic when the owners' runs are
    /// even; a run made longer by one large tensor (an embedding bigger than the group's
    /// even share) sets every bucket's width, since ownership is by whole parameter, and
    /// the shorter runs' chunks are padded to it on NCCL. Returns the gradient elements the
    /// model's replica holds once reduced, what an all-reduce leaves on every rank (the
    /// parameters some rank had a gradient for), for the step's report.
    pub fn reduce_grads<B, M>(&self, module: &M, grads: &mut GradientsParams) -> Result<usize>
    where
        B: AutodiffBackend<InnerBackend: DeviceBackend>,
        M: AutodiffModule<B>,
    {
        if !self.scatters() {
            self.all_reduce_grads(module, grads)?;
            return Ok(params_by_path(module)
                .iter()
                .filter(|p| has_grad::<B>(grads, p))
                .map(ParamInfo::numel)
                .sum());
        }
        let mut held = 0;
        for (comm, params) in self.groups(module) {
            held += reduce_scatter_params::<B, M>(comm, module, &params, grads, self.bucket_elems)?;
        }
        Ok(held)
    }

    /// Whether gradients are reduce-scattered (ZeRO-1 over more than one rank): then each
    /// rank holds only its own parameters' gradients, and a gradient norm is summed over
    /// every rank holding some (the world) rather than over one replica.
    pub fn scatters(&self) -> bool {
        self.zero1 && self.comm.size() > 1
    }

    /// Under ZeRO-1, the paths of the trainable parameters whose optimizer state this rank
    /// keeps; `None` without it (all of them).
    pub fn owned<B: Backend, M: burn::module::Module<B>>(
        &self,
        module: &M,
    ) -> Option<std::collections::BTreeSet<String>> {
        if !self.zero1 || self.comm.size() == 1 {
            return None;
        }
        let mut out = std::collections::BTreeSet::new();
        for (comm, params) in self.groups(module) {
            let owners = partition(&params, comm.size());
            out.extend(
                params
                    .iter()
                    .filter(|p| owners.get(&p.path) == Some(&comm.rank()))
                    .map(|p| p.path.clone()),
            );
        }
        Some(out)
    }

    /// Under ZeRO-1, drop the gradients of parameters another rank owns, so the optimizer
    /// steps (and keeps state for) only this rank's share. Within the group a parameter is
    /// replicated over, each rank owns a contiguous run in module-path order, balanced by
    /// element count ([`partition`]).
    pub fn keep_owned_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: &mut GradientsParams,
    ) {
        if !self.zero1 || self.comm.size() == 1 {
            return;
        }
        for (comm, params) in self.groups(module) {
            let owners = partition(&params, comm.size());
            for p in &params {
                if owners.get(&p.path) != Some(&comm.rank()) {
                    let _ = take_flat::<B>(grads, p);
                }
            }
        }
    }

    /// Under ZeRO-1, after the optimizer step: every trainable parameter takes its owner's
    /// value, all-gathered on the device in buckets of every owner's next window
    /// ([`zero::all_gather`]), each parameter put into the module as soon as it has all
    /// arrived (no second copy of the whole model is held). The module comes back in every
    /// case: with the error, when an all-gather fails, and then only partly synchronised
    /// (the trainer stops there).
    pub fn sync_owned_params<B, M>(&self, module: M) -> (M, Result<()>)
    where
        B: AutodiffBackend<InnerBackend: DeviceBackend>,
        M: AutodiffModule<B>,
    {
        if !self.zero1 || self.comm.size() == 1 {
            return (module, Ok(()));
        }
        let device = match device_of(&module) {
            Ok(d) => d,
            Err(e) => return (module, Err(e)),
        };
        let mut slot = Some(module);
        for (comm, params) in self.groups(slot.as_ref().expect("the module is in its slot")) {
            if comm.size() == 1 {
                // Its one rank owns and has stepped every parameter of the group.
                continue;
            }
            let gathered = (|| {
                let (sizes, windows) = windows(comm, &params, self.bucket_elems)?;
                let (first, end) = windows.run(comm.rank());
                let mine_paths = params[first..end].iter().map(|p| p.path.clone()).collect();
                let module = slot.as_ref().expect("the module is in its slot");
                let mut held = Collect::<Flat<Inner<B>>>::collect::<B, M>(module, mine_paths);
                let mine = params[first..end]
                    .iter()
                    .map(|p| {
                        held.remove(&p.path)
                            .map(|f| f.0)
                            .ok_or_else(|| missing(&p.path))
                    })
                    .collect::<Result<Vec<_>>>()?;
                zero::all_gather::<Inner<B>>(comm, &windows, &sizes, mine, &device, |complete| {
                    let values = complete
                        .into_iter()
                        .map(|(i, v)| (params[i].path.clone(), Flat(v)))
                        .collect();
                    let m = slot.take().expect("the module is in its slot");
                    slot = Some(m.map(&mut Replace {
                        path: Vec::new(),
                        values,
                    }));
                })
            })();
            if let Err(e) = gathered {
                return (slot.expect("the module is in its slot"), Err(e));
            }
        }
        (slot.expect("the module is in its slot"), Ok(()))
    }
}

/// A group's parameter sizes and their owners' windows ([`zero::Windows`]).
fn windows(
    comm: &dyn Communicator,
    params: &[ParamInfo],
    limit: usize,
) -> Result<(Vec<usize>, zero::Windows)> {
    let owners = partition(params, comm.size());
    let sizes: Vec<usize> = params.iter().map(ParamInfo::numel).collect();
    let owner: Vec<usize> = params
        .iter()
        .map(|p| owners.get(&p.path).copied().unwrap_or(0))
        .collect();
    let windows = zero::Windows::new(&sizes, &owner, comm.size(), limit)?;
    Ok((sizes, windows))
}

/// Sum the gradients of `params` (the same list, in the same order, on every rank) over
/// `comm`, in buckets of at most `bucket_elems`: each bucket is the gradients flattened
/// into one f32 tensor on the device, all-reduced there ([`crate::device::all_reduce`]),
/// and cut back into views of it. A parameter with no gradient on some rank counts as
/// zeros there; it gets a gradient afterwards iff it had one on any rank.
///
/// burn 0.21's autodiff offers no hook per finished gradient, so the buckets go after the
/// backward pass, not during it as in PyTorch's DDP.
pub fn all_reduce_params<B, M>(
    comm: &dyn Communicator,
    module: &M,
    params: &[ParamInfo],
    grads: &mut GradientsParams,
    bucket_elems: usize,
) -> Result<()>
where
    B: AutodiffBackend<InnerBackend: DeviceBackend>,
    M: AutodiffModule<B>,
{
    if comm.size() == 1 || params.is_empty() {
        return Ok(());
    }
    let device = device_of(module)?;
    let mut present: Vec<u8> = params
        .iter()
        .map(|p| u8::from(has_grad::<B>(grads, p)))
        .collect();
    comm.all_reduce(&mut present, ReduceOp::Max)?;
    for (start, end) in buckets(params, bucket_elems) {
        let bucket = &params[start..end];
        let mut parts = Vec::with_capacity(bucket.len());
        for p in bucket {
            parts.push(match take_flat::<B>(grads, p)? {
                Some(g) => g,
                None => Inner::<B>::float_zeros([p.numel()].into(), &device, FloatDType::F32),
            });
        }
        let flat =
            device::all_reduce::<Inner<B>>(comm, Inner::<B>::float_cat(parts, 0), ReduceOp::Sum)?;
        let mut at = 0;
        for (p, &any) in bucket.iter().zip(&present[start..end]) {
            if any != 0 {
                let view = Inner::<B>::float_slice(
                    flat.clone(),
                    &[Slice::new(at as isize, Some((at + p.numel()) as isize), 1)],
                );
                put_flat::<B>(grads, p, view)?;
            }
            at += p.numel();
        }
    }
    Ok(())
}

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// ZeRO-1's gradient reduction over `comm` of `params` (the same list on every rank):
/// reduce-scattered on the device in buckets of every owner's next window
/// ([`zero::reduce_scatter`]), so that each rank gets the sums of the parameters it owns
/// ([`partition`]); other gradients are dropped. Returns the elements of the parameters any
/// rank had a gradient for.
fn reduce_scatter_params<B, M>(
    comm: &dyn Communicator,
    module: &M,
    params: &[ParamInfo],
    grads: &mut GradientsParams,
    bucket_elems: usize,
) -> Result<usize>
where
    B: AutodiffBackend<InnerBackend: DeviceBackend>,
    M: AutodiffModule<B>,
{
    if params.is_empty() {
        return Ok(0);
    }
    let mut present: Vec<u8> = params
        .iter()
        .map(|p| u8::from(has_grad::<B>(grads, p)))
        .collect();
    let held = |present: &[u8]| -> usize {
        params
            .iter()
            .zip(present)
            .filter(|(_, &any)| any != 0)
            .map(|(p, _)| p.numel())
            .sum()
    };
    if comm.size() == 1 {
        return Ok(held(&present));
    }
    let device = device_of(module)?;
    comm.all_reduce(&mut present, ReduceOp::Max)?;
    let (sizes, windows) = windows(comm, params, bucket_elems)?;
    let flats = params
        .iter()
        .map(|p| take_flat::<B>(grads, p))
        .collect::<Result<Vec<_>>>()?;
    let mine = zero::reduce_scatter::<Inner<B>>(comm, &windows, &sizes, &flats, &device)?;
    drop(flats);
    let (first, _) = windows.run(comm.rank());
    for (k, g) in mine.into_iter().enumerate() {
        if present[first + k] != 0 {
            put_flat::<B>(grads, &params[first + k], g)?;
        }
    }
    Ok(held(&present))
}

/// `[start, end)` runs of `params` of at most `limit` elements (a larger parameter alone).
fn buckets(params: &[ParamInfo], limit: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < params.len() {
        let mut end = start;
        let mut elems = 0;
        while end < params.len() && (end == start || elems + params[end].numel() <= limit) {
            elems += params[end].numel();
            end += 1;
        }
        out.push((start, end));
        start = end;
    }
    out
}

/// Every float parameter's values (as f32) by module path.
pub fn values_by_path<B: Backend, M: burn::module::Module<B>>(
    module: &M,
) -> BTreeMap<String, Vec<f32>> {
    values_where(module, |_| true)
}

/// [`values_by_path`] of the parameters whose path `keep` accepts.
pub fn values_where<B: Backend, M: burn::module::Module<B>>(
    module: &M,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<f32>> {
    let paths = params_by_path(module)
        .into_iter()
        .map(|p| p.path)
        .filter(|p| keep(p))
        .collect();
    Collect::<Vec<f32>>::collect(module, paths)
}

/// Put `values` (by module path, same shapes) into `module`'s parameters; parameters not
/// named keep theirs.
pub fn replace_by_path<B: Backend, M: burn::module::Module<B>>(
    module: M,
    values: BTreeMap<String, Vec<f32>>,
) -> M {
    module.map(&mut Replace {
        path: Vec::new(),
        values,
    })
}

/// Contiguous, element-balanced split of `params` (in their order) into `parts` owners.
pub fn partition(params: &[ParamInfo], parts: usize) -> BTreeMap<String, usize> {
    let sizes: Vec<u64> = params.iter().map(|p| p.numel() as u64).collect();
    params
        .iter()
        .zip(owners(&sizes, parts))
        .map(|(p, o)| (p.path.clone(), o))
        .collect()
}

/// [`partition`] of tensors of `sizes` elements: each one's owner, the part its midpoint
/// falls in. The cost model prices ZeRO-1's shares with it.
pub fn owners(sizes: &[u64], parts: usize) -> Vec<usize> {
    let total: u64 = sizes.iter().sum();
    let mut before = 0u64;
    sizes
        .iter()
        .map(|&n| {
            let mid = before + n / 2;
            before += n;
            (u128::from(mid) * parts as u128)
                .checked_div(u128::from(total))
                .map_or(0, |o| (o as usize).min(parts.saturating_sub(1)))
        })
        .collect()
}

fn missing(path: &str) -> Error {
    Error::InvalidArgument(format!("parameter {path} disappeared during the step"))
}

fn device_of<B: Backend, M: burn::module::Module<B>>(module: &M) -> Result<B::Device> {
    module
        .devices()
        .into_iter()
        .next()
        .ok_or_else(|| Error::InvalidArgument("the module has no parameters".into()))
}

/// Whether `grads` holds a gradient for `p`.
pub fn has_grad<B: AutodiffBackend>(grads: &GradientsParams, p: &ParamInfo) -> bool {
    match p.shape.len() {
        1 => grads.get::<B::InnerBackend, 1>(p.id).is_some(),
        2 => grads.get::<B::InnerBackend, 2>(p.id).is_some(),
        3 => grads.get::<B::InnerBackend, 3>(p.id).is_some(),
        4 => grads.get::<B::InnerBackend, 4>(p.id).is_some(),
        _ => false,
    }
}

/// `p`'s gradient taken out of `grads`, flattened to f32 `[numel]`.
fn take_flat<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    p: &ParamInfo,
) -> Result<Option<FloatTensor<Inner<B>>>> {
    fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
        let n = t.shape().num_elements();
        let t = B::float_reshape(t.into_primitive().tensor(), [n].into());
        B::float_cast(t, FloatDType::F32)
    }
    Ok(match p.shape.len() {
        1 => grads.remove::<Inner<B>, 1>(p.id).map(flat),
        2 => grads.remove::<Inner<B>, 2>(p.id).map(flat),
        3 => grads.remove::<Inner<B>, 3>(p.id).map(flat),
        4 => grads.remove::<Inner<B>, 4>(p.id).map(flat),
        d => return Err(dims(p, d)),
    })
}

/// `flat` (`[numel]`) registered in `grads` as `p`'s gradient, in `p`'s shape.
fn put_flat<B: AutodiffBackend>(
    grads: &mut GradientsParams,
    p: &ParamInfo,
    flat: FloatTensor<Inner<B>>,
) -> Result<()> {
    let t = Inner::<B>::float_reshape(flat, p.shape.clone().into());
    let t = TensorPrimitive::Float(t);
    match p.shape.len() {
        1 => grads.register::<Inner<B>, 1>(p.id, Tensor::from_primitive(t)),
        2 => grads.register::<Inner<B>, 2>(p.id, Tensor::from_primitive(t)),
        3 => grads.register::<Inner<B>, 3>(p.id, Tensor::from_primitive(t)),
        4 => grads.register::<Inner<B>, 4>(p.id, Tensor::from_primitive(t)),
        d => return Err(dims(p, d)),
    }
    Ok(())
}

fn dims(p: &ParamInfo, d: usize) -> Error {
    Error::InvalidArgument(format!(
        "{}: {d}-dimensional parameters are not supported",
        p.path
    ))
}

fn to_f32(data: TensorData, path: &str) -> Result<Vec<f32>> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::InvalidArgument(format!("{path}: {e:?}")))
}

/// A parameter's value as [`Collect`] takes it out of a module and [`Replace`] puts it
/// back in: host f32 values, or a flat f32 tensor of the inner backend ([`Flat`]).
trait ParamValue<B: Backend>: Sized {
    /// `param`'s value, `None` when it cannot be read.
    fn take<const D: usize>(param: &Param<Tensor<B, D>>, path: &str) -> Option<Self>;
    /// A tensor with this value made like `old` (its shape, dtype and device).
    fn like<const D: usize>(self, old: &Tensor<B, D>) -> Tensor<B, D>;
}

impl<B: Backend> ParamValue<B> for Vec<f32> {
    fn take<const D: usize>(param: &Param<Tensor<B, D>>, path: &str) -> Option<Self> {
        to_f32(param.val().into_data(), path).ok()
    }
    fn like<const D: usize>(self, old: &Tensor<B, D>) -> Tensor<B, D> {
        // Values come as f32 and go back in the parameter's dtype (a bf16 frozen base).
        Tensor::<B, D>::from_data(TensorData::new(self, old.dims().to_vec()), &old.device())
            .cast(old.dtype())
    }
}

/// A parameter's value as a flat f32 tensor of the inner backend, on the device.
struct Flat<I: Backend>(FloatTensor<I>);

impl<B: AutodiffBackend> ParamValue<B> for Flat<B::InnerBackend> {
    fn take<const D: usize>(param: &Param<Tensor<B, D>>, _: &str) -> Option<Self> {
        let t = param.val().inner();
        let n = t.shape().num_elements();
        let t = Inner::<B>::float_reshape(t.into_primitive().tensor(), [n].into());
        Some(Flat(Inner::<B>::float_cast(t, FloatDType::F32)))
    }
    fn like<const D: usize>(self, old: &Tensor<B, D>) -> Tensor<B, D> {
        let shaped = Inner::<B>::float_reshape(self.0, old.shape());
        let inner = Tensor::<B::InnerBackend, D>::from_primitive(TensorPrimitive::Float(shaped))
            .cast(old.dtype());
        Tensor::<B, D>::from_inner(inner)
    }
}

/// The values of the parameters at some paths.
struct Collect<V> {
    path: Vec<String>,
    wanted: std::collections::BTreeSet<String>,
    values: BTreeMap<String, V>,
}

impl<V> Collect<V> {
    fn collect<B: Backend, M: burn::module::Module<B>>(
        module: &M,
        wanted: std::collections::BTreeSet<String>,
    ) -> BTreeMap<String, V>
    where
        V: ParamValue<B>,
    {
        let mut v = Collect {
            path: Vec::new(),
            wanted,
            values: BTreeMap::new(),
        };
        module.visit(&mut v);
        v.values
    }
}

impl<B: Backend, V: ParamValue<B>> ModuleVisitor<B> for Collect<V> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self.path.join(".");
        if self.wanted.contains(&path) {
            if let Some(v) = V::take(param, &path) {
                self.values.insert(path, v);
            }
        }
    }
}

/// Replaces parameters' values (same id, same require-grad) by path.
struct Replace<V> {
    path: Vec<String>,
    values: BTreeMap<String, V>,
}

impl<B: Backend, V: ParamValue<B>> ModuleMapper<B> for Replace<V> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.path.join(".");
        let Some(value) = self.values.remove(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let mut fresh = value.like(&tensor);
        if tensor.is_require_grad() {
            fresh = fresh.require_grad();
        }
        Param::from_mapped_value(id, fresh, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, n: usize) -> ParamInfo {
        ParamInfo {
            path: path.into(),
            id: ParamId::new(),
            shape: vec![n],
            trainable: true,
        }
    }

    #[test]
    fn partition_is_contiguous_and_balanced() {
        let params: Vec<ParamInfo> = (0..10).map(|i| info(&format!("p{i}"), 100)).collect();
        for parts in 1..=5 {
            let owners = partition(&params, parts);
            let seq: Vec<usize> = params.iter().map(|p| owners[&p.path]).collect();
            assert!(seq.windows(2).all(|w| w[0] <= w[1]), "{seq:?}");
            for r in 0..parts {
                let n = seq.iter().filter(|&&o| o == r).count();
                assert!(
                    n >= 10 / parts - 1 && n <= 10 / parts + 1,
                    "{parts} parts: {seq:?}"
                );
            }
        }
        assert!(partition(&[], 3).is_empty());
    }
}
