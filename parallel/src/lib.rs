//! Parallel layouts for tidemill: the dp×tp×pp×ep mesh, communicators (TCP on CPU, NCCL on
//! GPU), differentiable collectives and the strategy search live here as they are built.
//! Today training runs in one process; this crate holds the pieces shared with it.

mod error;

pub use error::Error;

/// The compute backends this build can drive.
pub fn compiled_backends() -> &'static [&'static str] {
    if cfg!(feature = "cuda") {
        &["cpu", "cuda"]
    } else {
        &["cpu"]
    }
}
