//! `launch train` and `launch run`: check the job, decide its layout (node 0), prepare the
//! run directory and run this node's agent (`run`); a tidal job's loop over its windows
//! (`tidal`).

mod run;
mod tidal;

pub use tidal::preempt;

use std::path::{Path, PathBuf};

use crate::agent::{self, LaunchPlan, WorkerCommand};
use crate::config::{JobConfig, LaunchOptions};
use crate::error::{Error, Result};
use crate::events::Start;

/// `launch train CONFIG [--set ...] [--nproc-per-node N ...] [--until TIME]`: every input
/// file is checked and the layout decided (the strategy search runs here, once, on node 0)
/// before any worker starts; workers get the decided layout from the coordinator. A job
/// with `[tidal]` windows, or `--until`, trains only inside its windows (`crate::tidal`).
pub fn train(config: &Path, overrides: &[String], until: Option<&str>) -> Result<()> {
    let (cfg, overrides) = load(config, overrides, until.is_some())?;
    let overrides = &overrides[..];
    crate::preflight::check(&cfg)?;
    // A multi-node job without its control-plane secret is refused before anything starts.
    crate::auth::Token::resolve(&cfg.launch)?;
    crate::tls::Tls::load(&cfg.launch)?;
    if cfg.tidal.is_some() || until.is_some() {
        return tidal::train(&cfg, config, overrides, until);
    }
    run::run_job(&cfg, config, overrides, None).map(|_| ())
}

/// `launch train JOB --rehearse SPEED` (`tidal::rehearse`), after the same
/// checks as a real run.
pub fn rehearse(config: &Path, overrides: &[String], speed: f64) -> Result<()> {
    let (cfg, overrides) = load(config, overrides, true)?;
    let overrides = &overrides[..];
    crate::preflight::check(&cfg)?;
    crate::auth::Token::resolve(&cfg.launch)?;
    crate::tls::Tls::load(&cfg.launch)?;
    tidal::rehearse(&cfg, config, overrides, speed)
}

/// The job file with `overrides`, and, where `launch.from_scheduler` says so (by default
/// for a tidal job: `[tidal]`, or `tidal` true), the scheduler's environment before them
/// (the command line wins); the overrides the workers get.
fn load(config: &Path, overrides: &[String], tidal: bool) -> Result<(JobConfig, Vec<String>)> {
    let wants = |c: &JobConfig| {
        c.launch
            .from_scheduler
            .unwrap_or(tidal || c.tidal.is_some())
    };
    let with_scheduler = || -> Result<(JobConfig, Vec<String>)> {
        let mut all = crate::config::scheduler::from_env().map_err(|message| Error::Config {
            file: "environment".into(),
            message,
        })?;
        all.extend(overrides.iter().cloned());
        Ok((JobConfig::load(config, &all)?, all))
    };
    match JobConfig::load(config, overrides) {
        Ok(cfg) if wants(&cfg) => with_scheduler(),
        Ok(cfg) => Ok((cfg, overrides.to_vec())),
        // What the file leaves to the scheduler (`launch.rdzv` of a multi-node job) is
        // missing until its environment is read: the job as the scheduler completes it,
        // if it is one that takes it, else the first error.
        Err(first) => match with_scheduler() {
            Ok((cfg, all)) if wants(&cfg) => Ok((cfg, all)),
            _ => Err(first),
        },
    }
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
    let launch = LaunchOptions::from_overrides(&all)?;
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
    let start = Start {
        job: None,
        model: None,
        mode: None,
        program: Some(exe.clone()),
        args: args.to_vec(),
        world_size: world,
        nnodes: launch.nnodes,
        nproc_per_node: launch.nproc_per_node,
        plan: None,
    };
    agent::run(LaunchPlan {
        start,
        launch,
        run_dir,
        worker: WorkerCommand {
            program: PathBuf::from(exe),
            args: args.to_vec(),
            env: Vec::new(),
            ignore_stop_signals: false,
        },
        max_steps: None,
        first: None,
        replan: None,
        tidal: None,
    })
    .map(|_| ())
}
