//! Where this process is, for the coordinator's detectors: its phase and the steps it has
//! taken (the trainer sets them), how many collectives it has entered (on any group), the
//! kind of the last, whether it is inside one now, and the seconds it has spent inside
//! them (the communicators update these on every call). The reporter's background thread
//! reads it, so a rank blocked in a collective still says where it is, and a stopped
//! process goes silent.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::link::Phase;

static PHASE: AtomicU8 = AtomicU8::new(0);
static STEP: AtomicU64 = AtomicU64::new(0);
static ENTERED: AtomicU64 = AtomicU64::new(0);
static INSIDE: AtomicU64 = AtomicU64::new(0);
static WAITED_NS: AtomicU64 = AtomicU64::new(0);
static LAST: Mutex<&str> = Mutex::new("");

/// A collective in progress; dropping it adds its duration to the time spent waiting.
pub struct InCollective {
    started: Instant,
}

/// Enter a collective (`counted`) or a point-to-point transfer named `name`: both count as
/// waiting; only collectives advance the count every rank of a group shares.
pub fn enter(name: &'static str, counted: bool) -> InCollective {
    *LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = name;
    if counted {
        ENTERED.fetch_add(1, Ordering::Relaxed);
    }
    INSIDE.fetch_add(1, Ordering::Relaxed);
    InCollective {
        started: Instant::now(),
    }
}

impl Drop for InCollective {
    fn drop(&mut self) {
        let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        WAITED_NS.fetch_add(ns, Ordering::Relaxed);
        INSIDE.fetch_sub(1, Ordering::Relaxed);
    }
}

const PHASES: [Phase; 4] = [Phase::Setup, Phase::Train, Phase::Eval, Phase::Export];

/// Enter `phase`; returns the phase left.
pub(crate) fn set_phase(phase: Phase) -> Phase {
    let index = PHASES.iter().position(|&p| p == phase).unwrap_or(0);
    let before = PHASE.swap(index as u8, Ordering::Relaxed);
    PHASES.get(usize::from(before)).copied().unwrap_or_default()
}

/// The phase this process is in.
pub fn phase() -> Phase {
    PHASES
        .get(usize::from(PHASE.load(Ordering::Relaxed)))
        .copied()
        .unwrap_or_default()
}

/// Record that `step` optimizer steps are done.
pub(crate) fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

/// Optimizer steps done.
pub fn step() -> u64 {
    STEP.load(Ordering::Relaxed)
}

/// This process's position at a moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Collectives entered so far.
    pub entered: u64,
    /// The kind of the last one ("all_reduce", "send"...; empty before the first).
    pub last: &'static str,
    /// Inside that collective now.
    pub inside: bool,
    /// Seconds spent inside collectives so far.
    pub waited_s: f64,
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        entered: ENTERED.load(Ordering::Relaxed),
        last: *LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        inside: INSIDE.load(Ordering::Relaxed) > 0,
        waited_s: WAITED_NS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_counts_and_leaving_adds_the_wait() {
        let before = snapshot();
        {
            let _in = enter("all_reduce", true);
            let now = snapshot();
            assert!(now.inside && now.entered > before.entered);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let after = snapshot();
        assert!(after.waited_s - before.waited_s >= 0.019, "{after:?}");
    }
}
