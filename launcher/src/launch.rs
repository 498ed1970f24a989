//! `launch train` and `launch run`: check the job, prepare the run directory (node 0) and
//! run this node's agent.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::agent::{self, LaunchPlan, WorkerCommand};
use crate::config::{JobConfig, LaunchSection};
use crate::error::{Error, Result};
use crate::train;

fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::Launch(format!("locating the launch binary: {e}")))
}

/// `launch train CONFIG [--set ...] [--nproc-per-node N ...]`.
pub fn train(config: &Path, overrides: &[String]) -> Result<()> {
    let cfg = JobConfig::load(config, overrides)?;
    train::preflight(&cfg)?;
    // A multi-node job without its control-plane secret is refused before anything starts.
    crate::auth::Token::resolve(&cfg.launch)?;
    let world = cfg.launch.nproc_per_node * cfg.launch.nnodes;
    // Under strategy = "auto" the search picks the layout (each worker repeats it).
    let (cfg, chosen) = crate::plan::resolve(&cfg, config, world, cfg.launch.nproc_per_node)?;
    if let Some(c) = &chosen {
        println!(
            "plan: {} (predicted {:.3} s/step, {}/device on {}; {} candidates, {} rejected; `launch plan` explains)",
            c.priced.candidate,
            c.priced.estimate.step_time_s,
            parallel::plan::human_bytes(c.priced.estimate.memory.total()),
            c.hardware,
            c.considered,
            c.rejected
        );
    }
    let t = &cfg.training;
    // Refuse a layout that cannot work before any process starts.
    let model = trainer::ModelConfig::from_dir(&cfg.model.path)?;
    cfg.parallel
        .layout(world, Some(cfg.launch.nproc_per_node))
        .and_then(|layout| crate::layout::check_job(&cfg.parallel, &layout, &model, t))
        .map_err(|message| Error::Config {
            file: config.to_path_buf(),
            message,
        })?;
    if cfg.launch.node_rank == 0 {
        train::prepare_run_dir(&cfg)?;
    }
    let mut args = vec!["worker".to_string(), config.display().to_string()];
    for o in overrides {
        args.push("--set".into());
        args.push(o.clone());
    }
    agent::run(LaunchPlan {
        launch: cfg.launch.clone(),
        run_dir: cfg.run_dir(),
        worker: WorkerCommand {
            program: current_exe()?,
            args,
        },
        start: train::start_fields(&cfg, world, chosen.as_ref()),
        max_steps: Some(t.max_steps),
    })
}

/// `launch run [flags] -- PROGRAM ARGS...`.
pub fn run_program(
    overrides: &[String],
    run_dir: Option<PathBuf>,
    collective_timeout: Option<f64>,
    program: &[String],
) -> Result<()> {
    let mut all = overrides.to_vec();
    if let Some(t) = collective_timeout {
        all.push(format!("launch.collective_timeout_s={t}"));
    }
    let launch = LaunchSection::from_overrides(&all)?;
    let (exe, args) = program.split_first().ok_or_else(|| Error::Config {
        file: "command line".into(),
        message: "launch run: no program given after `--`".into(),
    })?;
    let name = Path::new(exe)
        .file_stem()
        .map_or("run".into(), |s| s.to_string_lossy().to_string());
    let run_dir = run_dir.unwrap_or_else(|| Path::new("runs").join(&name));
    if launch.node_rank == 0 {
        std::fs::create_dir_all(&run_dir).map_err(|source| Error::Io {
            path: run_dir.clone(),
            source,
        })?;
    }
    let world = launch.nproc_per_node * launch.nnodes;
    agent::run(LaunchPlan {
        start: json!({"program": exe, "args": args, "world_size": world, "nnodes": launch.nnodes,
                      "nproc_per_node": launch.nproc_per_node}),
        launch,
        run_dir,
        worker: WorkerCommand {
            program: PathBuf::from(exe),
            args: args.to_vec(),
        },
        max_steps: None,
    })
}
