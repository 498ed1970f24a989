//! The GPU data plane: NCCL through cudarc (loaded at run time, so builds need no NCCL).
//!
//! An [`NcclComm`] is a TCP group (its bootstrap: the NCCL unique id travels over it, and
//! host buffers — counts, flags, scalars — stay on it, where they already are) plus one
//! NCCL communicator over the same ranks for device memory ([`DeviceComm`], used by
//! [`crate::device`] on the tensors' buffers). [`Communicator::split`] splits the TCP group
//! and makes the sub-group's NCCL communicator from a unique id exchanged inside it: every
//! mesh group (dp, tp, pp, ep, the dense data group) gets its own, and a split only its
//! members take part in (the tied-embedding pair of a pipeline) works as with TCP.
//! (`ncclCommSplit` would need every rank of the parent to call it, which our split
//! contract does not ask.) `ncclCommInitRank` has no timeout of its own: it runs on a
//! helper thread given the group's timeout (at least 2 minutes), so a member that never
//! comes fails the others as a TCP collective would. (A collective's first call can also wait inside NCCL, where
//! newer versions connect peers lazily; that wait is not bounded here: a peer that crashed
//! ends it through the job's crash detection, and after the first step its hang detection
//! ends any other.)
//!
//! A split with the same ranks as its parent, or as an earlier split of the same parent,
//! shares that NCCL communicator (with dp only, the data group is the world); a group of
//! one makes its NCCL communicator only if it is ever used.
//!
//! Each call runs on the communicator's own CUDA stream after the caller synchronised the
//! backend, and returns when the stream has drained; a collective still running after the
//! group's timeout, or one NCCL reports an asynchronous error for (a peer's link died), is
//! aborted (`ncclCommAbort`) and reported ([`Error::Aborted`] for the timeout), so the
//! worker exits and the job's hang path takes over as it does on TCP.
//!
//! After any failure in the process ([`abandon`]) no NCCL communicator is destroyed:
//! `ncclCommDestroy` (and, in newer NCCL, `ncclCommAbort`) waits for the other ranks on the
//! node, which may be stuck in a collective this rank will never join. The process is
//! about to exit, and its exit frees them. The abort itself runs on a helper thread and is
//! given a few seconds.
//!
//! cudarc looks for `libnccl.so` (and `.so.{13,12,…,1}`), not `libnccl.so.2`, the name NCCL
//! installs: [`library`] finds the library and the launcher puts a link to it on the
//! workers' `LD_LIBRARY_PATH`.
//! Without the `cuda` feature the type exists and [`NcclComm::new`] returns
//! [`crate::Error::NotCompiledWith`].

pub mod library;

#[cfg(not(feature = "cuda"))]
use std::sync::Arc;
#[cfg(not(feature = "cuda"))]
use std::time::Duration;

#[cfg(not(feature = "cuda"))]
use crate::comm::Communicator;
#[cfg(feature = "cuda")]
pub use imp::NcclComm;

/// [`NcclComm::new`] as a group every caller can hold ([`crate::Error::NotCompiledWith`] without
/// the `cuda` feature).
pub fn group(
    bootstrap: std::sync::Arc<dyn crate::Communicator>,
    device: usize,
    timeout: std::time::Duration,
) -> crate::Result<std::sync::Arc<dyn crate::Communicator>> {
    #[cfg(feature = "cuda")]
    return Ok(std::sync::Arc::new(NcclComm::new(
        bootstrap, device, timeout,
    )?));
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bootstrap, device, timeout);
        Err(crate::Error::NotCompiledWith("cuda"))
    }
}

/// Set by [`abandon`] and by any NCCL failure in this process.
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This process is failing (its error is being reported): from now on no NCCL
/// communicator is destroyed when dropped (destroying waits for peers that may be stuck in
/// a collective this rank will never join). Call it before the groups are dropped.
pub fn abandon() {
    FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`abandon`] was called or an NCCL call failed in this process. It stays set:
/// a long-lived process that goes on after a failure leaves its later NCCL communicators
/// to its exit too.
pub fn abandoned() -> bool {
    FAILED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Calls [`abandon`] when dropped, unless [`FailGuard::ended_well`] came first (a return
/// with an error, or a panic, drops it armed). Declared after the groups it protects, it
/// drops before them. Bind it to a name: `let _ = FailGuard::new()` drops it at once.
#[must_use = "the guard marks the process failed when it is dropped"]
pub struct FailGuard {
    armed: bool,
}

impl FailGuard {
    pub fn new() -> Self {
        Self { armed: true }
    }

    /// The work ended as it should (or stopped on purpose): no failure to mark.
    pub fn ended_well(mut self) {
        self.armed = false;
    }
}

impl Default for FailGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FailGuard {
    fn drop(&mut self) {
        if self.armed {
            abandon();
        }
    }
}

#[cfg(not(feature = "cuda"))]
/// NCCL communicator (needs the `cuda` feature).
pub struct NcclComm;

#[cfg(not(feature = "cuda"))]
impl NcclComm {
    /// Always [`crate::Error::NotCompiledWith`]`("cuda")` in this build.
    pub fn new(
        _bootstrap: Arc<dyn Communicator>,
        _device: usize,
        _timeout: Duration,
    ) -> crate::Result<Self> {
        Err(crate::Error::NotCompiledWith("cuda"))
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod imp {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use cudarc::driver::sys::{cuStreamQuery, cudaError_enum};
    use cudarc::driver::{CudaContext, CudaStream};
    use cudarc::nccl::result as nccl;
    use cudarc::nccl::sys;

    use crate::comm::{Collectives, Communicator, DType, DeviceBuf, DeviceComm, ReduceOp};
    use crate::error::{Error, Result};

    /// One rank's communicator on one GPU: TCP for host bytes, NCCL for device memory.
    pub struct NcclComm {
        tcp: Arc<dyn Communicator>,
        gpu: usize,
        timeout: Duration,
        /// This rank in the world, for errors (`tcp.rank()` is its rank in the group).
        world_rank: usize,
        /// Made by `new` and `split` (where every member is present), or shared with the
        /// parent or an earlier split of the same ranks.
        nccl: OnceLock<std::result::Result<Arc<Raw>, String>>,
        /// The NCCL communicators of this group's splits, by their ranks.
        splits: Mutex<Vec<(Vec<usize>, Arc<Raw>)>>,
        seq: AtomicU64,
    }

    /// A raw NCCL communicator and the stream its calls run on.
    struct Raw {
        comm: Mutex<sys::ncclComm_t>,
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        aborted: AtomicBool,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it are
    // not concurrent (NCCL's thread-safety rules); the Mutex around it serialises them.
    unsafe impl Send for Raw {}
    unsafe impl Sync for Raw {}

    impl Drop for Raw {
        fn drop(&mut self) {
            // After a failure the communicator is left to the process's exit (module docs).
            if self.aborted.load(Ordering::SeqCst) || super::abandoned() {
                return;
            }
            if let Ok(c) = self.comm.lock() {
                // SAFETY: the communicator was initialised and is not used again.
                let _ = unsafe { nccl::comm_destroy(*c) };
            }
        }
    }

    impl Raw {
        /// Abort the communicator (marking the process failed first): on a helper thread,
        /// given a few seconds, since newer NCCL waits there for the node's other ranks.
        fn abort(&self, comm: sys::ncclComm_t) {
            super::abandon();
            if self.aborted.swap(true, Ordering::SeqCst) {
                return;
            }
            let (done, wait) = std::sync::mpsc::channel();
            let address = comm as usize;
            let spawned = std::thread::Builder::new()
                .name("nccl-abort".into())
                .spawn(move || {
                    // SAFETY: the communicator is valid and never used after this.
                    let _ = unsafe { nccl::comm_abort(address as sys::ncclComm_t) };
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => {
                    let _ = wait.recv_timeout(ABORT_GRACE);
                }
                // SAFETY: as above; no thread to bound it, so abort here.
                Err(_) => {
                    let _ = unsafe { nccl::comm_abort(comm) };
                }
            }
        }
    }

    /// How long an abort may take before the worker goes on to exit without it.
    const ABORT_GRACE: Duration = Duration::from_secs(10);

    /// The least time NCCL's init is given, whatever the collective timeout (its first
    /// topology and CUDA set-up can take tens of seconds).
    const INIT_FLOOR: Duration = Duration::from_secs(120);

    fn failed(op: &'static str) -> impl Fn(nccl::NcclError) -> Error {
        move |e| Error::Connect(format!("NCCL {op}: {:?}", e.0))
    }

    fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::Connect(format!("CUDA {op}: {e:?}"))
    }

    fn dtype(d: DType) -> (sys::ncclDataType_t, usize) {
        let t = match d {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::F64 => sys::ncclDataType_t::ncclFloat64,
            DType::U8 => sys::ncclDataType_t::ncclUint8,
            DType::I64 => sys::ncclDataType_t::ncclInt64,
        };
        (t, d.size())
    }

    fn op(o: ReduceOp) -> sys::ncclRedOp_t {
        match o {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        }
    }

    /// NCCL's asynchronous error on `comm` (a peer's connection broke, a remote failure),
    /// if it has one.
    fn async_error(comm: sys::ncclComm_t) -> Option<sys::ncclResult_t> {
        let mut r = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is valid; `r` receives the state.
        let asked = unsafe { sys::ncclCommGetAsyncError(comm, &mut r) };
        match (asked, r) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess)
            | (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, e) => Some(e),
            (e, _) => Some(e),
        }
    }

    impl NcclComm {
        /// The NCCL group of `bootstrap`'s ranks on GPU `device` (usually the local rank);
        /// a collective still running after `timeout` is aborted. Every member calls this
        /// at the same point.
        pub fn new(
            bootstrap: Arc<dyn Communicator>,
            device: usize,
            timeout: Duration,
        ) -> Result<Self> {
            super::library::check()?;
            let world_rank = bootstrap.rank();
            let comm = Self::lazy(bootstrap, device, timeout, world_rank);
            comm.raw()?;
            Ok(comm)
        }

        fn lazy(
            tcp: Arc<dyn Communicator>,
            gpu: usize,
            timeout: Duration,
            world_rank: usize,
        ) -> Self {
            Self {
                tcp,
                gpu,
                timeout,
                world_rank,
                nccl: OnceLock::new(),
                splits: Mutex::new(Vec::new()),
                seq: AtomicU64::new(0),
            }
        }

        /// The NCCL communicator, made the first time (in `new` or `split`) from a unique
        /// id rank 0 sends over TCP.
        fn raw(&self) -> Result<&Arc<Raw>> {
            self.nccl
                .get_or_init(|| self.init().map(Arc::new).map_err(|e| e.to_string()))
                .as_ref()
                .map_err(|e| Error::Connect(e.clone()))
        }

        fn init(&self) -> Result<Raw> {
            // Rank 0 sends the unique id with a byte saying it could make one, so that the
            // others do not wait out the TCP timeout when it cannot.
            let mut made = None;
            let mut raw = [0u8; 129];
            if self.tcp.rank() == 0 {
                match self.context().and_then(|c| {
                    let id = nccl::get_uniqueid().map_err(failed("unique id"))?;
                    Ok((c, id))
                }) {
                    Ok((c, id)) => {
                        for (b, c) in raw.iter_mut().zip(id.internal) {
                            *b = c as u8;
                        }
                        raw[128] = 1;
                        made = Some(c);
                    }
                    Err(e) => {
                        // The others learn it failed; the cause is this rank's error.
                        let _ = self.tcp.broadcast(&mut raw, 0);
                        return Err(e);
                    }
                }
            }
            self.tcp.broadcast(&mut raw, 0)?;
            if raw[128] != 1 {
                return Err(Error::Connect(
                    "the first rank of the group could not make its NCCL id (see its error)".into(),
                ));
            }
            let (ctx, stream) = match made {
                Some(c) => c,
                None => self.context()?,
            };
            let mut internal = [0 as core::ffi::c_char; 128];
            for (c, b) in internal.iter_mut().zip(raw) {
                *c = b as core::ffi::c_char;
            }
            let id = sys::ncclUniqueId { internal };
            // `ncclCommInitRank` waits for every member without a deadline: it runs on a
            // helper thread, given the group's timeout (then this rank fails and exits,
            // leaving the thread to the exit).
            let (n, rank) = (self.tcp.size() as i32, self.tcp.rank() as i32);
            let bound = Arc::clone(&ctx);
            let (done, wait) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("nccl-init".into())
                .spawn(move || {
                    let made = bound
                        .bind_to_thread()
                        .map_err(cuda("context"))
                        .and_then(|()| {
                            let mut comm = std::ptr::null_mut();
                            // SAFETY: `comm` receives the new communicator; the context is
                            // current on this thread.
                            unsafe { nccl::comm_init_rank(&mut comm, n, id, rank) }
                                .map_err(failed("init"))?;
                            Ok(comm as usize)
                        });
                    let _ = done.send(made);
                })
                .map_err(|e| Error::Connect(format!("starting NCCL's init: {e}")))?;
            let deadline = self.timeout.max(INIT_FLOOR);
            let made = match wait.recv_timeout(deadline) {
                Ok(made) => made,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Connect(format!(
                    "NCCL's init of a group of {n} did not complete within {deadline:?} (a \
                     member never came)"
                ))),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Error::Connect(
                    "NCCL's init thread panicked (see the message above)".into(),
                )),
            };
            let comm = made.inspect_err(|_| super::abandon())? as sys::ncclComm_t;
            Ok(Raw {
                comm: Mutex::new(comm),
                ctx,
                stream,
                aborted: AtomicBool::new(false),
            })
        }

        /// This rank's CUDA context (bound to the thread) and the stream NCCL runs on.
        fn context(&self) -> Result<(Arc<CudaContext>, Arc<CudaStream>)> {
            let ctx = CudaContext::new(self.gpu).map_err(cuda("context"))?;
            let stream = ctx.new_stream().map_err(cuda("stream"))?;
            Ok((ctx, stream))
        }

        /// Enqueue `calls` on the stream (inside one NCCL group when `grouped`) and wait
        /// for them; past the timeout, or on an asynchronous NCCL error, abort the
        /// communicator. Any failure marks the process failed ([`super::abandon`]).
        fn run(
            &self,
            name: &'static str,
            grouped: bool,
            calls: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<()>,
        ) -> Result<()> {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let _in = crate::runtime::position::enter(name, true);
            let done = self.run_at(name, seq, grouped, calls);
            if done.is_err() {
                super::abandon();
            }
            done
        }

        fn run_at(
            &self,
            name: &'static str,
            seq: u64,
            grouped: bool,
            calls: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<()>,
        ) -> Result<()> {
            let raw = self.raw()?;
            if raw.aborted.load(Ordering::SeqCst) {
                return Err(Error::Connect("the NCCL communicator was aborted".into()));
            }
            raw.ctx.bind_to_thread().map_err(cuda("context"))?;
            let comm = raw
                .comm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let stream = raw.stream.cu_stream();
            if grouped {
                nccl::group_start().map_err(failed("group"))?;
            }
            let issued = calls(*comm, stream as sys::cudaStream_t);
            // The group is closed whatever happened inside it.
            let closed = if grouped {
                nccl::group_end().map(|_| ()).map_err(failed("group"))
            } else {
                Ok(())
            };
            issued?;
            closed?;
            let start = Instant::now();
            loop {
                // SAFETY: the stream belongs to this communicator's context, bound above.
                match unsafe { cuStreamQuery(stream) } {
                    cudaError_enum::CUDA_SUCCESS => return Ok(()),
                    cudaError_enum::CUDA_ERROR_NOT_READY => {}
                    e => {
                        return Err(Error::Connect(format!(
                            "CUDA stream after NCCL {name}: {e:?}"
                        )))
                    }
                }
                if let Some(e) = async_error(*comm) {
                    raw.abort(*comm);
                    return Err(Error::Connect(format!(
                        "NCCL {name} #{seq} on rank {}: {e:?} (a peer or its link failed); \
                         the communicator was aborted",
                        self.world_rank
                    )));
                }
                if start.elapsed() > self.timeout {
                    raw.abort(*comm);
                    return Err(Error::Aborted {
                        op: name,
                        seq,
                        rank: self.world_rank,
                        after: self.timeout,
                    });
                }
                std::thread::sleep(Duration::from_micros(
                    if start.elapsed() < Duration::from_millis(2) {
                        5
                    } else {
                        200
                    },
                ));
            }
        }
    }

    fn count(buf: DeviceBuf, size: usize) -> usize {
        buf.bytes / size
    }

    fn ptr(buf: DeviceBuf) -> *mut core::ffi::c_void {
        buf.ptr as *mut core::ffi::c_void
    }

    /// The trait's length contract, checked before NCCL reads or writes past a buffer.
    fn sizes(op: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "NCCL {op}: a buffer of {got} bytes where {want} were due"
            )))
        }
    }

    // SAFETY: every call hands NCCL the caller's buffers as the trait's contract allows.
    unsafe impl DeviceComm for NcclComm {
        unsafe fn all_reduce(
            &self,
            input: DeviceBuf,
            output: DeviceBuf,
            d: DType,
            o: ReduceOp,
        ) -> Result<()> {
            let (t, size) = dtype(d);
            sizes("all_reduce", output.bytes, input.bytes)?;
            self.run("all_reduce", false, |comm, stream| {
                unsafe {
                    nccl::all_reduce(
                        ptr(input),
                        ptr(output),
                        count(input, size),
                        t,
                        op(o),
                        comm,
                        stream,
                    )
                }
                .map(|_| ())
                .map_err(failed("all_reduce"))
            })
        }

        unsafe fn all_gather(&self, input: DeviceBuf, output: DeviceBuf) -> Result<()> {
            sizes("all_gather", output.bytes, input.bytes * self.size())?;
            self.run("all_gather", false, |comm, stream| {
                unsafe {
                    nccl::all_gather(
                        ptr(input),
                        ptr(output),
                        input.bytes,
                        sys::ncclDataType_t::ncclUint8,
                        comm,
                        stream,
                    )
                }
                .map(|_| ())
                .map_err(failed("all_gather"))
            })
        }

        unsafe fn reduce_scatter(
            &self,
            input: DeviceBuf,
            output: DeviceBuf,
            d: DType,
            o: ReduceOp,
        ) -> Result<()> {
            let (t, size) = dtype(d);
            sizes("reduce_scatter", input.bytes, output.bytes * self.size())?;
            self.run("reduce_scatter", false, |comm, stream| {
                unsafe {
                    nccl::reduce_scatter(
                        ptr(input),
                        ptr(output),
                        count(output, size),
                        t,
                        op(o),
                        comm,
                        stream,
                    )
                }
                .map(|_| ())
                .map_err(failed("reduce_scatter"))
            })
        }

        unsafe fn broadcast(&self, input: DeviceBuf, output: DeviceBuf, root: usize) -> Result<()> {
            self.run("broadcast", false, |comm, stream| {
                unsafe {
                    nccl::broadcast(
                        ptr(input),
                        ptr(output),
                        output.bytes,
                        sys::ncclDataType_t::ncclUint8,
                        root as i32,
                        comm,
                        stream,
                    )
                }
                .map(|_| ())
                .map_err(failed("broadcast"))
            })
        }

        unsafe fn exchange(
            &self,
            sends: &[(usize, DeviceBuf)],
            recvs: &[(usize, DeviceBuf)],
        ) -> Result<()> {
            if sends.is_empty() && recvs.is_empty() {
                // Counted as a collective, as on TCP, so that hang reports compare ranks
                // that made the same calls.
                self.seq.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.run("send_recv", true, |comm, stream| {
                let u8t = sys::ncclDataType_t::ncclUint8;
                for &(peer, b) in sends {
                    unsafe { nccl::send(ptr(b), b.bytes, u8t, peer as i32, comm, stream) }
                        .map_err(failed("send"))?;
                }
                for &(peer, b) in recvs {
                    unsafe { nccl::recv(ptr(b), b.bytes, u8t, peer as i32, comm, stream) }
                        .map_err(failed("recv"))?;
                }
                Ok(())
            })
        }
    }

    /// Host bytes stay on the host: they go over the TCP group.
    impl Communicator for NcclComm {
        fn rank(&self) -> usize {
            self.tcp.rank()
        }
        fn size(&self) -> usize {
            self.tcp.size()
        }
        fn seq(&self) -> u64 {
            self.tcp.seq() + self.seq.load(Ordering::Relaxed)
        }
        fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
            self.tcp.all_reduce_bytes(buf, dtype, op)
        }
        fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
            self.tcp.all_gather_bytes(input, output)
        }
        fn reduce_scatter_bytes(
            &self,
            input: &[u8],
            output: &mut [u8],
            dtype: DType,
            op: ReduceOp,
        ) -> Result<()> {
            self.tcp.reduce_scatter_bytes(input, output, dtype, op)
        }
        fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
            self.tcp.broadcast_bytes(buf, root)
        }
        fn send_bytes(&self, buf: &[u8], peer: usize) -> Result<()> {
            self.tcp.send_bytes(buf, peer)
        }
        fn recv_bytes(&self, buf: &mut [u8], peer: usize) -> Result<()> {
            self.tcp.recv_bytes(buf, peer)
        }
        fn send_recv_bytes(
            &self,
            send: &[u8],
            to: usize,
            recv: &mut [u8],
            from: usize,
        ) -> Result<()> {
            self.tcp.send_recv_bytes(send, to, recv, from)
        }
        fn all_to_all_bytes(&self, send: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
            self.tcp.all_to_all_bytes(send)
        }
        fn barrier(&self) -> Result<()> {
            self.tcp.barrier()
        }
        fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Communicator>> {
            let sub = Self::lazy(
                self.tcp.split(ranks)?,
                self.gpu,
                self.timeout,
                self.world_rank,
            );
            // The same ranks as this group, or as an earlier split of it (every member made
            // that split too, at the same point): the same NCCL communicator.
            let same = if ranks.len() == self.size() {
                Some(Arc::clone(self.raw()?))
            } else {
                let splits = self
                    .splits
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                splits
                    .iter()
                    .find(|(r, _)| r == ranks)
                    .map(|(_, raw)| Arc::clone(raw))
            };
            if let Some(raw) = same {
                let _ = sub.nccl.set(Ok(raw));
            } else if ranks.len() > 1 {
                // Made now, while every member is here: made on first use, a member with
                // nothing to move (an empty exchange) would skip the making the others wait
                // in. A group of one has no one to wait for: made if ever used.
                let raw = Arc::clone(sub.raw()?);
                self.splits
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((ranks.to_vec(), raw));
            }
            Ok(Arc::new(sub))
        }
        fn device(&self) -> Option<&dyn DeviceComm> {
            Some(self)
        }
    }

    // Keep the typed calls in scope for `init`'s broadcast.
    #[allow(unused_imports)]
    use Collectives as _;
}
