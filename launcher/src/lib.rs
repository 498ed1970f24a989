//! The `launch` CLI of tidemill: TOML job files (the library's option types, one section
//! each), the node agent and the job's coordinator, the run directory and its event log;
//! `train`, `run`, `eval`, `export`, `convert` and `plan`.
//!
//! Public: the job file ([`JobConfig`] and its sections), training a job in this process
//! ([`run`]), the event log's types ([`events`]), the strategy search's view of a job
//! ([`plan`]), and what a health check needs ([`probe`], [`TOKEN_ENV`], [`Tls`]). The
//! rest is the CLI's own.

mod agent;
mod auth;
pub mod cli;
mod comm_check;
mod config;
mod convert;
mod coordinator;
mod error;
mod eval;
pub mod events;
mod export;
mod hooks;
mod job;
mod launch;
pub mod plan;
mod preflight;
mod progress;
mod rpc;
mod saving;
mod setup;
pub mod tidal;
mod tls;
mod train;

pub use agent::probe;
pub use auth::TOKEN_ENV;
pub use config::{
    CheckpointOptions, Device, ExportSection, JobConfig, JobSection, LaunchOptions, ModelSection,
    TidalOptions,
};
pub use error::{chain, Error, Result};
pub use tls::Tls;
pub use train::run;
