//! The step-boundary decision of a tidal job: one more step, or the final checkpoint now,
//! or stop without one. Pure (times are arguments), tested with fake time; every rank
//! decides with its own clock and estimates and the job takes the strictest verdict
//! (`crate::tidal::worker`).

use serde::{Deserialize, Serialize};

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
}
