//! The GPU data plane: NCCL through cudarc (loaded at run time, so builds need no NCCL).
//!
//! The NCCL unique id is made on rank 0 and broadcast over the TCP group. [`NcclComm`]
//! implements [`Communicator`] for host buffers by staging them through device memory
//! (one copy in, one out); code that already holds device buffers calls
//! [`NcclComm::all_reduce_device`] and friends, which never touch the host.
//! Without the `cuda` feature the type exists and [`NcclComm::new`] returns
//! [`Error::NotCompiledWith`].

#[cfg(not(feature = "cuda"))]
use std::sync::Arc;

#[cfg(not(feature = "cuda"))]
use crate::comm::Communicator;
#[cfg(feature = "cuda")]
pub use imp::NcclComm;

#[cfg(not(feature = "cuda"))]
/// NCCL communicator (needs the `cuda` feature).
pub struct NcclComm;

#[cfg(not(feature = "cuda"))]
impl NcclComm {
    /// Always [`Error::NotCompiledWith`]`("cuda")` in this build.
    pub fn new(_bootstrap: &Arc<dyn Communicator>, _device: usize) -> crate::Result<Self> {
        Err(crate::Error::NotCompiledWith("cuda"))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
    use cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp as NcclOp};
    use half::bf16;

    use crate::comm::{Collectives, Communicator, DType, Element, ReduceOp};
    use crate::error::{Error, Result};

    /// One rank's NCCL communicator on one GPU.
    pub struct NcclComm {
        comm: Mutex<OwnedComm>,
        rank: usize,
        size: usize,
        stream: Arc<CudaStream>,
        seq: AtomicU64,
    }

    /// cudarc's `Comm` holds a raw `ncclComm_t`, so it is neither Send nor Sync.
    struct OwnedComm(Comm);

    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it are
    // not concurrent (NCCL's thread-safety rules); the Mutex around it serialises them.
    #[allow(unsafe_code)]
    unsafe impl Send for OwnedComm {}
    fn nccl(op: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> Error {
        move |e| Error::Connect(format!("NCCL {op}: {e:?}"))
    }

    fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::Connect(format!("CUDA {op}: {e:?}"))
    }

    fn op(o: ReduceOp) -> NcclOp {
        match o {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Avg => NcclOp::Avg,
            ReduceOp::Max => NcclOp::Max,
        }
    }

    impl NcclComm {
        /// Join the NCCL group of `bootstrap`'s ranks on GPU `device` (usually the local rank).
        pub fn new(bootstrap: &Arc<dyn Communicator>, device: usize) -> Result<Self> {
            let ctx = CudaContext::new(device).map_err(cuda("context"))?;
            let stream = ctx.new_stream().map_err(cuda("stream"))?;
            let mut raw = [0u8; 128];
            if bootstrap.rank() == 0 {
                let id = Id::new().map_err(nccl("unique id"))?;
                for (b, c) in raw.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
            }
            bootstrap.broadcast(&mut raw, 0)?;
            let id = Id::uninit(raw.map(|b| b as core::ffi::c_char));
            let comm = Comm::from_rank(stream.clone(), bootstrap.rank(), bootstrap.size(), id)
                .map_err(nccl("init"))?;
            Ok(Self {
                comm: Mutex::new(OwnedComm(comm)),
                rank: bootstrap.rank(),
                size: bootstrap.size(),
                stream,
                seq: AtomicU64::new(0),
            })
        }

        /// In-place all-reduce of device memory.
        pub fn all_reduce_device<T: NcclType + DeviceRepr>(
            &self,
            buf: &mut CudaSlice<T>,
            o: ReduceOp,
        ) -> Result<()> {
            let _in = self.tick("all_reduce");
            self.comm()
                .0
                .all_reduce_in_place(buf, &op(o))
                .map_err(nccl("all_reduce"))?;
            Ok(())
        }

        /// All-gather of device memory (`output` holds `size() * input.len()`).
        pub fn all_gather_device<T: NcclType + DeviceRepr>(
            &self,
            input: &CudaSlice<T>,
            output: &mut CudaSlice<T>,
        ) -> Result<()> {
            let _in = self.tick("all_gather");
            self.comm()
                .0
                .all_gather(input, output)
                .map_err(nccl("all_gather"))?;
            Ok(())
        }

        fn comm(&self) -> MutexGuard<'_, OwnedComm> {
            self.comm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        /// Count a collective (the job's position sees it until the guard drops).
        fn tick(&self, name: &'static str) -> crate::runtime::position::InCollective {
            self.seq.fetch_add(1, Ordering::Relaxed);
            crate::runtime::position::enter(name, true)
        }

        fn up<T: DeviceRepr + Element>(&self, host: &[u8]) -> Result<CudaSlice<T>> {
            let typed: Vec<T> = host
                .chunks_exact(std::mem::size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect();
            self.stream
                .clone_htod(&typed)
                .map_err(cuda("copy to device"))
        }

        fn down<T: DeviceRepr + Element>(&self, dev: &CudaSlice<T>, host: &mut [u8]) -> Result<()> {
            let typed = self.stream.clone_dtoh(dev).map_err(cuda("copy to host"))?;
            host.copy_from_slice(bytemuck::cast_slice(&typed));
            Ok(())
        }

        fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
            self.stream.alloc_zeros::<T>(n).map_err(cuda("alloc"))
        }

        fn reduce_typed<T: NcclType + DeviceRepr + Element>(
            &self,
            buf: &mut [u8],
            o: ReduceOp,
        ) -> Result<()> {
            let mut dev = self.up::<T>(buf)?;
            self.comm()
                .0
                .all_reduce_in_place(&mut dev, &op(o))
                .map_err(nccl("all_reduce"))?;
            self.down(&dev, buf)
        }

        fn reduce_scatter_typed<T: NcclType + DeviceRepr + Element + ValidAsZeroBits>(
            &self,
            input: &[u8],
            output: &mut [u8],
            o: ReduceOp,
        ) -> Result<()> {
            let send = self.up::<T>(input)?;
            let mut recv = self.zeros::<T>(output.len() / std::mem::size_of::<T>())?;
            self.comm()
                .0
                .reduce_scatter(&send, &mut recv, &op(o))
                .map_err(nccl("reduce_scatter"))?;
            self.down(&recv, output)
        }
    }

    impl Communicator for NcclComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn seq(&self) -> u64 {
            self.seq.load(Ordering::Relaxed)
        }
        fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, o: ReduceOp) -> Result<()> {
            let _in = self.tick("all_reduce");
            if buf.is_empty() {
                return Ok(()); // CUDA refuses zero-byte allocations; nothing to move
            }
            match dtype {
                DType::F32 => self.reduce_typed::<f32>(buf, o),
                DType::BF16 => self.reduce_typed::<bf16>(buf, o),
                DType::F64 => self.reduce_typed::<f64>(buf, o),
                DType::U8 => self.reduce_typed::<u8>(buf, o),
                DType::I64 => self.reduce_typed::<i64>(buf, o),
            }
        }
        fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<()> {
            let _in = self.tick("all_gather");
            if input.is_empty() {
                return Ok(()); // CUDA refuses zero-byte allocations; nothing to move
            }
            let send = self.up::<u8>(input)?;
            let mut recv = self.zeros::<u8>(output.len())?;
            self.comm()
                .0
                .all_gather(&send, &mut recv)
                .map_err(nccl("all_gather"))?;
            self.down(&recv, output)
        }
        fn reduce_scatter_bytes(
            &self,
            input: &[u8],
            output: &mut [u8],
            dtype: DType,
            o: ReduceOp,
        ) -> Result<()> {
            let _in = self.tick("reduce_scatter");
            if output.is_empty() {
                return Ok(());
            }
            match dtype {
                DType::F32 => self.reduce_scatter_typed::<f32>(input, output, o),
                DType::BF16 => self.reduce_scatter_typed::<bf16>(input, output, o),
                DType::F64 => self.reduce_scatter_typed::<f64>(input, output, o),
                DType::U8 => self.reduce_scatter_typed::<u8>(input, output, o),
                DType::I64 => self.reduce_scatter_typed::<i64>(input, output, o),
            }
        }
        fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
            let _in = self.tick("broadcast");
            if buf.is_empty() {
                return Ok(()); // CUDA refuses zero-byte allocations; nothing to move
            }
            let mut dev = self.up::<u8>(buf)?;
            self.comm()
                .0
                .broadcast_in_place(&mut dev, root as i32)
                .map_err(nccl("broadcast"))?;
            self.down(&dev, buf)
        }
        fn send_bytes(&self, buf: &[u8], peer: usize) -> Result<()> {
            let dev = self.up::<u8>(buf)?;
            self.comm()
                .0
                .send(&dev, peer as i32)
                .map_err(nccl("send"))?;
            self.stream.synchronize().map_err(cuda("sync"))
        }
        fn recv_bytes(&self, buf: &mut [u8], peer: usize) -> Result<()> {
            let mut dev = self.zeros::<u8>(buf.len())?;
            self.comm()
                .0
                .recv(&mut dev, peer as i32)
                .map_err(nccl("recv"))?;
            self.down(&dev, buf)
        }
        fn all_to_all_bytes(&self, send: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
            // Lengths first (NCCL receives need them), then grouped send/recv pairs.
            let n = self.size();
            let lens: Vec<i64> = send.iter().map(|s| s.len() as i64).collect();
            let all = self.all_gather(&lens)?;
            let _in = self.tick("all_to_all");
            let recv_lens: Vec<usize> = (0..n).map(|j| all[j * n + self.rank()] as usize).collect();
            // CUDA refuses zero-byte allocations: empty slots move nothing.
            let sends = send
                .iter()
                .map(|s| (!s.is_empty()).then(|| self.up::<u8>(s)).transpose())
                .collect::<Result<Vec<_>>>()?;
            let mut recvs = recv_lens
                .iter()
                .map(|&l| (l > 0).then(|| self.zeros::<u8>(l)).transpose())
                .collect::<Result<Vec<_>>>()?;
            let comm = self.comm();
            group_start().map_err(nccl("group"))?;
            let mut issued = Ok(());
            for (peer, (s, r)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
                if let Some(s) = s {
                    issued =
                        issued.and_then(|()| comm.0.send(s, peer as i32).map_err(nccl("send")));
                }
                if let Some(r) = r {
                    issued = issued.and_then(|()| {
                        comm.0
                            .recv(r, peer as i32)
                            .map(|_| ())
                            .map_err(nccl("recv"))
                    });
                }
            }
            // The group is closed whatever happened inside it.
            let closed = group_end().map_err(nccl("group"));
            drop(comm);
            issued?;
            closed?;
            recvs
                .iter()
                .map(|r| match r {
                    Some(r) => self.stream.clone_dtoh(r).map_err(cuda("copy to host")),
                    None => Ok(Vec::new()),
                })
                .collect()
        }
        fn barrier(&self) -> Result<()> {
            let mut one = [0u8];
            self.all_reduce_bytes(&mut one, DType::U8, ReduceOp::Max)
        }
        fn split(&self, _ranks: &[usize]) -> Result<Arc<dyn Communicator>> {
            Err(Error::InvalidArgument(
                "NCCL sub-groups are made from the TCP group's split (NcclComm::new on the sub-group)".into(),
            ))
        }
    }
}
