//! `launch train` and `launch run`: check the job, decide its layout (node 0), prepare the
//! run directory and run this node's agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::{self, AgentTide, LaunchPlan, Outcome, WorkerCommand};
use crate::config::{JobConfig, LaunchOptions};
use crate::coordinator::{Generation, Replan};
use crate::error::{Error, Result};
use crate::events::Start;
use crate::plan::Decided;
use crate::tidal::{Estimates, WindowWork};

fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::Launch(format!("locating the launch binary: {e}")))
}

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
        return crate::tidal::run::train(&cfg, config, overrides, until);
    }
    run_job(&cfg, config, overrides, None).map(|_| ())
}

/// `launch train JOB --rehearse SPEED` (`crate::tidal::run::rehearse`), after the same
/// checks as a real run.
pub fn rehearse(config: &Path, overrides: &[String], speed: f64) -> Result<()> {
    let (cfg, overrides) = load(config, overrides, true)?;
    let overrides = &overrides[..];
    crate::preflight::check(&cfg)?;
    crate::auth::Token::resolve(&cfg.launch)?;
    crate::tls::Tls::load(&cfg.launch)?;
    crate::tidal::run::rehearse(&cfg, config, overrides, speed)
}

/// Run the job on this node (its coordinator too on node 0) until it finishes, or, in a
/// tidal window (`tide`: the window and what the workers' estimates start from), until the
/// window ends.
pub fn run_job(
    cfg: &JobConfig,
    config: &Path,
    overrides: &[String],
    tide: Option<(AgentTide, Estimates)>,
) -> Result<Outcome> {
    let l = &cfg.launch;
    let world = l.nproc_per_node * l.nnodes;
    let lead = l.node_rank == 0;
    let decided = if lead {
        let decided = crate::plan::decide(cfg, config, world, l.nproc_per_node)?;
        announce(&decided);
        let mut resolved = cfg.clone();
        decided.apply(&mut resolved);
        crate::job::prepare_run_dir(&resolved)?;
        Some(decided)
    } else {
        None
    };
    let mut args = vec!["worker".to_string(), config.display().to_string()];
    for o in overrides {
        args.extend(["--set".to_string(), o.clone()]);
    }
    let start = crate::job::start(cfg, world, decided.as_ref());
    // Before a step was measured: the strategy search's prediction, with the safety
    // factor, and at most a quarter of the window (a wrong prediction must not keep every
    // window from its first step; the deadline's kill guards the hand-back anyway).
    let predicted = decided
        .as_ref()
        .and_then(|d| d.auto.as_ref())
        .zip(tide.as_ref())
        .map(|(a, (t, _))| {
            let safety = cfg.tidal.as_ref().map_or(2.0, |t| t.safety_factor);
            let room = (t.window.deadline - t.window.window.start).max(0.0) / 4.0;
            (a.candidate.step_time_s * safety).min(room)
        });
    let window = tide.as_ref().map(|(t, estimates)| WindowWork {
        deadline: t.window.deadline,
        estimates: Estimates {
            step_s: estimates.step_s.or(predicted),
            ..*estimates
        },
    });
    agent::run(LaunchPlan {
        launch: cfg.launch.clone(),
        run_dir: cfg.run_dir(),
        worker: WorkerCommand {
            program: current_exe()?,
            args,
            env: Vec::new(),
            ignore_stop_signals: false,
        },
        start,
        max_steps: Some(cfg.training.max_steps),
        first: decided.map(|d| Generation {
            plan: d,
            resume: false,
            window,
        }),
        replan: Some(replan(cfg.clone(), config.to_path_buf())),
        tidal: tide.map(|t| t.0),
    })
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

/// The plan as `launch train` prints it under `strategy = "auto"`.
fn announce(decided: &Decided) {
    if let Some(a) = &decided.auto {
        let c = &a.candidate;
        println!(
            "plan: {} (predicted {:.3} s/step, {:.2} GiB/device on {}; {} candidates, {} rejected; `launch plan` explains)",
            c.candidate, c.step_time_s, c.mem_gb_per_gpu, a.hardware, a.considered, a.rejected
        );
    }
}

/// The layout of a restarted generation of a training job: the current one if it still
/// fits the world (a crash, a hang, a spare of the same size); otherwise (nodes were lost,
/// or a spare differs) the strategy search re-plans it, keeping the job file's pins if it
/// can, else unpinned.
fn replan(cfg: JobConfig, file: PathBuf) -> Replan {
    Arc::new(move |now: usize, local: usize, current: Option<&Decided>| {
        let fits = |plan: &&Decided| plan.parallel.layout(now, Some(local)).is_ok();
        if let Some(plan) = current.filter(fits) {
            return Ok(plan.clone());
        }
        let mut auto = cfg.clone();
        auto.parallel.strategy = trainer::Strategy::Auto;
        crate::plan::decide(&auto, &file, now, local)
            .or_else(|_| {
                let p = &mut auto.parallel;
                (p.dp, p.tp, p.pp, p.ep) = (None, 1, 1, 1);
                (p.micro_batch, p.virtual_stages, p.zero1, p.stage_layers) =
                    (None, None, false, None);
                crate::plan::decide(&auto, &file, now, local)
            })
            .map_err(|e| e.to_string())
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
