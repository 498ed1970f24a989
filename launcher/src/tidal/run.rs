//! `launch train` of a tidal job: wait for the next window (saying when), run the job in
//! it until the window ends (or a preemption), hand the GPUs back, and again, until
//! `training.max_steps`. `--until TIME` runs one window, from now to TIME, for a scheduler
//! that starts the job itself. Exit status: 0 finished, 75 yielded (run it again).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::decide::{checkpoint_guess, drain_guess};
use super::{now, Estimates, Schedule, Window, REAP_ALLOWANCE_S};
use crate::agent::{AgentTide, Outcome};
use crate::config::{JobConfig, TidalOptions};
use crate::coordinator::TidalWindow;
use crate::error::{Error, Result};
use crate::events::{Event, Record};

/// Set when SIGTERM or SIGUSR1 preempted this process: it is being asked to go, so the
/// loop over windows ends with status 75 rather than waiting for the next window.
pub static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Where `launch preempt RUN_DIR` leaves its deadline for node 0's agent.
pub fn preempt_file(run_dir: &Path) -> PathBuf {
    run_dir.join("preempt")
}

/// `launch preempt RUN_DIR --grace S`: the running tidal job in RUN_DIR stops within S
/// seconds (its node 0 agent picks the request up at its next heartbeat).
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
    let schedule = Schedule::new(&tidal).map_err(config_err(file))?;
    if schedule.is_empty() && until.is_none() {
        return Err(config_err(file)(
            "tidal.windows: no window given; write the windows, or pass `--until TIME`".into(),
        ));
    }
    // A window the job already stopped in is over for it, however early it stopped.
    let mut done_until = f64::NEG_INFINITY;
    loop {
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
        if deadline - now() < estimates.checkpoint_s + estimates.drain_s {
            let why = format!(
                "the window {} – {} leaves too little time before its hand-back to train \
                 (a checkpoint and the drain take about {:.1} s)",
                schedule.local(window.start),
                schedule.local(window.end),
                estimates.checkpoint_s + estimates.drain_s
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
        let tide = AgentTide {
            window: TidalWindow {
                window: Window {
                    start: window.start.max(now()),
                    end: window.end,
                },
                handback,
                deadline,
            },
            grace_s: tidal.grace_s,
            on_release: tidal.on_release.clone(),
            hook_timeout_s: tidal.hook_timeout_s,
        };
        if let Some(cmd) = &tidal.on_acquire {
            run_hook_blocking("tidal.on_acquire", cmd, tidal.hook_timeout_s, cfg)?;
        }
        match crate::launch::run_job(cfg, file, overrides, Some((tide, estimates)))? {
            Outcome::Finished => return Ok(()),
            Outcome::Yielded { preempted } => {
                let how = if preempted {
                    "preempted"
                } else {
                    "window ended"
                };
                if until.is_some() || SIGNALLED.load(Ordering::SeqCst) {
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
    let schedule = Schedule::new(&tidal).map_err(config_err(file))?;
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
    let handback = r0 + len - tidal.handback_margin_s / speed;
    let tide = AgentTide {
        window: TidalWindow {
            window: Window {
                start: r0,
                end: r0 + len,
            },
            handback,
            deadline: handback - REAP_ALLOWANCE_S,
        },
        grace_s: tidal.grace_s / speed,
        on_release: None,
        hook_timeout_s: tidal.hook_timeout_s,
    };
    let estimates = estimates(&fast, &tidal)?;
    let outcome = crate::launch::run_job(&fast, file, &all, Some((tide, estimates)))?;
    let l = super::ledger::ledger(&run_dir)?;
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
        let step = w.useful_s / steps as f64;
        let usable = night.end
            - night.start
            - tidal.handback_margin_s
            - w.startup_s
            - m.checkpoint_s
            - m.drain_s;
        println!(
            "rehearsal: measured a step {step:.3} s (wall), a checkpoint {:.3} s, the drain {:.3} s, \
             start-up {:.1} s: a real night at these rates takes about {:.0} steps",
            m.checkpoint_s,
            m.drain_s,
            w.startup_s,
            (usable / step).max(0.0).floor()
        );
    }
    Ok(())
}

/// Sleep until Unix seconds `at`; SIGTERM or SIGUSR1 meanwhile yields (75), SIGINT stops.
fn wait_until(at: f64) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Launch(format!("starting a runtime: {e}")))?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |e: std::io::Error| Error::Launch(format!("signal handler: {e}"));
        let mut int = signal(SignalKind::interrupt()).map_err(handler)?;
        let mut term = signal(SignalKind::terminate()).map_err(handler)?;
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(handler)?;
        let left = Duration::from_secs_f64((at - now()).max(0.0));
        tokio::select! {
            _ = tokio::time::sleep(left) => Ok(()),
            _ = int.recv() => Err(Error::JobStopped("interrupted (SIGINT)".into())),
            _ = term.recv() => Err(Error::Yielded("preempted (SIGTERM) between windows".into())),
            _ = usr1.recv() => Err(Error::Yielded("preempted (SIGUSR1) between windows".into())),
        }
    })
}

/// What the workers' estimates start from: measured in earlier windows (node 0's event
/// log), else guessed from the model's size and `tidal.safety_factor`.
fn estimates(cfg: &JobConfig, tidal: &TidalOptions) -> Result<Estimates> {
    let path = cfg.run_dir().join("events.jsonl");
    let records = match path.exists() && cfg.launch.node_rank == 0 {
        true => crate::events::read(&path).unwrap_or_default(),
        false => Vec::new(),
    };
    let world = (cfg.launch.nproc_per_node * cfg.launch.nnodes).max(1) as u64;
    let model_bytes = model_bytes(&cfg.model.path);
    let state = if cfg.lora.is_some() { 1 } else { 3 };
    let guess = Estimates {
        step_s: None,
        checkpoint_s: checkpoint_guess(model_bytes * state / world, tidal.safety_factor),
        drain_s: drain_guess(tidal.safety_factor),
    };
    Ok(measured(&records).unwrap_or(guess))
}

/// The least a drain is taken to need, whatever was measured.
const MIN_DRAIN_S: f64 = 0.2;

/// The newest measurements in an event log: the slowest of the last few checkpoints, of
/// the last window's drains (rank 0's `yield` → each node's `gpus_released`), and of its
/// steps; `None` before a window has ended with a checkpoint.
pub fn measured(records: &[Record]) -> Option<Estimates> {
    let mut checkpoints = Vec::new();
    let mut steps = Vec::new();
    let mut drain: Option<f64> = None;
    let mut yielded_at = None;
    for r in records {
        match &r.event {
            Event::Checkpoint {
                took_s, stall_s, ..
            } => checkpoints.push(took_s.unwrap_or(*stall_s)),
            Event::Step(s) if r.rank == Some(0) && s.stats.step_time > 0.0 => {
                steps.push(s.stats.step_time)
            }
            Event::WindowOpen { .. } => steps.clear(),
            Event::Yield { at, .. } => yielded_at = Some(*at),
            Event::GpusReleased { at, .. } => {
                if let Some(y) = yielded_at {
                    let d = (at - y).max(0.0);
                    drain = Some(drain.map_or(d, |m: f64| m.max(d)));
                }
            }
            _ => {}
        }
    }
    let slowest = |v: &[f64]| v.iter().rev().take(8).copied().reduce(f64::max);
    Some(Estimates {
        step_s: slowest(&steps),
        checkpoint_s: slowest(&checkpoints)?,
        drain_s: drain?.max(MIN_DRAIN_S),
    })
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

/// After a node's workers are reaped: wait (until at most `handback`) for their process
/// groups to be empty, and on CUDA check with NVML that no process of ours holds GPU
/// memory. What was checked, in words.
pub async fn check_released(pids: &[u32], handback: f64) -> String {
    let limit = handback.max(now() + 1.0);
    while pids.iter().any(|p| crate::agent::spawn::group_alive(*p)) && now() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| crate::agent::spawn::group_alive(*p))
        .collect();
    let groups = match left.is_empty() {
        true => format!("{} worker process groups gone", pids.len()),
        false => format!("process groups still alive: {left:?}"),
    };
    format!("{groups}; {}", gpu_check(pids))
}

/// No process of ours (a worker, or one in a worker's process group) on any GPU.
#[cfg(feature = "cuda")]
fn gpu_check(pids: &[u32]) -> String {
    use nvml_wrapper::Nvml;
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => return format!("NVML unavailable ({e}): GPU memory not checked"),
    };
    let ours = |pid: u32| {
        pids.contains(&pid)
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.split_whitespace().nth(2)?.to_string();
                    after.parse::<u32>().ok()
                })
                .is_some_and(|pgrp| pids.contains(&pgrp))
    };
    let count = nvml.device_count().unwrap_or(0);
    let mut held = Vec::new();
    for i in 0..count {
        let Ok(device) = nvml.device_by_index(i) else {
            continue;
        };
        for p in device.running_compute_processes().unwrap_or_default() {
            if ours(p.pid) {
                held.push((i, p.pid));
            }
        }
    }
    match held.is_empty() {
        true => format!("NVML: no process of ours on {count} GPUs"),
        false => format!("NVML: still held (gpu, pid): {held:?}"),
    }
}

/// Without the GPU path: nothing holds GPU memory.
#[cfg(not(feature = "cuda"))]
fn gpu_check(_pids: &[u32]) -> String {
    "no GPU path in this build".into()
}

/// Run an operator's hook (`sh -c`, TIDEMILL_NODE and TIDEMILL_RUN_DIR set) within
/// `timeout_s`; a failure or a timeout is logged, not fatal (the GPUs are free either way).
pub async fn hook(key: &str, cmd: &str, timeout_s: f64, node: usize, run_dir: &Path) {
    let mut c = tokio::process::Command::new("sh");
    c.args(["-c", cmd])
        .env("TIDEMILL_NODE", node.to_string())
        .env("TIDEMILL_RUN_DIR", run_dir)
        .kill_on_drop(true);
    let run = async {
        match c.status().await {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("exited with {s}")),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(Duration::from_secs_f64(timeout_s), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{key} `{cmd}`: {e}"),
        Err(_) => tracing::warn!("{key} `{cmd}`: killed after {timeout_s} s"),
    }
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
