//! Where this process is in the job's collectives, for the coordinator's detectors: how
//! many collectives it has entered (on any group), the kind of the last, whether it is
//! inside one now, and the seconds it has spent inside them. The communicators update it
//! on every call; the reporter's background thread reads it, so a rank blocked in a
//! collective still says where it is, and a stopped process goes silent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

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
