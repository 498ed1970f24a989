//! Tidal jobs: train only inside windows (the nights the inference GPUs are lent), stop
//! before each window closes, hand the GPUs back, resume in the next window.
//!
//! - [`window`]: when the windows are (`[tidal]`, `--until`), pure.
//! - [`decide`]: at each step boundary, another step or the final checkpoint or stop, pure.
//! - [`worker`]: the workers' side: the deadline (the window's, or a preemption's through
//!   the agent's control file), the estimates, the verdict agreed by every rank.
//! - [`handback`]: the agents' check that a node's GPUs are free, and the hooks.
//! - [`signals`]: SIGTERM, SIGUSR1 and SIGINT noted for a tidal run's whole life.
//! - [`ledger`], [`status`]: the goodput ledger of a run's windows, read back from its
//!   event log, and `launch status`.
//!
//! The loop over windows that runs the job is the launcher's (`crate::launch`).

pub mod decide;
pub mod handback;
pub mod ledger;
mod picture;
pub mod signals;
pub mod status;
pub mod window;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use decide::{Estimates, Verdict};
pub use window::{Schedule, Window};

pub use crate::error::YIELDED;
pub use crate::events::CloseReason;

/// What the workers of a tidal window run against (in the coordinator's generation, so
/// every node's workers get the same).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowWork {
    /// Unix seconds by which every worker must have exited: the agents SIGKILL what is
    /// left then (the window's end − `handback_margin_s` − the agent's reaping allowance).
    pub deadline: f64,
    pub estimates: Estimates,
}

/// How long before the hand-back the agents kill what is left of the workers: time to
/// reap them and check the GPUs are free.
pub const REAP_ALLOWANCE_S: f64 = 0.5;

/// Unix seconds now.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
