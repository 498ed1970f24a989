//! The `launch` CLI of tidemill: TOML job files, the node agent and the job's coordinator,
//! the run directory and its event log; `train`, `run`, `eval`, `export`, `convert` and `plan`.

pub mod agent;
pub mod auth;
pub mod cli;
pub mod config;
pub mod convert;
pub mod coordinator;
mod error;
pub mod eval;
pub mod events;
pub mod export;
pub mod launch;
pub mod layout;
pub mod plan;
pub mod progress;
mod rpc;
pub mod saving;
pub mod setup;
pub mod tls;
pub mod train;

pub use config::JobConfig;
pub use error::{chain, Error, Result};
