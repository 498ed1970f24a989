//! The worker side of a launched job: who am I (rank, world, node), the data-plane group,
//! and a progress reporter that never blocks training.
//!
//! `launch train` and `launch run -- PROGRAM` start one worker process per device with
//! the torchrun variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`) plus `TIDEMILL_*` ones (see [`mod@env`]). [`init`] reads them,
//! says hello to the node's agent, receives the peer table the coordinator assembled and
//! connects the TCP data plane:
//!
//! ```no_run
//! # use tidemill_parallel as parallel;
//! use parallel::{Collectives, ReduceOp};
//! let ctx = parallel::init().expect("launched by `launch run`");
//! let mut x = vec![ctx.rank as f32];
//! ctx.comm.all_reduce(&mut x, ReduceOp::Sum).expect("all_reduce");
//! // The trainer reports its steps itself; events of your own go the same way.
//! ctx.reporter.event(&serde_json::json!({"event": "hello", "sum": x[0]}));
//! ```
//!
//! Run without a launcher (no `RANK` in the environment) it returns a world of one.

pub mod env;
pub mod link;
pub mod position;
mod reporter;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub use link::{Phase, Relayed, StepReport, ToAgent};
pub use reporter::{install, report, Report, Reporter, Sink};

use crate::comm::{Communicator, SoloComm};
use crate::error::{Error, Result};
use crate::tcp::{TcpComm, TcpOptions};

/// One worker's place in the job.
pub struct RankContext {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    /// Incremented by the coordinator each time the job restarts.
    pub generation: u64,
    /// The world group on the data plane: TCP as [`init`] connects it; [`Self::use_nccl`]
    /// puts NCCL on it for device memory.
    pub comm: Arc<dyn Communicator>,
    /// How long a collective may wait for a peer (`TIDEMILL_COLLECTIVE_TIMEOUT_S`).
    pub collective_timeout: Duration,
    /// Progress and events to the agent (a no-op without one); also the process's
    /// reporter ([`report`]) until this is dropped.
    pub reporter: Reporter,
}

impl RankContext {
    /// A world of one, no agent.
    pub fn solo() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            node_rank: 0,
            generation: 0,
            comm: Arc::new(SoloComm::new()),
            collective_timeout: Duration::from_secs(300),
            reporter: Reporter::disabled(),
        }
    }

    /// Move device memory over NCCL on this rank's GPU (`local_rank`): the world group
    /// and every group split from it then hand tensors' device buffers to NCCL, while host
    /// buffers stay on TCP ([`crate::NcclComm`]). Every rank calls this at the same point.
    /// Fails with a message naming what is missing (the `cuda` feature, libnccl.so.2).
    pub fn use_nccl(&mut self) -> Result<()> {
        self.comm =
            crate::nccl::group(self.comm.clone(), self.local_rank, self.collective_timeout)?;
        Ok(())
    }
}

/// The rank context from the environment a launcher set; a world of one when `RANK` is
/// not set.
pub fn init() -> Result<RankContext> {
    let Some(vars) = env::WorkerEnv::from_env()? else {
        return Ok(RankContext::solo());
    };
    let listener = TcpListener::bind((vars.data_host.as_str(), 0)).map_err(|e| {
        Error::Connect(format!(
            "binding a data-plane port on {}: {e}",
            vars.data_host
        ))
    })?;
    let data_addr = listener
        .local_addr()
        .map_err(|e| Error::Connect(e.to_string()))?;
    let agent = connect_agent(&vars.agent_addr, vars.connect_timeout)?;
    let connected = link::hello(&agent, vars.rank, data_addr, vars.connect_timeout).and_then(
        |(peers, nonce)| {
            if peers.len() != vars.world_size {
                return Err(Error::Connect(format!(
                    "the agent sent {} peer addresses for a world of {}",
                    peers.len(),
                    vars.world_size
                )));
            }
            let opts = TcpOptions {
                timeout: vars.collective_timeout,
                connect_timeout: vars.connect_timeout,
                nonce,
            };
            TcpComm::connect(vars.rank, &peers, listener, opts)
        },
    );
    let comm = match connected {
        Ok(c) => c,
        Err(e) => {
            // Tell the agent why, so the job's fault says more than an exit status.
            let why = link::ToAgent::<()>::Error {
                rank: vars.rank,
                message: e.to_string(),
            };
            let _ = link::write_line(&agent, &why);
            return Err(e);
        }
    };
    let mut out = std::io::BufWriter::new(agent);
    let sink: Sink = Box::new(move |line| {
        use std::io::Write;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    });
    let reporter = Reporter::start(vars.rank, sink);
    install(&reporter);
    Ok(RankContext {
        rank: vars.rank,
        world_size: vars.world_size,
        local_rank: vars.local_rank,
        local_world_size: vars.local_world_size,
        node_rank: vars.node_rank,
        generation: vars.generation,
        comm: Arc::new(comm),
        collective_timeout: vars.collective_timeout,
        reporter,
    })
}

fn connect_agent(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let parsed: SocketAddr = addr.parse().map_err(|e| Error::Env {
        var: env::AGENT_ADDR.into(),
        message: format!("`{addr}`: {e}"),
    })?;
    let stream = TcpStream::connect_timeout(&parsed, timeout)
        .map_err(|e| Error::Connect(format!("reaching the agent at {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
