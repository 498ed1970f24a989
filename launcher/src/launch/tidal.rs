//! `launch train` of a tidal job: wait for the next window (saying when), run the job in
//! it until the window ends (or a preemption), hand the GPUs back, and again, until
//! `training.max_steps`. `--until TIME` runs one window, from now to TIME, for a scheduler
//! that starts the job itself. Exit status: 0 finished, 75 yielded (run it again).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::run::run_job;
use crate::agent::{AgentTide, Outcome};
use crate::config::{JobConfig, TidalOptions};
use crate::coordinator::TidalWindow;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::tidal::decide::{checkpoint_guess, drain_guess, measured};
use crate::tidal::handback::{hook, preempt_file};
use crate::tidal::signals::{signalled, stopping, watch};
use crate::tidal::{now, Estimates, Window, REAP_ALLOWANCE_S};

/// `launch preempt RUN_DIR --grace S`: the running tidal job in RUN_DIR stops within S
/// seconds (its node 0 agent looks for the request every 100 ms). A request no window
/// takes before its grace runs out is dropped.
pub fn preempt(run_dir: &Path, grace_s: f64) -> Result<()> {
    if !(grace_s.is_finite() && grace_s > 0.0) {
        return Err(Error::Config {
            file: "--grace".into(),
            message: format!("must be a positive number of seconds, got {grace_s}"),
        });
    }
    if !run_dir.join("events.jsonl").exists() {
        return Err(Error::BadPath {
            key: "RUN_DIR".into(),
            path: run_dir.to_path_buf(),
            message: "not a run directory (no events.jsonl)".into(),
        });
    }
    // A window starting now takes the request (it may not have logged `window_open` yet);
    // one opening after the grace has run out does not.
    let path = preempt_file(run_dir);
    checkpoint::atomic_write(&path, format!("{}\n", now() + grace_s).as_bytes())?;
    println!(
        "asked the job in {} to stop within {grace_s} s",
        run_dir.display()
    );
    Ok(())
}

fn config_err(file: &Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Config {
        file: file.to_path_buf(),
        message,
    }
}

/// The loop over windows (see the module's doc).
pub fn train(
    cfg: &JobConfig,
    file: &Path,
    overrides: &[String],
    until: Option<&str>,
) -> Result<()> {
    let tidal = cfg.tidal.clone().unwrap_or_default();
    let schedule = tidal.schedule().map_err(config_err(file))?;
    if schedule.is_empty() && until.is_none() {
        return Err(config_err(file)(
            "tidal.windows: no window given; write the windows, or pass `--until TIME`".into(),
        ));
    }
    watch();
    // A window the job already stopped in is over for it, however early it stopped.
    let mut done_until = f64::NEG_INFINITY;
    loop {
        stopping("between windows")?;
        let window = match until {
            Some(t) => schedule
                .until(t, now())
                .map_err(config_err("--until".as_ref()))?,
            None => schedule.next(now().max(done_until)).ok_or_else(|| {
                config_err(file)(
                    "tidal: no window opens in the next two years (every day skipped?)".into(),
                )
            })?,
        };
        if window.start > now() {
            println!(
                "tidal: waiting for the next window, {} – {}",
                schedule.local(window.start),
                schedule.local(window.end)
            );
            wait_until(window.start)?;
        }
        let handback = window.handback(tidal.handback_margin_s);
        let deadline = handback - REAP_ALLOWANCE_S;
        let estimates = estimates(cfg, &tidal)?;
        // Whether to skip a window that has begun (or is shorter than its margin: late, or
        // the night the clocks go forward): by the guesses, which every node makes alike
        // (only node 0 has the measurements), so that all skip it or none. A margin that
        // leaves no time in any window is refused when the job file is read.
        let need = guess(cfg, &tidal);
        if deadline - now() < need.checkpoint_s + need.drain_s {
            let why = format!(
                "the window {} – {} leaves too little time before its hand-back to train \
                 (a checkpoint and the drain take about {:.1} s)",
                schedule.local(window.start),
                schedule.local(window.end),
                need.checkpoint_s + need.drain_s
            );
            if until.is_some() {
                return Err(Error::Yielded(why));
            }
            println!("tidal: skipping: {why}");
            done_until = window.end;
            continue;
        }
        println!(
            "tidal: window open until {} (GPUs handed back by {})",
            schedule.local(window.end),
            schedule.local(handback)
        );
        let opened = Window {
            start: window.start.max(now()),
            end: window.end,
        };
        let tide = agent_tide(opened, &tidal);
        // A preemption asked for before this window (none was open) is not for it.
        if cfg.launch.node_rank == 0 {
            let _ = std::fs::remove_file(preempt_file(&cfg.run_dir()));
        }
        if let Some(cmd) = &tidal.on_acquire {
            run_hook_blocking("tidal.on_acquire", cmd, tidal.hook_timeout_s, cfg)?;
        }
        stopping("before the window's workers started")?;
        match run_job(cfg, file, overrides, Some((tide, estimates)))? {
            Outcome::Finished => return Ok(()),
            Outcome::Yielded { preempted } => {
                let how = if preempted {
                    "preempted"
                } else {
                    "window ended"
                };
                if until.is_some() || signalled() {
                    return Err(Error::Yielded(format!("{how}; run again to go on")));
                }
                println!("tidal: {how}; GPUs handed back");
                done_until = window.end;
            }
        }
    }
}

/// `launch train JOB --rehearse SPEED`: play the job's next window with a clock `speed`
/// times fast (a night of 8.5 h in a minute at 510×), for real, in a run directory of its
/// own (`<run_dir>-rehearsal`, started afresh), and say at which step the night ended,
/// when (on the night's clock) the GPUs were released and whether the margin held, and how
/// many steps a real night would take at the rates measured.
pub fn rehearse(cfg: &JobConfig, file: &Path, overrides: &[String], speed: f64) -> Result<()> {
    if !(speed.is_finite() && speed >= 1.0) {
        return Err(config_err("--rehearse".as_ref())(format!(
            "the clock's speed must be at least 1, got {speed}"
        )));
    }
    let tidal = cfg.tidal.clone().unwrap_or_default();
    let schedule = tidal.schedule().map_err(config_err(file))?;
    let night = schedule.next(now()).ok_or_else(|| {
        config_err(file)("tidal.windows: a rehearsal plays the next window; none is given".into())
    })?;
    let run_dir = PathBuf::from(format!("{}-rehearsal", cfg.run_dir().display()));
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|source| Error::Io {
            path: run_dir.clone(),
            source,
        })?;
    }
    let mut all = overrides.to_vec();
    all.extend([
        format!("job.run_dir=\"{}\"", run_dir.display()),
        format!(
            "tidal.handback_margin_s={}",
            tidal.handback_margin_s / speed
        ),
        format!("tidal.grace_s={}", tidal.grace_s / speed),
    ]);
    let fast = JobConfig::load(file, &all)?;
    let (r0, len) = (now(), (night.end - night.start) / speed);
    let virt = |t: f64| schedule.local(night.start + (t - r0) * speed);
    println!(
        "rehearsal: the window {} – {} at {speed}× ({len:.1} s), in {}",
        schedule.local(night.start),
        schedule.local(night.end),
        run_dir.display()
    );
    // The margin and the grace on the fast clock (the overrides above); no operator's hook
    // runs in a rehearsal.
    let mut tide = agent_tide(
        Window {
            start: r0,
            end: r0 + len,
        },
        &fast.tidal.clone().unwrap_or_default(),
    );
    tide.on_release = None;
    let handback = tide.window.handback;
    let estimates = estimates(&fast, &tidal)?;
    let outcome = run_job(&fast, file, &all, Some((tide, estimates)))?;
    let l = crate::tidal::ledger::ledger(&run_dir)?;
    let w = l.windows.last().ok_or_else(|| {
        Error::Launch(format!(
            "{}: the rehearsal logged no window",
            run_dir.display()
        ))
    })?;
    let records = crate::events::read(&run_dir.join("events.jsonl"))?;
    let released = records
        .iter()
        .filter_map(|r| match r.event {
            Event::GpusReleased { at, .. } => Some(at),
            _ => None,
        })
        .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
    let end = match outcome {
        Outcome::Finished => "finished the job".to_string(),
        Outcome::Yielded { .. } => format!("stopped after step {}", w.last_step.unwrap_or(0)),
    };
    println!("rehearsal: the night {end} ({} steps lost)", w.lost_steps);
    if let Some(at) = released {
        let spare = (handback - at) * speed;
        println!(
            "rehearsal: GPUs released at {} on the night's clock, {spare:.0} s before the \
             hand-back at {}: {}",
            virt(at),
            virt(handback),
            if spare >= 0.0 {
                "the margin holds"
            } else {
                "LATE: the margin does not hold"
            }
        );
    }
    let steps = match (w.first_step, w.last_step) {
        (Some(a), Some(b)) => (b + 1).saturating_sub(a),
        _ => 0,
    };
    if let Some(m) = measured(&records).filter(|_| steps > 0) {
        // Wall time per step, what runs between steps included.
        let step = w.parts.useful_s / steps as f64;
        let usable = night.end
            - night.start
            - tidal.handback_margin_s
            - w.parts.startup_s
            - m.checkpoint_s
            - m.drain_s;
        println!(
            "rehearsal: measured a step {step:.3} s (wall), a checkpoint {:.3} s, the drain {:.3} s, \
             start-up {:.1} s: a real night at these rates takes about {:.0} steps",
            m.checkpoint_s,
            m.drain_s,
            w.parts.startup_s,
            (usable / step).max(0.0).floor()
        );
    }
    Ok(())
}

/// What the agents of `window` run with under `tidal`: the hand-back `end − margin`, the
/// kill `REAP_ALLOWANCE_S` before it, the grace and the release hook.
fn agent_tide(window: Window, tidal: &TidalOptions) -> AgentTide {
    let handback = window.handback(tidal.handback_margin_s);
    AgentTide {
        window: TidalWindow {
            window,
            handback,
            deadline: handback - REAP_ALLOWANCE_S,
        },
        grace_s: tidal.grace_s,
        on_release: tidal.on_release.clone(),
        hook_timeout_s: tidal.hook_timeout_s,
    }
}

/// Sleep until Unix seconds `at`; SIGTERM or SIGUSR1 meanwhile yields (75), SIGINT stops.
fn wait_until(at: f64) -> Result<()> {
    while now() < at {
        stopping("between windows")?;
        std::thread::sleep(Duration::from_secs_f64((at - now()).clamp(0.0, 0.05)));
    }
    stopping("between windows")
}

/// What the workers' estimates start from: measured in earlier windows (node 0's event
/// log), else guessed from the model's size and `tidal.safety_factor`.
fn estimates(cfg: &JobConfig, tidal: &TidalOptions) -> Result<Estimates> {
    let path = cfg.run_dir().join("events.jsonl");
    let records = match path.exists() && cfg.launch.node_rank == 0 {
        true => crate::events::read(&path).unwrap_or_default(),
        false => Vec::new(),
    };
    Ok(measured(&records).unwrap_or_else(|| guess(cfg, tidal)))
}

/// The estimates before anything was measured, the same on every node: a checkpoint of
/// this rank's share of the model (its weights, and AdamW's two moments under full SFT)
/// and a drain, each with the safety factor.
fn guess(cfg: &JobConfig, tidal: &TidalOptions) -> Estimates {
    let world = (cfg.launch.nproc_per_node * cfg.launch.nnodes).max(1) as u64;
    let model_bytes = model_bytes(&cfg.model.path);
    let state = if cfg.lora.is_some() { 1 } else { 3 };
    Estimates {
        step_s: None,
        checkpoint_s: checkpoint_guess(model_bytes * state / world, tidal.safety_factor),
        drain_s: drain_guess(tidal.safety_factor),
    }
}

/// Bytes of the model's weight files.
fn model_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn run_hook_blocking(key: &str, cmd: &str, timeout_s: f64, cfg: &JobConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("starting a runtime: {e}")))?;
    rt.block_on(hook(
        key,
        cmd,
        timeout_s,
        cfg.launch.node_rank,
        &cfg.run_dir(),
    ));
    Ok(())
}
