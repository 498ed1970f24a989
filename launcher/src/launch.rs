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
    let as_written = cfg.clone();
    train::preflight(&cfg)?;
    // A multi-node job without its control-plane secret is refused before anything starts.
    crate::auth::Token::resolve(&cfg.launch)?;
    crate::tls::Tls::load(&cfg.launch)?;
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
        replan: Some(replan(as_written, config.to_path_buf(), world)),
    })
}

/// How a restarted generation of a training job runs: it resumes from the last committed
/// checkpoint; with a world other than `world` (nodes were lost or a spare differs) the
/// strategy search re-plans the layout (keeping the job file's pins if it can), and the
/// workers get it as `--set` overrides. The plan goes into the `restart` event.
fn replan(cfg: JobConfig, file: PathBuf, world: usize) -> crate::coordinator::Replan {
    std::sync::Arc::new(move |now: usize, local: usize| {
        let mut args = vec!["--set".to_string(), "checkpoint.resume=true".to_string()];
        if now == world {
            return Ok((args, json!({"layout": "unchanged", "world": now})));
        }
        let mut auto = cfg.clone();
        auto.parallel.strategy = "auto".into();
        let resolved = crate::plan::resolve(&auto, &file, now, local).or_else(|_| {
            let p = &mut auto.parallel;
            (p.dp, p.tp, p.pp, p.ep) = (None, 1, 1, 1);
            (p.micro_batch, p.virtual_stages, p.zero1, p.stage_layers) = (None, None, false, None);
            crate::plan::resolve(&auto, &file, now, local)
        });
        let (resolved, chosen) = resolved.map_err(|e| e.to_string())?;
        let p = &resolved.parallel;
        let mut sets = vec![
            "parallel.strategy=\"manual\"".to_string(),
            format!("parallel.dp={}", p.dp.unwrap_or(1)),
            format!("parallel.tp={}", p.tp),
            format!("parallel.pp={}", p.pp),
            format!("parallel.ep={}", p.ep),
            format!("parallel.zero1={}", p.zero1),
            format!("parallel.schedule=\"{}\"", p.schedule),
            format!("training.micro_batch={}", resolved.training.micro_batch),
        ];
        sets.extend(p.micro_batch.map(|m| format!("parallel.micro_batch={m}")));
        sets.extend(
            p.virtual_stages
                .map(|v| format!("parallel.virtual_stages={v}")),
        );
        for set in sets {
            args.extend(["--set".to_string(), set]);
        }
        let plan = chosen.map_or(serde_json::Value::Null, |c| c.event());
        Ok((args, plan))
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
        replan: None,
    })
}
