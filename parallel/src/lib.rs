//! Parallel layouts for tidemill: communicators (TCP on CPU, NCCL on GPU), the worker
//! runtime (rank context from the environment, progress reports) and data parallelism.
//! The dp×tp×pp×ep layout, checked once ([`Layout`]), and a rank's groups ([`Mesh`]); the
//! cost model and strategy search ([`plan`]).

mod comm;
pub mod contract;
pub mod device;
pub mod dp;
mod error;
mod layout;
mod mesh;
pub mod nccl;
pub mod plan;
pub mod runtime;
mod tcp;
pub mod zero;

pub use comm::{
    finish_avg, reduce_into, Collectives, Communicator, DType, DeviceBuf, DeviceComm, Element,
    ReduceOp, SoloComm,
};
pub use error::{Error, Result};
pub use layout::{Axis, Coords, Layout, LayoutError};
pub use mesh::Mesh;
pub use nccl::NcclComm;
pub use runtime::{init, RankContext, Reporter};
pub use tcp::{TcpComm, TcpOptions};
