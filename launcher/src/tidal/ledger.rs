//! The goodput ledger of a tidal run, read back from its event log: each window's wall
//! time (its scheduled start to its scheduled end) cut at the moments the log records —
//! the first step starts, the last step that a checkpoint kept ends, the last step ends,
//! the final checkpoint commits (rank 0's `yield`), the last node's GPUs are released —
//! into start-up and restore, useful training, checkpointing, lost work, drain and idle.
//! `launch status` prints it (text or JSON), projects the windows still needed, and draws
//! loss, tokens/s and the windows over time (`status.svg`).

use std::path::Path;

use serde::Serialize;

use super::CloseReason;
use crate::error::{Error, Result};
use crate::events::{Event, Record};

/// Where a window's wall time went, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Parts {
    pub startup_s: f64,
    pub useful_s: f64,
    pub checkpoint_s: f64,
    pub lost_s: f64,
    pub drain_s: f64,
    pub idle_s: f64,
}

impl Parts {
    pub fn sum(&self) -> f64 {
        self.startup_s
            + self.useful_s
            + self.checkpoint_s
            + self.lost_s
            + self.drain_s
            + self.idle_s
    }

    fn add(&mut self, o: &Parts) {
        self.startup_s += o.startup_s;
        self.useful_s += o.useful_s;
        self.checkpoint_s += o.checkpoint_s;
        self.lost_s += o.lost_s;
        self.drain_s += o.drain_s;
        self.idle_s += o.idle_s;
    }
}

/// One window's account.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WindowLedger {
    pub start: f64,
    pub end: f64,
    pub handback: f64,
    pub world: usize,
    pub reason: Option<CloseReason>,
    /// Steps this window took (first, last), and how many of them are to be done again.
    pub first_step: Option<u64>,
    pub last_step: Option<u64>,
    pub lost_steps: u64,
    /// Seconds to spare before the hand-back when the last node's GPUs were released.
    pub handback_margin_s: Option<f64>,
    /// They add up to [`Self::wall_s`].
    #[serde(flatten)]
    pub parts: Parts,
}

impl WindowLedger {
    pub fn wall_s(&self) -> f64 {
        self.end - self.start
    }
}

/// The whole run's account.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Ledger {
    pub windows: Vec<WindowLedger>,
    pub max_steps: Option<u64>,
    /// The step reached (kept by a checkpoint, or finished).
    pub step: u64,
    pub finished: bool,
    /// Steps kept per window, on average, and the windows still needed at that rate.
    pub steps_per_window: Option<f64>,
    pub windows_left: Option<u64>,
    pub totals: Totals,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    pub wall_s: f64,
    #[serde(flatten)]
    pub parts: Parts,
    /// useful / wall.
    pub goodput: f64,
}

/// The events of one window, in order, split at each `window_open`.
fn windows(records: &[Record]) -> Vec<&[Record]> {
    let opens: Vec<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.event, Event::WindowOpen { .. }))
        .map(|(i, _)| i)
        .collect();
    opens
        .iter()
        .enumerate()
        .map(|(k, &i)| &records[i..opens.get(k + 1).copied().unwrap_or(records.len())])
        .collect()
}

/// One window's ledger from its events (the first is its `window_open`).
fn window(events: &[Record]) -> Option<WindowLedger> {
    let Event::WindowOpen {
        start,
        end,
        handback,
        world,
    } = events.first()?.event
    else {
        return None;
    };
    let mut w = WindowLedger {
        start,
        end,
        handback,
        world,
        ..Default::default()
    };
    // (step, its start, its end) of rank 0.
    let mut steps: Vec<(u64, f64, f64)> = Vec::new();
    let mut saves: Vec<(u64, f64, f64)> = Vec::new();
    let (mut yielded_at, mut released) = (None, None::<f64>);
    let mut saved_step = None;
    for r in events {
        match &r.event {
            Event::Step(s) if r.rank == Some(0) => {
                let st = &s.stats;
                steps.push((st.step, r.time - st.step_time.max(0.0), r.time))
            }
            Event::Resumed { step, .. } => saved_step = Some(*step),
            Event::Checkpoint { step, stall_s, .. } => {
                saves.push((*step, r.time, *stall_s));
                saved_step = Some(*step);
            }
            Event::Yield { at, .. } => yielded_at = Some(*at),
            Event::GpusReleased { at, .. } => released = Some(released.map_or(*at, |m| m.max(*at))),
            Event::WindowClose {
                reason, lost_steps, ..
            } => {
                w.reason = Some(*reason);
                w.lost_steps = *lost_steps;
            }
            Event::Done { .. } => {
                w.reason.get_or_insert(CloseReason::Finished);
            }
            _ => {}
        }
    }
    // A step run again after a restart in the window counts once, as its last run.
    steps.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.total_cmp(&b.2)));
    steps.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            *earlier = *later;
        }
        same
    });
    let finished = w.reason == Some(CloseReason::Finished);
    let last_kept = match finished {
        true => steps.last().map(|s| s.0),
        false => saved_step,
    };
    w.first_step = steps.first().map(|s| s.0);
    w.last_step = steps.last().map(|s| s.0);
    let clamp = |t: f64| t.clamp(start, end.max(start));
    // No step at all: the window went in starting up, until its release.
    let t1 = clamp(steps.first().map_or(released.unwrap_or(start), |s| s.1));
    let t3 = clamp(steps.last().map_or(t1, |s| s.2).max(t1));
    let t2 = clamp(
        steps
            .iter()
            .filter(|s| last_kept.is_some_and(|k| s.0 <= k))
            .map(|s| s.2)
            .fold(t1, f64::max)
            .min(t3),
    );
    let t5 = clamp(released.unwrap_or(t3).max(t3));
    let t4 = clamp(yielded_at.unwrap_or(t3).clamp(t3, t5));
    let stalls: f64 = saves
        .iter()
        .filter(|s| s.1 > t1 && s.1 <= t2)
        .map(|s| s.2)
        .sum::<f64>()
        .min(t2 - t1);
    w.parts = Parts {
        startup_s: t1 - start,
        useful_s: t2 - t1 - stalls,
        lost_s: t3 - t2,
        checkpoint_s: stalls + (t4 - t3),
        drain_s: t5 - t4,
        idle_s: end.max(start) - t5,
    };
    w.handback_margin_s = released.map(|r| handback - r);
    if !finished {
        w.lost_steps = w.lost_steps.max(
            steps
                .iter()
                .filter(|s| last_kept.is_none_or(|k| s.0 > k))
                .count() as u64,
        );
    }
    Some(w)
}

/// The ledger of the run in `run_dir`.
pub fn ledger(run_dir: &Path) -> Result<Ledger> {
    let path = run_dir.join("events.jsonl");
    if !path.exists() {
        return Err(Error::BadPath {
            key: "RUN_DIR".into(),
            path: run_dir.to_path_buf(),
            message: "not a run directory (no events.jsonl)".into(),
        });
    }
    let records = crate::events::read(&path)?;
    let mut l = Ledger {
        windows: windows(&records).into_iter().filter_map(window).collect(),
        max_steps: max_steps(run_dir),
        ..Default::default()
    };
    l.finished = records
        .iter()
        .any(|r| matches!(r.event, Event::Done { .. }));
    l.step = records
        .iter()
        .filter_map(|r| match (&r.event, l.finished) {
            (Event::Checkpoint { step, .. }, _) => Some(*step),
            (Event::Step(s), true) if r.rank == Some(0) => Some(s.stats.step),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let t = &mut l.totals;
    for w in &l.windows {
        t.wall_s += w.wall_s();
        t.parts.add(&w.parts);
    }
    t.goodput = if t.wall_s > 0.0 {
        t.parts.useful_s / t.wall_s
    } else {
        0.0
    };
    // The rate: windows that closed by their deadline or a preemption, or finished (not
    // those the job failed in).
    let closed = l
        .windows
        .iter()
        .filter(|w| w.reason.is_some_and(|r| r != CloseReason::Stopped))
        .count();
    if closed > 0 && l.step > 0 {
        let per = l.step as f64 / closed as f64;
        l.steps_per_window = Some(per);
        l.windows_left = l
            .max_steps
            .map(|m| (m.saturating_sub(l.step) as f64 / per).ceil() as u64);
    }
    Ok(l)
}

/// `training.max_steps` of the run's resolved config.
fn max_steps(run_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run_dir.join("config.toml")).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    table
        .get("training")?
        .get("max_steps")?
        .as_integer()?
        .try_into()
        .ok()
}
