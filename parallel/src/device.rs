//! Collectives on backend tensors: what the data-, tensor-, expert- and pipeline-parallel
//! code calls, so that no caller copies a tensor to a host `Vec` to communicate it.
//!
//! Where the group has collectives over device memory ([`Communicator::device`]: NCCL)
//! and the backend has device buffers ([`DeviceBackend::dense`]: CUDA), the collective
//! reads and writes the tensors' device memory, after one wait for the work queued on the
//! device. Otherwise the tensor's own memory goes through the group's byte calls: on the
//! CPU backend (Flex) that memory *is* the tensor's buffer, taken without a copy when the
//! tensor owns it; on a GPU with a TCP group it is a host copy, which only NCCL avoids.
//! Tensors travel in their dtype (bf16 as bf16); a failed collective consumes its input.
//!
//! ```
//! # use tidemill_parallel as parallel;
//! use burn::backend::Flex;
//! use burn::tensor::{Tensor, TensorPrimitive};
//! use parallel::{device, ReduceOp, SoloComm};
//! let x = Tensor::<Flex, 1>::from_floats([1.0, 2.0], &Default::default());
//! let summed = device::all_reduce::<Flex>(&SoloComm::new(), x.into_primitive().tensor(), ReduceOp::Sum)
//!     .expect("a group of one");
//! let summed = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(summed));
//! assert_eq!(summed.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{try_read_sync, FloatDType, Shape, Slice, TensorData, TensorMetadata};

use crate::comm::{check_counts, Communicator, DType, DeviceBuf, DeviceComm, ReduceOp};
use crate::error::{Error, Result};

/// What a backend tells the collectives about its memory.
pub trait DeviceBackend: Backend {
    /// Whether [`Self::dense`] gives device buffers: then a group with device collectives
    /// (NCCL) works on them; else every collective takes the host path.
    const DEVICE_BUFFERS: bool = false;

    /// `x` laid out densely, with the address of its buffer where the backend's memory is
    /// device memory a [`DeviceComm`] can use; `None` where it is host memory (then the
    /// bytes go through the group's byte calls).
    fn dense(x: FloatTensor<Self>) -> (FloatTensor<Self>, Option<DeviceBuf>) {
        (x, None)
    }

    /// A new dense tensor (contents unspecified) and its buffer, as [`Self::dense`].
    fn dense_empty(
        shape: Shape,
        dtype: FloatDType,
        device: &Self::Device,
    ) -> (FloatTensor<Self>, Option<DeviceBuf>) {
        Self::dense(Self::float_empty(shape, device, dtype))
    }
}

impl DeviceBackend for burn::backend::Flex {}

/// burn's wgpu backend (a developer's check of the cubecl kernels without a GPU): its
/// tensors take the host path.
#[cfg(feature = "wgpu")]
impl DeviceBackend for burn::backend::Wgpu {}

/// burn's kernel fusion over a backend (`job.fusion`): `dense` first runs the fused work
/// queued for the tensor (resolving it to the inner backend's tensor), takes the inner
/// backend's buffer, and hands the tensor back to the fusion client under a new id. Only
/// the device path calls it; the host path reads the fused tensor as it is.
#[cfg(feature = "fusion")]
impl<B: DeviceBackend + burn_fusion::FusionBackend> DeviceBackend for burn_fusion::Fusion<B> {
    const DEVICE_BUFFERS: bool = B::DEVICE_BUFFERS;

    fn dense(x: FloatTensor<Self>) -> (FloatTensor<Self>, Option<DeviceBuf>) {
        let inner = x.client.clone().resolve_tensor_float::<B>(x);
        let (inner, buf) = B::dense(inner);
        (fused::<B>(inner), buf)
    }

    fn dense_empty(
        shape: Shape,
        dtype: FloatDType,
        device: &Self::Device,
    ) -> (FloatTensor<Self>, Option<DeviceBuf>) {
        let (inner, buf) = B::dense_empty(shape, dtype, device);
        (fused::<B>(inner), buf)
    }
}

/// `x` handed to the fusion client of its device, as burn-fusion's own `float_from_data`
/// does with the inner backend's tensor it makes.
#[cfg(feature = "fusion")]
fn fused<B: burn_fusion::FusionBackend>(x: FloatTensor<B>) -> FloatTensor<burn_fusion::Fusion<B>> {
    use burn_ir::{InitOperationIr, OperationIr, OperationOutput};
    let client = burn_fusion::get_client::<B>(&B::float_device(&x));
    let (shape, dtype) = (x.shape(), x.dtype());
    let handle = B::float_tensor_handle(x);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(
            burn_fusion::stream::OperationStreams::default(),
            OperationIr::Init(desc),
            burn_fusion::NoOp::<B>::new(),
        )
        .output()
}

/// Tensors of a training backend take the host path (the trainer's collectives run on the
/// inner backend's tensors: gradients, detached activations; what is left is small, as the
/// per-row maxima of a vocabulary-parallel loss).
impl<B: DeviceBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    DeviceBackend for burn::backend::Autodiff<B, C>
{
}

fn our_dtype(d: burn::tensor::DType) -> Result<DType> {
    match d {
        burn::tensor::DType::F32 => Ok(DType::F32),
        burn::tensor::DType::BF16 => Ok(DType::BF16),
        burn::tensor::DType::F64 => Ok(DType::F64),
        other => Err(Error::InvalidArgument(format!(
            "collectives move f32, bf16 and f64 tensors, not {other:?}"
        ))),
    }
}

fn float_dtype(d: DType) -> FloatDType {
    match d {
        DType::BF16 => FloatDType::BF16,
        DType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

/// The tensor's memory on the host (its own buffer on the CPU backend when it owns it).
fn host<B: Backend>(x: FloatTensor<B>) -> Result<TensorData> {
    match try_read_sync(B::float_into_data(x)) {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(Error::InvalidArgument(format!(
            "reading a tensor for a collective: {e:?}"
        ))),
        None => Err(Error::InvalidArgument(
            "reading a tensor for a collective: the backend cannot read synchronously".into(),
        )),
    }
}

fn numel(shape: &Shape) -> usize {
    shape.num_elements()
}

fn slice1<B: Backend>(x: FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    B::float_slice(x, &[Slice::new(start as isize, Some(end as isize), 1)])
}

/// `x` (1-D, `len` elements) followed by zeros up to `to` elements.
fn pad1<B: Backend>(x: FloatTensor<B>, len: usize, to: usize) -> FloatTensor<B> {
    if len == to {
        return x;
    }
    let zeros = B::float_zeros([to - len].into(), &B::float_device(&x), x.dtype().into());
    if len == 0 {
        return zeros;
    }
    B::float_cat(vec![x, zeros], 0)
}

/// The device path, where the group has device collectives and the backend device
/// buffers (a training backend's tensors take the host path).
fn on_device<B: DeviceBackend>(comm: &dyn Communicator) -> Option<&dyn DeviceComm> {
    comm.device().filter(|_| B::DEVICE_BUFFERS)
}

/// Wait for the work queued on `device`, which produced the buffers a device collective
/// is about to read (their padding and copies included): called after every buffer of
/// the call is made, right before the collective.
fn ready<B: DeviceBackend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| {
        Error::InvalidArgument(format!("waiting for the device before a collective: {e:?}"))
    })
}

/// A new dense tensor of `shape` with its device buffer (the device path only).
fn empty_on<B: DeviceBackend>(
    shape: Shape,
    dtype: FloatDType,
    device: &B::Device,
) -> Result<(FloatTensor<B>, DeviceBuf)> {
    match B::dense_empty(shape, dtype, device) {
        (t, Some(buf)) => Ok((t, buf)),
        (_, None) => Err(no_buffer()),
    }
}

fn buffer_of<B: DeviceBackend>(x: FloatTensor<B>) -> Result<(FloatTensor<B>, DeviceBuf)> {
    match B::dense(x) {
        (t, Some(buf)) => Ok((t, buf)),
        (_, None) => Err(no_buffer()),
    }
}

fn no_buffer() -> Error {
    Error::InvalidArgument(
        "a device communicator was given a tensor whose backend has no device buffers".into(),
    )
}

/// Every rank ends with the element-wise reduction of every rank's `x` (same shapes).
pub fn all_reduce<B: DeviceBackend>(
    comm: &dyn Communicator,
    x: FloatTensor<B>,
    op: ReduceOp,
) -> Result<FloatTensor<B>> {
    same_shape::<B>(
        comm,
        x,
        // SAFETY: as `same_shape` promises.
        #[allow(unsafe_code)]
        |dev, input, output, dtype| unsafe { dev.all_reduce(input, output, dtype, op) },
        |c, bytes, dtype| c.all_reduce_bytes(bytes, dtype, op),
    )
}

/// Every rank ends with `root`'s `x` (the same shape on every rank).
pub fn broadcast<B: DeviceBackend>(
    comm: &dyn Communicator,
    x: FloatTensor<B>,
    root: usize,
) -> Result<FloatTensor<B>> {
    same_shape::<B>(
        comm,
        x,
        // SAFETY: as `same_shape` promises.
        #[allow(unsafe_code)]
        |dev, input, output, _| unsafe { dev.broadcast(input, output, root) },
        |c, bytes, _| c.broadcast_bytes(bytes, root),
    )
}

/// A collective whose result has its input's shape: on the device from `x`'s buffer into
/// a new one (`on_device` gets two dense buffers of this device, alive until it returns,
/// after the device was synchronised), else on the host bytes, in place.
fn same_shape<B: DeviceBackend>(
    comm: &dyn Communicator,
    x: FloatTensor<B>,
    on_device_bufs: impl FnOnce(&dyn DeviceComm, DeviceBuf, DeviceBuf, DType) -> Result<()>,
    on_host: impl FnOnce(&dyn Communicator, &mut [u8], DType) -> Result<()>,
) -> Result<FloatTensor<B>> {
    let (device, shape, dtype) = (B::float_device(&x), x.shape(), our_dtype(x.dtype())?);
    if let Some(dev) = on_device::<B>(comm) {
        let (x, input) = buffer_of::<B>(x)?;
        let (out, output) = empty_on::<B>(shape, float_dtype(dtype), &device)?;
        ready::<B>(&device)?;
        on_device_bufs(dev, input, output, dtype)?;
        drop(x);
        return Ok(out);
    }
    let mut data = host::<B>(x)?;
    on_host(comm, &mut data.bytes, dtype)?;
    Ok(B::float_from_data(data, &device))
}

/// Uneven all-gather of 1-D tensors: rank `r` gives `counts[r]` elements; every rank gets
/// them all, concatenated in rank order.
pub fn all_gather_v<B: DeviceBackend>(
    comm: &dyn Communicator,
    x: FloatTensor<B>,
    counts: &[usize],
) -> Result<FloatTensor<B>> {
    check_counts("all_gather_v", counts, comm.size(), None)?;
    let (device, dtype) = (B::float_device(&x), our_dtype(x.dtype())?);
    let mine = numel(&x.shape());
    if counts[comm.rank()] != mine {
        return Err(Error::InvalidArgument(format!(
            "all_gather_v: rank {} gives {mine} elements where its count is {}",
            comm.rank(),
            counts[comm.rank()]
        )));
    }
    let (n, max, total) = (counts.len(), max_of(counts), counts.iter().sum::<usize>());
    if total == 0 {
        return Ok(B::float_zeros([0].into(), &device, float_dtype(dtype)));
    }
    let x = B::float_reshape(x, [mine].into());
    if let Some(dev) = on_device::<B>(comm) {
        // Chunks padded to the largest: one even all-gather, then the padding cut out.
        let (x, input) = buffer_of::<B>(pad1::<B>(x, mine, max))?;
        let (all, output) = empty_on::<B>([n * max].into(), float_dtype(dtype), &device)?;
        // SAFETY: as in `all_reduce`; `output` holds `n` inputs.
        ready::<B>(&device)?;
        #[allow(unsafe_code)]
        unsafe {
            dev.all_gather(input, output)?
        };
        drop(x);
        if counts.iter().all(|&c| c == max) {
            return Ok(all);
        }
        let parts = counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(r, &c)| slice1::<B>(all.clone(), r * max, r * max + c))
            .collect();
        return Ok(B::float_cat(parts, 0));
    }
    let data = host::<B>(x)?;
    let size = dtype.size();
    let mut padded = data.bytes.to_vec();
    padded.resize(max * size, 0);
    let mut all = vec![0u8; n * max * size];
    comm.all_gather_bytes(&padded, &mut all)?;
    let mut out = Vec::with_capacity(total * size);
    for (r, &c) in counts.iter().enumerate() {
        out.extend_from_slice(&all[r * max * size..(r * max + c) * size]);
    }
    let data = TensorData::from_bytes_vec(out, [total], data.dtype);
    Ok(B::float_from_data(data, &device))
}

/// Uneven reduce-scatter of a 1-D tensor cut into `counts` (one per rank, in rank order):
/// this rank gets the reduction of every rank's chunk `rank()`.
pub fn reduce_scatter_v<B: DeviceBackend>(
    comm: &dyn Communicator,
    x: FloatTensor<B>,
    counts: &[usize],
    op: ReduceOp,
) -> Result<FloatTensor<B>> {
    let (device, dtype) = (B::float_device(&x), our_dtype(x.dtype())?);
    let len = numel(&x.shape());
    check_counts("reduce_scatter_v", counts, comm.size(), Some(len))?;
    let (n, max, mine) = (counts.len(), max_of(counts), counts[comm.rank()]);
    if max == 0 {
        return Ok(B::float_zeros([0].into(), &device, float_dtype(dtype)));
    }
    let x = B::float_reshape(x, [len].into());
    // Every chunk padded to the largest: one even reduce-scatter.
    let padded = if counts.iter().all(|&c| c == max) {
        x
    } else {
        let mut at = 0;
        let parts = counts
            .iter()
            .map(|&c| {
                let part = slice1::<B>(x.clone(), at, at + c);
                at += c;
                pad1::<B>(part, c, max)
            })
            .collect();
        B::float_cat(parts, 0)
    };
    if let Some(dev) = on_device::<B>(comm) {
        let (x, input) = buffer_of::<B>(padded)?;
        let (out, output) = empty_on::<B>([max].into(), float_dtype(dtype), &device)?;
        // SAFETY: as in `all_reduce`; `input` holds `n` outputs.
        ready::<B>(&device)?;
        #[allow(unsafe_code)]
        unsafe {
            dev.reduce_scatter(input, output, dtype, op)?
        };
        drop(x);
        return Ok(if mine == max {
            out
        } else {
            slice1::<B>(out, 0, mine)
        });
    }
    let data = host::<B>(padded)?;
    let size = dtype.size();
    let mut out = vec![0u8; max * size];
    comm.reduce_scatter_bytes(&data.bytes, &mut out, dtype, op)?;
    out.truncate(mine * size);
    let _ = n;
    Ok(B::float_from_data(
        TensorData::from_bytes_vec(out, [mine], data.dtype),
        &device,
    ))
}

fn max_of(counts: &[usize]) -> usize {
    counts.iter().copied().max().unwrap_or(0)
}

/// What one rank expects to receive: the shape and dtype the sender sends.
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    pub shape: Shape,
    pub dtype: FloatDType,
}

/// Send `send` (to its peer) while receiving `recv` (from its peer), either, or both, none
/// waiting for the other: a pipeline stage passing activations on while taking gradients
/// back. Returns what was received.
pub fn send_recv<B: DeviceBackend>(
    comm: &dyn Communicator,
    send: Option<(FloatTensor<B>, usize)>,
    recv: Option<(Expect, usize)>,
    device: &B::Device,
) -> Result<Option<FloatTensor<B>>> {
    if let Some(dev) = on_device::<B>(comm) {
        let sent = send
            .map(|(x, to)| buffer_of::<B>(x).map(|b| (b, to)))
            .transpose()?;
        let got = recv
            .map(|(e, from)| empty_on::<B>(e.shape, e.dtype, device).map(|b| (b, from)))
            .transpose()?;
        let sends: Vec<_> = sent.iter().map(|((_, b), to)| (*to, *b)).collect();
        let recvs: Vec<_> = got.iter().map(|((_, b), from)| (*from, *b)).collect();
        // SAFETY: as in `all_reduce`; the tensors live until after the call.
        ready::<B>(device)?;
        #[allow(unsafe_code)]
        unsafe {
            dev.exchange(&sends, &recvs)?
        };
        drop(sent);
        return Ok(got.map(|((t, _), _)| t));
    }
    let sent = send
        .map(|(x, to)| host::<B>(x).map(|d| (d, to)))
        .transpose()?;
    let mut got = recv
        .map(|(e, from)| {
            let bytes = numel(&e.shape) * our_dtype(e.dtype.into())?.size();
            Ok::<_, Error>((vec![0u8; bytes], e, from))
        })
        .transpose()?;
    match (&sent, &mut got) {
        (Some((d, to)), Some((b, _, from))) => comm.send_recv_bytes(&d.bytes, *to, b, *from)?,
        (Some((d, to)), None) => comm.send_bytes(&d.bytes, *to)?,
        (None, Some((b, _, from))) => comm.recv_bytes(b, *from)?,
        (None, None) => {}
    }
    Ok(got.map(|(b, e, _)| {
        B::float_from_data(
            TensorData::from_bytes_vec(b, e.shape, e.dtype.into()),
            device,
        )
    }))
}

/// Uneven all-to-all of rows: the first `send[j]` rows after those for ranks before `j`
/// of `x: [rows, w]` go to rank `j`; returns `[Σ recv, w]`, `recv[j]` rows from rank `j`
/// in rank order. Rows of `x` beyond `Σ send` are not sent.
pub fn all_to_all_rows<B: DeviceBackend>(
    comm: &dyn Communicator,
    x: FloatTensor<B>,
    send: &[usize],
    recv: &[usize],
) -> Result<FloatTensor<B>> {
    check_counts("all_to_all (send)", send, comm.size(), None)?;
    check_counts("all_to_all (recv)", recv, comm.size(), None)?;
    let (device, dtype) = (B::float_device(&x), our_dtype(x.dtype())?);
    let dims = x.shape().dims::<2>();
    let (rows, width) = (dims[0], dims[1]);
    let sent: usize = send.iter().sum();
    if sent > rows {
        return Err(Error::InvalidArgument(format!(
            "all_to_all: {sent} rows to send from a tensor of {rows}"
        )));
    }
    let total: usize = recv.iter().sum();
    let rows_of = |x: FloatTensor<B>, a: usize, b: usize| {
        B::float_slice(
            x,
            &[
                Slice::new(a as isize, Some(b as isize), 1),
                Slice::new(0, Some(width as isize), 1),
            ],
        )
    };
    if let Some(dev) = on_device::<B>(comm) {
        let me = comm.rank();
        let mut at = 0;
        let mut sends = Vec::new();
        let mut own = None;
        for (j, &c) in send.iter().enumerate() {
            if c > 0 {
                let part = rows_of(x.clone(), at, at + c);
                if j == me {
                    own = Some(part);
                } else {
                    sends.push((j, buffer_of::<B>(part)?));
                }
            }
            at += c;
        }
        let mut recvs = Vec::new();
        for (j, &c) in recv.iter().enumerate() {
            if c > 0 && j != me {
                recvs.push((
                    j,
                    empty_on::<B>([c, width].into(), float_dtype(dtype), &device)?,
                ));
            }
        }
        let s: Vec<_> = sends.iter().map(|(j, (_, b))| (*j, *b)).collect();
        let r: Vec<_> = recvs.iter().map(|(j, (_, b))| (*j, *b)).collect();
        // SAFETY: as in `all_reduce`; the tensors live until after the call.
        ready::<B>(&device)?;
        #[allow(unsafe_code)]
        unsafe {
            dev.exchange(&s, &r)?
        };
        drop(sends);
        let mut parts = Vec::new();
        let mut got = recvs.into_iter();
        for (j, &c) in recv.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if j == me {
                parts.push(own.take().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "all_to_all: rank {me} receives {c} rows from itself but sends it none"
                    ))
                })?);
            } else if let Some((_, (t, _))) = got.next() {
                parts.push(t);
            }
        }
        if parts.is_empty() {
            return Ok(B::float_zeros(
                [0, width].into(),
                &device,
                float_dtype(dtype),
            ));
        }
        return Ok(B::float_cat(parts, 0));
    }
    let data = host::<B>(x)?;
    let row = width * dtype.size();
    let mut chunks = Vec::with_capacity(send.len());
    let mut at = 0;
    for &c in send {
        chunks.push(&data.bytes[at * row..(at + c) * row]);
        at += c;
    }
    let got = comm.all_to_all_bytes(&chunks)?;
    let from: Vec<usize> = got.iter().map(|g| g.len() / row.max(1)).collect();
    if from != recv {
        return Err(Error::InvalidArgument(format!(
            "all_to_all: expected {recv:?} rows from the ranks, got {from:?}"
        )));
    }
    let out = got.concat();
    Ok(B::float_from_data(
        TensorData::from_bytes_vec(out, [total, width], data.dtype),
        &device,
    ))
}

#[cfg(feature = "cuda")]
impl DeviceBackend for burn::backend::Cuda {
    const DEVICE_BUFFERS: bool = true;

    fn dense(x: FloatTensor<Self>) -> (FloatTensor<Self>, Option<DeviceBuf>) {
        // A strictly row-major tensor is returned as it is (its handle's offset is in the
        // resource's address); anything else is copied into a new dense buffer.
        let x = burn_cubecl::kernel::into_contiguous(x);
        let buf = x
            .client
            .get_resource(x.handle.clone())
            .ok()
            .map(|r| DeviceBuf {
                ptr: r.resource().ptr,
                bytes: x.shape().num_elements() * x.dtype.size(),
            });
        (x, buf)
    }

    fn dense_empty(
        shape: Shape,
        dtype: FloatDType,
        device: &Self::Device,
    ) -> (FloatTensor<Self>, Option<DeviceBuf>) {
        // `float_empty` may pitch rows; a collective needs them packed.
        let dtype: burn::tensor::DType = dtype.into();
        let client = <cubecl::cuda::CudaRuntime as cubecl::Runtime>::client(device);
        let handle = client.empty(shape.num_elements() * dtype.size());
        let x = burn_cubecl::tensor::CubeTensor::new_contiguous(
            client,
            device.clone(),
            shape,
            handle,
            dtype,
        );
        Self::dense(x)
    }
}
