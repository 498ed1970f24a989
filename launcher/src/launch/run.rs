//! One run of `launch train` on this node: decide the layout (node 0), prepare the run
//! directory, and run this node's agent (and node 0's coordinator) until the job finishes,
//! or, in a tidal window, until the window ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::agent::{self, AgentTide, LaunchPlan, Outcome, WorkerCommand};
use crate::config::JobConfig;
use crate::coordinator::{Generation, Replan};
use crate::error::{Error, Result};
use crate::plan::Decided;
use crate::tidal::{Estimates, WindowWork};

fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::Launch(format!("locating the launch binary: {e}")))
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
