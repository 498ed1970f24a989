//! What a training job writes before it runs, wherever it runs (one process, or node 0
//! of a launched job): the run directory with the resolved config, and the `start` event.

use std::path::Path;

use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::events::{Mode, Start};
use crate::plan::Decided;

/// Create the run directory, drop a previous run's export (it must never pass for this
/// run's) and write the resolved config.
pub fn prepare_run_dir(cfg: &JobConfig) -> Result<()> {
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    let export = run_dir.join("export");
    if export.exists() {
        std::fs::remove_dir_all(&export).map_err(io(&export))?;
    }
    checkpoint::atomic_write(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `start` event of a training job of `world` ranks.
pub fn start(cfg: &JobConfig, world: usize, decided: Option<&Decided>) -> Start {
    Start {
        job: Some(cfg.job.name.clone()),
        model: Some(cfg.model.path.clone()),
        mode: Some(if cfg.lora.is_some() {
            Mode::Lora
        } else {
            Mode::Full
        }),
        program: None,
        args: Vec::new(),
        world_size: world,
        nnodes: cfg.launch.nnodes,
        nproc_per_node: cfg.launch.nproc_per_node,
        plan: decided.map(|d| d.event(world)),
    }
}
