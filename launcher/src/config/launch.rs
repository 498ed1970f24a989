//! `[launch]`: how `launch` starts workers (torchrun's flags; the command line overrides
//! these) and the coordinator's fault policy. One type: the coordinator detects and
//! decides with exactly these values, its tests included; every default is declared in
//! [`Default`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use parallel::runtime::env::MAX_SECONDS;

/// `launch.data_plane`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    #[default]
    Auto,
    Tcp,
    Nccl,
}

impl DataPlane {
    /// Whether a rank of a world of `world` ranks on `device` moves tensors over NCCL.
    pub fn nccl(self, device: super::Device, world: usize) -> bool {
        match self {
            DataPlane::Auto => device == super::Device::Cuda && world > 1,
            DataPlane::Nccl => true,
            DataPlane::Tcp => false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LaunchOptions {
    /// Worker processes on this node (`--nproc-per-node`).
    pub nproc_per_node: usize,
    /// Nodes in the job (`--nnodes`).
    pub nnodes: usize,
    /// This node's index, 0 hosts the coordinator (`--node-rank`).
    pub node_rank: usize,
    /// HOST:PORT of the coordinator on node 0 (`--rdzv`); needed when nnodes > 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdzv: Option<String>,
    /// Address this node's workers listen on for the data plane; default: the address
    /// this node reaches the coordinator from (127.0.0.1 on one machine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Seconds a collective may wait for a peer before failing with an error naming it
    /// (an NCCL collective is aborted then).
    pub collective_timeout_s: f64,
    /// What moves tensors between GPU ranks: `auto` (NCCL when `job.device = "cuda"` and
    /// the world has more than one rank, else TCP), `nccl` (also at world 1: checks the
    /// NCCL install), `tcp` (through host memory, never NCCL).
    pub data_plane: DataPlane,
    /// Seconds between an agent's heartbeats (they carry the workers' reports).
    pub heartbeat_interval_s: f64,
    /// Seconds without a heartbeat after which the coordinator declares a node lost.
    pub heartbeat_timeout_s: f64,
    /// A hang: no progress for max(hang_factor × the median recent step, hang_floor_s).
    pub hang_factor: f64,
    pub hang_floor_s: f64,
    /// A straggler: busy (not waiting for peers) over straggler_factor × the median for
    /// straggler_steps steps in a row.
    pub straggler_factor: f64,
    pub straggler_steps: u32,
    /// Restarts (of any kind) before the job gives up.
    pub max_restarts: u32,
    /// Fewest nodes the job may shrink to.
    pub min_nodes: usize,
    /// Crashes or hangs on one node after which it is excluded.
    pub exclude_after: u32,
    /// Exclude a straggling node (else it is only reported).
    pub exclude_stragglers: bool,
    /// This agent is a spare: it waits, and takes a lost node's place.
    pub spare: bool,
    /// Seconds to wait for every node to join.
    pub rdzv_timeout_s: f64,
    /// File whose first line is the control plane's shared secret (same on every node;
    /// `TIDEMILL_TOKEN` takes precedence). Required with nnodes > 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// TLS for the control plane: the CA (PEM) every agent checks the coordinator's
    /// certificate against; setting it turns TLS on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Node 0's certificate and private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The name to check in the coordinator's certificate (default: the host of `rdzv`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_domain: Option<String>,
    /// Take node rank, node count, rendezvous (and GPUs per node) from Slurm's or a
    /// Kubernetes Indexed Job's environment (`config::scheduler`); unset: only for tidal
    /// jobs (`[tidal]` or `--until`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_scheduler: Option<bool>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            nproc_per_node: 1,
            nnodes: 1,
            node_rank: 0,
            rdzv: None,
            host: None,
            collective_timeout_s: 300.0,
            data_plane: DataPlane::Auto,
            heartbeat_interval_s: 1.0,
            heartbeat_timeout_s: 3.0,
            hang_factor: 10.0,
            hang_floor_s: 120.0,
            straggler_factor: 1.5,
            straggler_steps: 3,
            max_restarts: 3,
            min_nodes: 1,
            exclude_after: 3,
            exclude_stragglers: false,
            spare: false,
            rdzv_timeout_s: 300.0,
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_domain: None,
            from_scheduler: None,
        }
    }
}

impl LaunchOptions {
    /// The checks torchrun makes on its flags, and the fault policy's ranges, naming the
    /// key.
    pub fn validate(&self) -> Result<(), String> {
        if self.nproc_per_node == 0 {
            return Err("launch.nproc_per_node: must be at least 1".into());
        }
        if self.nnodes == 0 {
            return Err("launch.nnodes: must be at least 1".into());
        }
        if self.node_rank >= self.nnodes && !self.spare {
            return Err(format!(
                "launch.node_rank: {} must be below nnodes {}",
                self.node_rank, self.nnodes
            ));
        }
        if self.nnodes > 1 && self.rdzv.is_none() {
            return Err("launch.rdzv: HOST:PORT of node 0 is required when nnodes > 1".into());
        }
        if let Some(r) = &self.rdzv {
            let ok = r
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("launch.rdzv: `{r}`: expected HOST:PORT"));
            }
        }
        for (key, v) in [
            ("collective_timeout_s", self.collective_timeout_s),
            ("heartbeat_interval_s", self.heartbeat_interval_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
            ("rdzv_timeout_s", self.rdzv_timeout_s),
            ("hang_floor_s", self.hang_floor_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
                return Err(format!(
                    "launch.{key}: {v} must be a positive number of seconds, at most {MAX_SECONDS}"
                ));
            }
        }
        if self.spare && self.node_rank < self.nnodes {
            return Err(format!(
                "launch.node_rank: a spare needs a node rank of its own, at least nnodes = {} \
                 (it is {})",
                self.nnodes, self.node_rank
            ));
        }
        if self.heartbeat_interval_s < 0.01 {
            return Err(format!(
                "launch.heartbeat_interval_s: {} is below 0.01 s",
                self.heartbeat_interval_s
            ));
        }
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s {
            return Err(format!(
                "launch.heartbeat_timeout_s: {} must be longer than heartbeat_interval_s {}",
                self.heartbeat_timeout_s, self.heartbeat_interval_s
            ));
        }
        for (key, v) in [
            ("hang_factor", self.hang_factor),
            ("straggler_factor", self.straggler_factor),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return Err(format!("launch.{key}: {v} must be a number ≥ 1"));
            }
        }
        if self.straggler_steps == 0 || self.exclude_after == 0 || self.min_nodes == 0 {
            return Err(
                "launch.straggler_steps, exclude_after and min_nodes: must be at least 1".into(),
            );
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_interval_s)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_timeout_s)
    }

    pub fn hang_floor(&self) -> Duration {
        Duration::from_secs_f64(self.hang_floor_s)
    }

    pub fn rdzv_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.rdzv_timeout_s)
    }

    pub fn collective_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.collective_timeout_s)
    }

    /// How long a rank's position reports may stop before it counts as silent: they ride
    /// on the heartbeats, so a healthy rank is heard from every beat.
    pub fn position_silence(&self) -> Duration {
        Duration::from_secs_f64((2.0 * self.heartbeat_interval_s).max(2.0))
    }
}
