//! Errors of the parallel runtime.

use std::time::Duration;

/// What the parallel runtime can fail with. Errors about a peer name its rank (in the
/// world, not the sub-group) and the collective it failed in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A feature (e.g. "cuda") this build was compiled without.
    #[error("this build of tidemill was compiled without the `{0}` feature")]
    NotCompiledWith(&'static str),
    /// A peer did not answer before the collective's deadline.
    #[error("rank {peer} did not answer within {after:?} ({op} #{seq} on rank {rank})")]
    Timeout {
        peer: usize,
        rank: usize,
        op: &'static str,
        seq: u64,
        after: Duration,
    },
    /// A device collective (NCCL) still running after the group's timeout: the
    /// communicator was aborted (the peer it waits for cannot be told from here).
    #[error("NCCL {op} #{seq} on rank {rank} did not complete within {after:?}; the communicator was aborted")]
    Aborted {
        op: &'static str,
        seq: u64,
        rank: usize,
        after: Duration,
    },
    /// The connection to a peer broke (it exited or its node went away).
    #[error("lost the connection to rank {peer} ({op} #{seq} on rank {rank}): {source}")]
    PeerLost {
        peer: usize,
        rank: usize,
        op: &'static str,
        seq: u64,
        #[source]
        source: std::io::Error,
    },
    /// A peer sent something other than what this collective expected: the ranks issued
    /// different collectives (a program bug, not a network fault).
    #[error("rank {peer} is out of step with rank {rank}: {message}")]
    Mismatch {
        peer: usize,
        rank: usize,
        message: String,
    },
    /// Setting up the data plane failed.
    #[error("connecting the data plane: {0}")]
    Connect(String),
    /// A `TIDEMILL_*` / torchrun environment variable is missing or malformed.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// A dp×tp×pp×ep layout that cannot run (see [`crate::Layout`]).
    #[error("parallel: {0}")]
    Layout(#[from] crate::LayoutError),
    /// A call with arguments that cannot work (wrong lengths, rank out of range).
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
