//! Parallel layouts for tidemill: communicators (TCP on CPU, NCCL on GPU), the worker
//! runtime (rank context from the environment, progress reports) and data parallelism.
//! The dp×tp×pp×ep mesh and its groups ([`mesh`]); the cost model and strategy search
//! ([`plan`]).

mod comm;
pub mod dp;
mod error;
pub mod mesh;
pub mod nccl;
pub mod plan;
pub mod runtime;
mod tcp;

pub use comm::{
    finish_avg, reduce_into, Collectives, Communicator, DType, Element, ReduceOp, SoloComm,
};
pub use error::{Error, Result};
pub use mesh::{Axis, Coords, Layout, Mesh};
pub use nccl::NcclComm;
pub use runtime::{init, Context, Reporter};
pub use tcp::{TcpComm, TcpOptions};

/// The compute backends this build can drive.
pub fn compiled_backends() -> &'static [&'static str] {
    if cfg!(feature = "cuda") {
        &["cpu", "cuda"]
    } else {
        &["cpu"]
    }
}
