//! The communicator interface every parallel strategy is written against.
//!
//! [`Communicator`] moves raw bytes (object safe, so a group can be `Arc<dyn Communicator>`);
//! [`Collectives`] adds the typed calls code actually uses, for every communicator:
//!
//! ```
//! # use tidemill_parallel as parallel;
//! use parallel::{Collectives, ReduceOp};
//! # fn demo(comm: &dyn parallel::Communicator) -> parallel::Result<()> {
//! let mut grads = vec![1.0f32; 1024];
//! comm.all_reduce(&mut grads, ReduceOp::Avg)?;
//! # Ok(()) }
//! ```
//!
//! Every rank of a group must issue the same collectives in the same order (SPMD), as
//! with NCCL or torch.distributed.

use std::sync::Arc;

use half::bf16;

use crate::error::{Error, Result};

/// Element types the collectives move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F64,
    U8,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }
}

/// How `all_reduce` and `reduce_scatter` combine the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group size.
    Avg,
    Max,
}

/// A plain-old-data element type with a [`DType`] tag.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// A group of ranks that run collectives together. Byte buffers hold elements of the
/// given `dtype` in native byte order; lengths are in bytes.
pub trait Communicator: Send + Sync {
    /// This process's rank inside the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Collectives issued on this group so far (progress reports carry it: the rank whose
    /// number lags is the one the others are waiting for).
    fn seq(&self) -> u64;

    /// Every rank ends with the element-wise reduction of every rank's `buf`.
    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// `output` (`size() * input.len()` bytes) receives rank `r`'s `input` at `r * input.len()`.
    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()>;
    /// `input` is `size()` equal chunks; rank `r` gets the reduction of every rank's chunk `r`.
    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    /// Every rank ends with `root`'s `buf`.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Point to point: `buf` to `peer`, which must call `recv_bytes` with the same length.
    fn send_bytes(&self, buf: &[u8], peer: usize) -> Result<()>;
    fn recv_bytes(&self, buf: &mut [u8], peer: usize) -> Result<()>;
    /// `send` to `to` while receiving `recv.len()` bytes from `from`, neither waiting for
    /// the other (a pipeline stage passing activations on while taking gradients back).
    /// The peers call `recv_bytes`/`send_bytes` or this. By default one after the other.
    fn send_recv_bytes(&self, send: &[u8], to: usize, recv: &mut [u8], from: usize) -> Result<()> {
        self.send_bytes(send, to)?;
        self.recv_bytes(recv, from)
    }
    /// `send[j]` goes to rank `j` (any lengths, empty included); the result's element `j`
    /// is what rank `j` sent here.
    fn all_to_all_bytes(&self, send: &[&[u8]]) -> Result<Vec<Vec<u8>>>;
    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<()>;
    /// A sub-group of `ranks` (ranks of this group, ascending; this rank among them), e.g.
    /// one mesh axis. Every member must call `split` with the same list, in the same order
    /// relative to other collectives.
    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Communicator>>;
    /// This group's collectives over device memory, where it has them (NCCL): then
    /// [`crate::device`] hands it the tensors' device buffers instead of host bytes.
    fn device(&self) -> Option<&dyn DeviceComm> {
        None
    }
}

/// A dense run of `bytes` bytes of device memory at address `ptr`, on the GPU of the
/// [`DeviceComm`] it is handed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBuf {
    pub ptr: u64,
    pub bytes: usize,
}

/// Collectives over device memory (a GPU communicator). Buffers hold elements of `dtype`;
/// outputs never alias inputs. Each call returns once the collective has completed on the
/// device (or failed: a collective waiting past the group's timeout is aborted and
/// reported as [`Error::Aborted`]).
///
/// # Safety
/// Every buffer must be device memory of the communicator's GPU, valid for its length,
/// alive and not written by other work until the call returns, and the work that produced
/// the inputs must have completed (the caller synchronises the backend first).
#[allow(unsafe_code)]
pub unsafe trait DeviceComm: Send + Sync {
    /// `output` = the element-wise reduction of every rank's `input` (same lengths).
    unsafe fn all_reduce(
        &self,
        input: DeviceBuf,
        output: DeviceBuf,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    /// `output` (`size() * input.bytes`) receives rank `r`'s `input` at `r * input.bytes`.
    unsafe fn all_gather(&self, input: DeviceBuf, output: DeviceBuf) -> Result<()>;
    /// `input` is `size()` equal chunks; `output` receives the reduction of every rank's
    /// chunk `rank()`.
    unsafe fn reduce_scatter(
        &self,
        input: DeviceBuf,
        output: DeviceBuf,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    /// `output` receives `root`'s `input` (`input` is read on the root only).
    unsafe fn broadcast(&self, input: DeviceBuf, output: DeviceBuf, root: usize) -> Result<()>;
    /// Point to point, grouped: every `(peer, buffer)` of `sends` goes out and every one of
    /// `recvs` is filled at once, none waiting for another (pipeline hand-offs, all-to-all).
    unsafe fn exchange(
        &self,
        sends: &[(usize, DeviceBuf)],
        recvs: &[(usize, DeviceBuf)],
    ) -> Result<()>;
}

/// Typed collectives for every [`Communicator`].
pub trait Collectives {
    fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()>;
    /// Rank `r`'s `input` lands at `output[r * input.len()..]`.
    fn all_gather<T: Element>(&self, input: &[T]) -> Result<Vec<T>>;
    /// `input.len()` must be a multiple of the group size; returns this rank's reduced chunk.
    fn reduce_scatter<T: Element>(&self, input: &[T], op: ReduceOp) -> Result<Vec<T>>;
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()>;
    fn send<T: Element>(&self, buf: &[T], peer: usize) -> Result<()>;
    fn recv<T: Element>(&self, buf: &mut [T], peer: usize) -> Result<()>;
    /// `send` to `to` while receiving into `recv` from `from`.
    fn send_recv<T: Element>(
        &self,
        send: &[T],
        to: usize,
        recv: &mut [T],
        from: usize,
    ) -> Result<()>;
    /// Uneven all-to-all: `input` is cut into `send_counts` (elements, one per rank, in
    /// rank order); returns what arrived, concatenated in rank order, and the count from
    /// each rank.
    fn all_to_all<T: Element>(
        &self,
        input: &[T],
        send_counts: &[usize],
    ) -> Result<(Vec<T>, Vec<usize>)>;
    /// Uneven all-gather: rank `r` gives `counts[r]` elements (`input`); returns them all,
    /// concatenated in rank order.
    fn all_gather_v<T: Element>(&self, input: &[T], counts: &[usize]) -> Result<Vec<T>>;
    /// Uneven reduce-scatter: `input` is cut into `counts` (one per rank, in rank order);
    /// returns the reduction of every rank's chunk `rank()`.
    fn reduce_scatter_v<T: Element>(
        &self,
        input: &[T],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<Vec<T>>;
}

/// `counts` checked against the group (one per rank) and, where given, this rank's `len`.
pub(crate) fn check_counts(
    what: &str,
    counts: &[usize],
    size: usize,
    len: Option<usize>,
) -> Result<()> {
    if counts.len() != size {
        return Err(Error::InvalidArgument(format!(
            "{what}: {} counts for a group of {size}",
            counts.len()
        )));
    }
    if let Some((len, expected)) = len.map(|l| (l, counts.iter().sum::<usize>())) {
        if len != expected {
            return Err(Error::InvalidArgument(format!(
                "{what}: {len} elements where the counts {counts:?} sum to {expected}"
            )));
        }
    }
    Ok(())
}

impl<C: Communicator + ?Sized> Collectives for C {
    fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    fn all_gather<T: Element>(&self, input: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); input.len() * self.size()];
        self.all_gather_bytes(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(&mut out),
        )?;
        Ok(out)
    }

    fn reduce_scatter<T: Element>(&self, input: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let n = self.size();
        if !input.len().is_multiple_of(n) {
            return Err(Error::InvalidArgument(format!(
                "reduce_scatter of {} elements over {n} ranks: not a multiple",
                input.len()
            )));
        }
        let mut out = vec![T::zeroed(); input.len() / n];
        self.reduce_scatter_bytes(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(&mut out),
            T::DTYPE,
            op,
        )?;
        Ok(out)
    }

    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }

    fn send<T: Element>(&self, buf: &[T], peer: usize) -> Result<()> {
        self.send_bytes(bytemuck::cast_slice(buf), peer)
    }

    fn recv<T: Element>(&self, buf: &mut [T], peer: usize) -> Result<()> {
        self.recv_bytes(bytemuck::cast_slice_mut(buf), peer)
    }

    fn send_recv<T: Element>(
        &self,
        send: &[T],
        to: usize,
        recv: &mut [T],
        from: usize,
    ) -> Result<()> {
        self.send_recv_bytes(
            bytemuck::cast_slice(send),
            to,
            bytemuck::cast_slice_mut(recv),
            from,
        )
    }

    fn all_to_all<T: Element>(
        &self,
        input: &[T],
        send_counts: &[usize],
    ) -> Result<(Vec<T>, Vec<usize>)> {
        if send_counts.len() != self.size() || send_counts.iter().sum::<usize>() != input.len() {
            return Err(Error::InvalidArgument(format!(
                "all_to_all: send_counts {send_counts:?} must have one entry per rank ({}) and sum to {}",
                self.size(),
                input.len()
            )));
        }
        let bytes: &[u8] = bytemuck::cast_slice(input);
        let size = std::mem::size_of::<T>();
        let mut chunks = Vec::with_capacity(send_counts.len());
        let mut at = 0;
        for &c in send_counts {
            chunks.push(&bytes[at * size..(at + c) * size]);
            at += c;
        }
        let got = self.all_to_all_bytes(&chunks)?;
        Ok(concat(&got, size))
    }

    fn all_gather_v<T: Element>(&self, input: &[T], counts: &[usize]) -> Result<Vec<T>> {
        check_counts("all_gather_v", counts, self.size(), None)?;
        if counts[self.rank()] != input.len() {
            return Err(Error::InvalidArgument(format!(
                "all_gather_v: rank {} gives {} elements where its count is {}",
                self.rank(),
                input.len(),
                counts[self.rank()]
            )));
        }
        // Every chunk padded to the largest: one even all-gather.
        let max = counts.iter().copied().max().unwrap_or(0);
        let mut padded = input.to_vec();
        padded.resize(max, T::zeroed());
        let all = self.all_gather(&padded)?;
        Ok(counts
            .iter()
            .enumerate()
            .flat_map(|(r, &c)| all[r * max..r * max + c].iter().copied())
            .collect())
    }

    fn reduce_scatter_v<T: Element>(
        &self,
        input: &[T],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<Vec<T>> {
        check_counts("reduce_scatter_v", counts, self.size(), Some(input.len()))?;
        let max = counts.iter().copied().max().unwrap_or(0);
        let mut padded = vec![T::zeroed(); max * counts.len()];
        let mut at = 0;
        for (r, &c) in counts.iter().enumerate() {
            padded[r * max..r * max + c].copy_from_slice(&input[at..at + c]);
            at += c;
        }
        let mut mine = self.reduce_scatter(&padded, op)?;
        mine.truncate(counts[self.rank()]);
        Ok(mine)
    }
}

/// Byte chunks of `size`-byte elements, concatenated, with the element count of each.
fn concat<T: Element>(got: &[Vec<u8>], size: usize) -> (Vec<T>, Vec<usize>) {
    let counts: Vec<usize> = got.iter().map(|g| g.len() / size).collect();
    let mut out = Vec::with_capacity(counts.iter().sum());
    for g in got {
        // Received bytes may not be aligned for T: copy element-wise.
        out.extend(g.chunks_exact(size).map(bytemuck::pod_read_unaligned::<T>));
    }
    (out, counts)
}

/// `acc[i] = op(acc[i], other[i])` on raw buffers of `dtype` (Avg sums; the caller divides
/// once at the end with [`finish_avg`]). bf16 is combined in f32 and rounded once per call.
pub fn reduce_into(acc: &mut [u8], other: &[u8], dtype: DType, op: ReduceOp) {
    fn go<T: Element>(acc: &mut [u8], other: &[u8], f: impl Fn(T, T) -> T) {
        let size = std::mem::size_of::<T>();
        for (a, b) in acc.chunks_exact_mut(size).zip(other.chunks_exact(size)) {
            let x: T = bytemuck::pod_read_unaligned(a);
            let y: T = bytemuck::pod_read_unaligned(b);
            a.copy_from_slice(bytemuck::bytes_of(&f(x, y)));
        }
    }
    let max = matches!(op, ReduceOp::Max);
    match dtype {
        DType::F32 => go::<f32>(acc, other, |a, b| if max { a.max(b) } else { a + b }),
        DType::F64 => go::<f64>(acc, other, |a, b| if max { a.max(b) } else { a + b }),
        DType::BF16 => go::<bf16>(acc, other, |a, b| {
            let (a, b) = (a.to_f32(), b.to_f32());
            bf16::from_f32(if max { a.max(b) } else { a + b })
        }),
        DType::U8 => go::<u8>(
            acc,
            other,
            |a, b| if max { a.max(b) } else { a.wrapping_add(b) },
        ),
        DType::I64 => go::<i64>(
            acc,
            other,
            |a, b| if max { a.max(b) } else { a.wrapping_add(b) },
        ),
    }
}

/// Divide a summed buffer by `n` for [`ReduceOp::Avg`] (integers: truncating division).
pub fn finish_avg(buf: &mut [u8], dtype: DType, n: usize) {
    fn go<T: Element>(buf: &mut [u8], f: impl Fn(T) -> T) {
        let size = std::mem::size_of::<T>();
        for a in buf.chunks_exact_mut(size) {
            let x: T = bytemuck::pod_read_unaligned(a);
            a.copy_from_slice(bytemuck::bytes_of(&f(x)));
        }
    }
    match dtype {
        DType::F32 => go::<f32>(buf, |a| a / n as f32),
        DType::F64 => go::<f64>(buf, |a| a / n as f64),
        DType::BF16 => go::<bf16>(buf, |a| bf16::from_f32(a.to_f32() / n as f32)),
        DType::U8 => go::<u8>(buf, |a| a / n as u8),
        DType::I64 => go::<i64>(buf, |a| a / n as i64),
    }
}

/// The trivial group of one rank: every collective is a copy or a no-op.
#[derive(Debug, Default)]
pub struct SoloComm {
    seq: std::sync::atomic::AtomicU64,
}

impl SoloComm {
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self) {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn peer(&self, peer: usize) -> Result<()> {
        if peer == 0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "rank {peer} is not in a group of 1"
            )))
        }
    }
}

impl Communicator for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn seq(&self) -> u64 {
        self.seq.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn all_reduce_bytes(&self, _: &mut [u8], _: DType, _: ReduceOp) -> Result<()> {
        self.tick();
        Ok(())
    }
    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.tick();
        output.copy_from_slice(input);
        Ok(())
    }
    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        _: DType,
        _: ReduceOp,
    ) -> Result<()> {
        self.tick();
        output.copy_from_slice(input);
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut [u8], root: usize) -> Result<()> {
        self.tick();
        self.peer(root)
    }
    fn send_bytes(&self, _: &[u8], peer: usize) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "send to rank {peer} in a group of 1"
        )))
    }
    fn recv_bytes(&self, _: &mut [u8], peer: usize) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "recv from rank {peer} in a group of 1"
        )))
    }
    fn all_to_all_bytes(&self, send: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        self.tick();
        Ok(send.iter().map(|s| s.to_vec()).collect())
    }
    fn barrier(&self) -> Result<()> {
        self.tick();
        Ok(())
    }
    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Communicator>> {
        if ranks != [0] {
            return Err(Error::InvalidArgument(format!(
                "split {ranks:?} of a group of 1"
            )));
        }
        Ok(Arc::new(SoloComm::new()))
    }
}
