//! `launch train` of a tidal job: wait for the next window (saying when), run the job in
//! it until the window ends (or a preemption), hand the GPUs back, and again, until
//! `training.max_steps`. `--until TIME` runs one window, from now to TIME, for a scheduler
//! that starts the job itself. Exit status: 0 finished, 75 yielded (run it again).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::decide::{checkpoint_guess, drain_guess};
use super::{now, Estimates, Schedule, Window, REAP_ALLOWANCE_S};
use crate::agent::{AgentTide, Outcome};
use crate::config::{JobConfig, TidalOptions};
use crate::coordinator::TidalWindow;
use crate::error::{Error, Result};
use crate::events::{Event, Record};

/// SIGTERM or SIGUSR1 came (a preemption: this process is being asked to go, so the loop
/// over windows ends with status 75 rather than waiting for the next window), and SIGINT.
/// Noted from the loop's start to the process's end, whatever runs when they come.
static TERM: std::sync::OnceLock<(Arc<AtomicBool>, Arc<AtomicBool>)> = std::sync::OnceLock::new();

fn flags() -> &'static (Arc<AtomicBool>, Arc<AtomicBool>) {
    TERM.get_or_init(|| {
        let (term, int) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
            if let Err(e) = signal_hook::flag::register(sig, term.clone()) {
                tracing::warn!("noting signal {sig}: {e}");
            }
        }
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGINT, int.clone()) {
            tracing::warn!("noting SIGINT: {e}");
        }
        (term, int)
    })
}

/// Whether SIGTERM or SIGUSR1 came since the tidal loop started.
pub fn signalled() -> bool {
    TERM.get().is_some_and(|f| f.0.load(Ordering::SeqCst))
}

/// Whether SIGINT came since the tidal loop started.
pub fn interrupted() -> bool {
    TERM.get().is_some_and(|f| f.1.load(Ordering::SeqCst))
}

/// What the loop stops with, if a signal came.
fn stopping(when: &str) -> Result<()> {
    let (term, int) = flags();
    if int.load(Ordering::SeqCst) {
        return Err(Error::JobStopped("interrupted (SIGINT)".into()));
    }
    if term.load(Ordering::SeqCst) {
        return Err(Error::Yielded(format!("preempted {when}")));
    }
    Ok(())
}

/// Where `launch preempt RUN_DIR` leaves its deadline for node 0's agent.
pub fn preempt_file(run_dir: &Path) -> PathBuf {
    run_dir.join("preempt")
}

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
    let schedule = Schedule::new(&tidal).map_err(config_err(file))?;
    if schedule.is_empty() && until.is_none() {
        return Err(config_err(file)(
            "tidal.windows: no window given; write the windows, or pass `--until TIME`".into(),
        ));
    }
    flags();
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
        // A preemption asked for before this window (none was open) is not for it.
        if cfg.launch.node_rank == 0 {
            let _ = std::fs::remove_file(preempt_file(&cfg.run_dir()));
        }
        if let Some(cmd) = &tidal.on_acquire {
            run_hook_blocking("tidal.on_acquire", cmd, tidal.hook_timeout_s, cfg)?;
        }
        stopping("before the window's workers started")?;
        match crate::launch::run_job(cfg, file, overrides, Some((tide, estimates)))? {
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

/// The least a drain is taken to need, and the most, whatever was measured (a drain
/// measured wrong must not keep every later window from training).
const MIN_DRAIN_S: f64 = 0.2;
const MAX_DRAIN_S: f64 = 120.0;

/// The newest measurements in an event log: the slowest of the last few checkpoints, and
/// of the newest window that measured a drain (its rank 0's `yield`, after the final
/// checkpoint, to its nodes' `gpus_released`) its drain and its steps; `None` before a
/// window has ended that way.
pub fn measured(records: &[Record]) -> Option<Estimates> {
    let mut checkpoints = Vec::new();
    // Per window: its yield, its steps, its drain.
    let (mut yielded_at, mut steps, mut drain) = (None, Vec::new(), None::<f64>);
    let mut last: Option<(f64, Vec<f64>)> = None;
    let mut close = |steps: &mut Vec<f64>, drain: &mut Option<f64>| {
        if let Some(d) = drain.take() {
            last = Some((d, std::mem::take(steps)));
        }
        steps.clear();
    };
    for r in records {
        match &r.event {
            Event::WindowOpen { .. } => {
                close(&mut steps, &mut drain);
                yielded_at = None;
            }
            Event::Checkpoint {
                took_s, stall_s, ..
            } => checkpoints.push(took_s.unwrap_or(*stall_s)),
            Event::Step(s) if r.rank == Some(0) && s.stats.step_time > 0.0 => {
                steps.push(s.stats.step_time)
            }
            Event::Yield { at, .. } => yielded_at = Some(*at),
            Event::GpusReleased { at, .. } => {
                if let Some(y) = yielded_at {
                    let d = (at - y).max(0.0);
                    drain = Some(drain.map_or(d, |m| m.max(d)));
                }
            }
            _ => {}
        }
    }
    close(&mut steps, &mut drain);
    let slowest = |v: &[f64]| v.iter().rev().take(8).copied().reduce(f64::max);
    let (drain, steps) = last?;
    Some(Estimates {
        step_s: slowest(&steps),
        checkpoint_s: slowest(&checkpoints)?,
        drain_s: drain.clamp(MIN_DRAIN_S, MAX_DRAIN_S),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(time: f64, rank: Option<usize>, event: Event) -> Record {
        Record {
            time,
            generation: 0,
            rank,
            node: Some(0),
            event,
        }
    }

    fn open(at: f64) -> Event {
        Event::WindowOpen {
            start: at,
            end: at + 100.0,
            handback: at + 90.0,
            world: 2,
        }
    }

    #[test]
    fn measurements_come_from_the_newest_window_that_measured_a_drain() {
        let checkpoint = |took| Event::Checkpoint {
            step: 4,
            path: "c".into(),
            async_save: true,
            stall_s: 0.01,
            snapshot_s: 0.01,
            took_s: Some(took),
        };
        let released = |at| Event::GpusReleased {
            at,
            margin_s: 1.0,
            checked: String::new(),
        };
        let yielded = |at| Event::Yield {
            step: 4,
            checkpointed: true,
            lost_steps: 0,
            at,
        };
        let mut log = vec![record(0.0, None, open(0.0))];
        assert_eq!(measured(&log), None, "nothing measured yet");
        log.extend([
            record(10.0, Some(0), checkpoint(2.0)),
            record(50.0, Some(0), yielded(50.0)),
            record(51.5, Some(0), released(51.5)),
            // The next window's workers were killed: no yield. Its release is not a drain
            // (paired with the night before, it would be a day long).
            record(86_400.0, None, open(86_400.0)),
            record(86_410.0, Some(0), checkpoint(1.0)),
            record(86_490.0, Some(0), released(86_490.0)),
        ]);
        let m = measured(&log).expect("measured");
        assert_eq!(m.drain_s, 1.5);
        assert_eq!(m.checkpoint_s, 2.0, "the slowest recent checkpoint");
    }
}
