//! A tidal job's worker side: before every step, each rank decides from its own clock
//! and estimates whether another step still fits before the deadline (the window's, or a
//! preemption's that its agent wrote to the control file), and the ranks agree on the
//! strictest verdict with one all-reduce, so that every rank saves, or stops, at the same
//! step.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use parallel::{Collectives, Communicator, ReduceOp};

use super::decide::{self, Estimates, Verdict};
use super::WindowWork;

/// The environment variable naming the file the agent writes a preemption's deadline to
/// (Unix seconds, one line).
pub const CONTROL_ENV: &str = "TIDEMILL_CONTROL";

/// One rank's view of the window.
pub struct Tide {
    work: WindowWork,
    control: Option<PathBuf>,
    /// Seconds between the last step boundaries (a step with whatever ran between steps).
    recent: VecDeque<f64>,
    boundary: Option<Instant>,
    /// The step of the newest checkpoint saved (or resumed from), and the step the window
    /// started at.
    saved_step: u64,
    first_step: u64,
    /// The slowest checkpoint measured in this window (it replaces what the window began
    /// with: a guess, or earlier windows' measurement).
    checkpoint_s: Option<f64>,
}

/// How many recent steps the step estimate looks at (it takes the slowest).
const RECENT: usize = 8;

impl Tide {
    /// For a worker of a tidal window (`None` outside one), whose trainer is at `step`.
    pub fn new(work: Option<WindowWork>, step: u64) -> Option<Self> {
        Some(Self {
            work: work?,
            control: std::env::var_os(CONTROL_ENV).map(PathBuf::from),
            recent: VecDeque::new(),
            boundary: None,
            saved_step: step,
            first_step: step,
            checkpoint_s: None,
        })
    }

    /// The deadline now, and whether a preemption set it: the window's, or an earlier one
    /// a preemption set.
    pub fn deadline(&self) -> (f64, bool) {
        let preempted = self
            .control
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| t.is_finite());
        match preempted {
            Some(p) => (p.min(self.work.deadline), true),
            None => (self.work.deadline, false),
        }
    }

    /// The estimates as measured so far in this window.
    pub fn estimates(&self) -> Estimates {
        let measured = self
            .recent
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        Estimates {
            step_s: measured.or(self.work.estimates.step_s),
            checkpoint_s: self
                .checkpoint_s
                .unwrap_or(self.work.estimates.checkpoint_s),
            drain_s: self.work.estimates.drain_s,
        }
    }

    /// A checkpoint of `step` started (it commits before this rank exits: the steps up
    /// to it are not lost).
    pub fn saving(&mut self, step: u64) {
        self.saved_step = self.saved_step.max(step);
    }

    /// A checkpoint took `seconds`, from its start to its commit: the estimate is the
    /// slowest measured in this window.
    pub fn saved(&mut self, seconds: f64) {
        if seconds.is_finite() && seconds > 0.0 {
            self.checkpoint_s = Some(self.checkpoint_s.map_or(seconds, |e| e.max(seconds)));
        }
    }

    /// Whether steps were taken in this window and every one is in a checkpoint (saved now,
    /// or by the save in flight that the exit waits for).
    pub fn all_saved(&self, done: u64) -> bool {
        done > self.first_step && self.unsaved(done) == 0
    }

    /// Seconds still to go of a checkpoint started `elapsed` seconds ago in the background:
    /// what the estimate leaves, and at least a quarter of it (a save past its estimate is
    /// not done yet).
    fn in_flight(&self, elapsed: Option<f64>) -> f64 {
        let e = self.estimates().checkpoint_s;
        elapsed.map_or(0.0, |t| (e - t).max(e * 0.25))
    }

    /// At the boundary before step `done + 1`, with a background save started `pending`
    /// seconds ago, if any: this rank's verdict, agreed with every rank of `world` (the
    /// strictest wins).
    pub fn boundary(
        &mut self,
        world: &dyn Communicator,
        done: u64,
        pending: Option<f64>,
    ) -> parallel::Result<Verdict> {
        let now = Instant::now();
        if let Some(prev) = self.boundary.replace(now) {
            self.recent
                .push_back(now.duration_since(prev).as_secs_f64());
            if self.recent.len() > RECENT {
                self.recent.pop_front();
            }
        }
        let (deadline, preempted) = self.deadline();
        let mut estimates = self.estimates();
        if preempted {
            // "The window ends now, with this grace": no further step.
            estimates.step_s = Some(f64::INFINITY);
        }
        let mine = decide::decide(
            super::now(),
            deadline,
            &estimates,
            done.saturating_sub(self.saved_step),
            self.in_flight(pending),
        );
        let mut code = [mine.code()];
        world.all_reduce(&mut code, ReduceOp::Max)?;
        Ok(Verdict::from_code(code[0]))
    }

    /// Whether a checkpoint started now would commit, and the workers be gone, before the
    /// deadline, agreed by every rank of `world` (all save, or none: a rank's commit waits
    /// for every rank's part).
    pub fn save_fits(
        &self,
        world: &dyn Communicator,
        pending: Option<f64>,
    ) -> parallel::Result<bool> {
        let (deadline, _) = self.deadline();
        let e = self.estimates();
        let fits = super::now() + self.in_flight(pending) + e.checkpoint_s + e.drain_s <= deadline;
        let mut code = [if fits { 0.0f32 } else { 1.0 }];
        world.all_reduce(&mut code, ReduceOp::Max)?;
        Ok(code[0] == 0.0)
    }

    /// Steps taken since the newest checkpoint.
    pub fn unsaved(&self, done: u64) -> u64 {
        done.saturating_sub(self.saved_step)
    }

    /// Forget the last boundary (time spent saving is not a step's).
    pub fn pause(&mut self) {
        self.boundary = None;
    }
}
