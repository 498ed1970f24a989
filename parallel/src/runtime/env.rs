//! The environment contract between a launcher and its workers.
//!
//! torchrun-compatible: `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT` (the coordinator's address). tidemill's own:
//! `TIDEMILL_AGENT_ADDR` (the node agent's worker link), `TIDEMILL_NODE_RANK`,
//! `TIDEMILL_NNODES`, `TIDEMILL_GENERATION`, `TIDEMILL_RUN_DIR`, `TIDEMILL_DATA_HOST`
//! (the address this node's workers bind the data plane on), `TIDEMILL_COLLECTIVE_TIMEOUT_S`
//! and `TIDEMILL_CONNECT_TIMEOUT_S`.

use std::time::Duration;

use crate::error::{Error, Result};

pub const RANK: &str = "RANK";
pub const LOCAL_RANK: &str = "LOCAL_RANK";
pub const WORLD_SIZE: &str = "WORLD_SIZE";
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
pub const MASTER_ADDR: &str = "MASTER_ADDR";
pub const MASTER_PORT: &str = "MASTER_PORT";
pub const AGENT_ADDR: &str = "TIDEMILL_AGENT_ADDR";
pub const NODE_RANK: &str = "TIDEMILL_NODE_RANK";
pub const NNODES: &str = "TIDEMILL_NNODES";
pub const GENERATION: &str = "TIDEMILL_GENERATION";
pub const RUN_DIR: &str = "TIDEMILL_RUN_DIR";
pub const DATA_HOST: &str = "TIDEMILL_DATA_HOST";
pub const COLLECTIVE_TIMEOUT_S: &str = "TIDEMILL_COLLECTIVE_TIMEOUT_S";
pub const CONNECT_TIMEOUT_S: &str = "TIDEMILL_CONNECT_TIMEOUT_S";

/// The longest timeout accepted (about four months): larger ones overflow clock arithmetic.
pub const MAX_SECONDS: f64 = 1e7;

/// Everything a worker reads from its environment.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub nnodes: usize,
    pub generation: u64,
    pub agent_addr: String,
    pub data_host: String,
    /// The coordinator's address (torchrun's MASTER_ADDR / MASTER_PORT; informational).
    pub master_addr: String,
    pub master_port: u16,
    pub run_dir: Option<std::path::PathBuf>,
    pub collective_timeout: Duration,
    pub connect_timeout: Duration,
}

impl WorkerEnv {
    /// The variables a launcher sets for this worker: what [`WorkerEnv::from_lookup`] reads.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (RANK, self.rank.to_string()),
            (LOCAL_RANK, self.local_rank.to_string()),
            (WORLD_SIZE, self.world_size.to_string()),
            (LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (MASTER_ADDR, self.master_addr.clone()),
            (MASTER_PORT, self.master_port.to_string()),
            (AGENT_ADDR, self.agent_addr.clone()),
            (NODE_RANK, self.node_rank.to_string()),
            (NNODES, self.nnodes.to_string()),
            (GENERATION, self.generation.to_string()),
            (DATA_HOST, self.data_host.clone()),
            (
                COLLECTIVE_TIMEOUT_S,
                self.collective_timeout.as_secs_f64().to_string(),
            ),
            (
                CONNECT_TIMEOUT_S,
                self.connect_timeout.as_secs_f64().to_string(),
            ),
        ];
        if let Some(dir) = &self.run_dir {
            v.push((RUN_DIR, dir.display().to_string()));
        }
        v
    }

    /// `None` when `RANK` is unset (not launched); an error naming the variable when one
    /// is missing or malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if get(RANK).is_none() {
            return Ok(None);
        }
        let required = |var: &str| {
            get(var).ok_or_else(|| Error::Env {
                var: var.into(),
                message: "not set (workers are started by `launch train` or `launch run`)".into(),
            })
        };
        let number = |var: &str, default: Option<u64>| -> Result<u64> {
            match (get(var), default) {
                (None, Some(d)) => Ok(d),
                (None, None) => required(var).map(|_| 0),
                (Some(v), _) => v.trim().parse().map_err(|e| Error::Env {
                    var: var.into(),
                    message: format!("`{v}`: {e}"),
                }),
            }
        };
        let seconds = |var: &str, default: f64| -> Result<Duration> {
            match get(var) {
                None => Ok(Duration::from_secs_f64(default)),
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(s) if s.is_finite() && s > 0.0 && s <= MAX_SECONDS => {
                        Ok(Duration::from_secs_f64(s))
                    }
                    _ => Err(Error::Env {
                        var: var.into(),
                        message: format!(
                            "`{v}`: expected a positive number of seconds, at most {MAX_SECONDS}"
                        ),
                    }),
                },
            }
        };
        let env = Self {
            rank: number(RANK, None)? as usize,
            local_rank: number(LOCAL_RANK, None)? as usize,
            world_size: number(WORLD_SIZE, None)? as usize,
            local_world_size: number(LOCAL_WORLD_SIZE, None)? as usize,
            node_rank: number(NODE_RANK, Some(0))? as usize,
            nnodes: number(NNODES, Some(1))? as usize,
            generation: number(GENERATION, Some(0))?,
            agent_addr: required(AGENT_ADDR)?,
            data_host: get(DATA_HOST).unwrap_or_else(|| "127.0.0.1".into()),
            master_addr: get(MASTER_ADDR).unwrap_or_default(),
            master_port: number(MASTER_PORT, Some(0))? as u16,
            run_dir: get(RUN_DIR).map(std::path::PathBuf::from),
            collective_timeout: seconds(COLLECTIVE_TIMEOUT_S, 300.0)?,
            connect_timeout: seconds(CONNECT_TIMEOUT_S, 120.0)?,
        };
        if env.rank >= env.world_size || env.local_rank >= env.local_world_size {
            return Err(Error::Env {
                var: RANK.into(),
                message: format!(
                    "rank {} / local rank {} outside world {} / local world {}",
                    env.rank, env.local_rank, env.world_size, env.local_world_size
                ),
            });
        }
        Ok(Some(env))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_the_contract_and_names_bad_variables() {
        assert_eq!(
            WorkerEnv::from_lookup(lookup(&[])).expect("no launcher"),
            None
        );
        let base = [
            (RANK, "3"),
            (LOCAL_RANK, "1"),
            (WORLD_SIZE, "4"),
            (LOCAL_WORLD_SIZE, "2"),
            (AGENT_ADDR, "127.0.0.1:5000"),
            (COLLECTIVE_TIMEOUT_S, "2.5"),
        ];
        let env = WorkerEnv::from_lookup(lookup(&base))
            .expect("valid")
            .expect("launched");
        assert_eq!(
            (env.rank, env.local_rank, env.world_size, env.nnodes),
            (3, 1, 4, 1)
        );
        assert_eq!(env.collective_timeout, Duration::from_millis(2500));
        let mut bad = base.to_vec();
        bad[2] = (WORLD_SIZE, "four");
        let err = WorkerEnv::from_lookup(lookup(&bad))
            .expect_err("malformed")
            .to_string();
        assert!(err.contains("WORLD_SIZE") && err.contains("four"), "{err}");
        let err = WorkerEnv::from_lookup(lookup(&base[..4]))
            .expect_err("no agent")
            .to_string();
        assert!(err.contains(AGENT_ADDR), "{err}");
        bad = base.to_vec();
        bad[0] = (RANK, "4");
        assert!(
            WorkerEnv::from_lookup(lookup(&bad)).is_err(),
            "rank outside the world"
        );
    }
}
