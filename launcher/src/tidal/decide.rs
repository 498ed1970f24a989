//! The step-boundary decision of a tidal job: one more step, or the final checkpoint now,
//! or stop without one. Pure (times are arguments), tested with fake time; every rank
//! decides with its own clock and estimates and the job takes the strictest verdict
//! (`crate::tidal::worker`).

use serde::{Deserialize, Serialize};

use crate::events::{Event, Record};

/// What a rank wants at a step boundary, strictest last (the job takes the maximum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Another step, its checkpoint and the drain still fit before the deadline.
    Continue = 0,
    /// They do not, but a checkpoint of the steps taken and the drain do: save and stop.
    Checkpoint = 1,
    /// Nothing to save, or a checkpoint would not commit in time: stop now (the steps since
    /// the last checkpoint are lost; a checkpoint that cannot commit is never started).
    Stop = 2,
}

impl Verdict {
    pub fn code(self) -> f32 {
        self as u8 as f32
    }

    pub fn from_code(c: f32) -> Self {
        match c.round() as i64 {
            i64::MIN..=0 => Verdict::Continue,
            1 => Verdict::Checkpoint,
            _ => Verdict::Stop,
        }
    }
}

/// Seconds the next step, a checkpoint (from its start to its commit) and the drain (the
/// workers exiting, the agent reaping them and checking the GPUs) are expected to take.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimates {
    /// `None` until a step of this window was measured (or the plan predicted one).
    pub step_s: Option<f64>,
    pub checkpoint_s: f64,
    pub drain_s: f64,
}

/// The decision at a step boundary at `now`, with `unsaved` steps since the last
/// checkpoint and `in_flight` seconds still to go of a checkpoint being written in the
/// background (the next save, and the exit, wait for it), for a job whose workers must be
/// gone by `deadline`.
pub fn decide(now: f64, deadline: f64, est: &Estimates, unsaved: u64, in_flight: f64) -> Verdict {
    let step = est.step_s.unwrap_or(0.0);
    let after = now + in_flight.max(0.0);
    if after + step + est.checkpoint_s + est.drain_s <= deadline {
        return Verdict::Continue;
    }
    if unsaved > 0 && after + est.checkpoint_s + est.drain_s <= deadline {
        return Verdict::Checkpoint;
    }
    Verdict::Stop
}

/// Before a checkpoint has been measured: its size at `bytes_per_s` plus a second, times
/// the safety factor (`tidal.safety_factor`).
pub fn checkpoint_guess(bytes: u64, safety: f64) -> f64 {
    const BYTES_PER_S: f64 = 200e6;
    (bytes as f64 / BYTES_PER_S + 1.0) * safety
}

/// Before a drain has been measured: a second (a CUDA context takes that long to go),
/// times the safety factor.
pub fn drain_guess(safety: f64) -> f64 {
    safety
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

#[cfg(test)]
mod tests {
    use super::*;

    const EST: Estimates = Estimates {
        step_s: Some(2.0),
        checkpoint_s: 5.0,
        drain_s: 1.0,
    };

    #[test]
    fn another_step_needs_room_for_itself_its_checkpoint_and_the_drain() {
        // 8 s needed: a step, a checkpoint, the drain.
        assert_eq!(decide(100.0, 108.0, &EST, 3, 0.0), Verdict::Continue);
        assert_eq!(decide(100.0, 107.9, &EST, 3, 0.0), Verdict::Checkpoint);
        // Just room for the checkpoint and the drain.
        assert_eq!(decide(100.0, 106.0, &EST, 3, 0.0), Verdict::Checkpoint);
        // Not even that: no checkpoint is started, the unsaved steps are lost.
        assert_eq!(decide(100.0, 105.9, &EST, 3, 0.0), Verdict::Stop);
        // Nothing unsaved: stop, no checkpoint.
        assert_eq!(decide(100.0, 107.0, &EST, 0, 0.0), Verdict::Stop);
        // Past the deadline (a preemption's grace already spent).
        assert_eq!(decide(100.0, 90.0, &EST, 3, 0.0), Verdict::Stop);
        // A background save with 2 s to go comes first.
        assert_eq!(decide(100.0, 109.0, &EST, 3, 2.0), Verdict::Checkpoint);
        assert_eq!(decide(100.0, 107.9, &EST, 3, 2.0), Verdict::Stop);
    }

    #[test]
    fn an_unmeasured_step_counts_as_free_and_the_strictest_verdict_wins() {
        let est = Estimates {
            step_s: None,
            ..EST
        };
        assert_eq!(decide(100.0, 106.0, &est, 0, 0.0), Verdict::Continue);
        let verdicts = [Verdict::Continue, Verdict::Stop, Verdict::Checkpoint];
        let agreed = verdicts.iter().map(|v| v.code()).fold(0.0, f32::max);
        assert_eq!(Verdict::from_code(agreed), Verdict::Stop);
        for v in verdicts {
            assert_eq!(Verdict::from_code(v.code()), v);
        }
    }

    #[test]
    fn guesses_scale_with_size_and_safety() {
        assert!((checkpoint_guess(400_000_000, 2.0) - 6.0).abs() < 1e-9);
        assert_eq!(drain_guess(1.5), 1.5);
    }

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
