//! The `launch` CLI of tidemill: TOML job files, the run directory and its event log,
//! `train`, `eval` and `export`.

pub mod cli;
pub mod config;
mod error;
pub mod eval;
pub mod events;
pub mod export;
pub mod setup;
pub mod train;

pub use config::JobConfig;
pub use error::{Error, Result};
