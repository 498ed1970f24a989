//! Fault injection for the project's own tests, compiled only with the `test-hooks`
//! feature (the tests turn it on; release builds have no such hook).
//!
//! `TIDEMILL_TEST_DELAY=RANK:SECONDS[,RANK:SECONDS…]` (`*` for any rank; a rank's own entry
//! wins): a rank sleeps that long after every step — a straggler for the coordinator to
//! find, or steps slow enough for a test to act between them.
//!
//! `TIDEMILL_TEST_SAVE_DELAY=SECONDS`: every checkpoint write takes that much longer (a
//! slow disk, for the tidal tests).

use std::time::Duration;

/// How long rank `rank` sleeps after each step, if the environment says so.
#[cfg(feature = "test-hooks")]
pub fn step_delay(rank: usize) -> Option<Duration> {
    let spec = std::env::var("TIDEMILL_TEST_DELAY").ok()?;
    let mut any = None;
    for entry in spec.split(',') {
        let (r, secs) = entry.split_once(':')?;
        let secs: f64 = secs
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s > 0.0)?;
        match r.trim() {
            "*" => any = Some(secs),
            r if r.parse::<usize>().ok() == Some(rank) => {
                return Some(Duration::from_secs_f64(secs))
            }
            _ => {}
        }
    }
    any.map(Duration::from_secs_f64)
}

/// Without the `test-hooks` feature: never.
#[cfg(not(feature = "test-hooks"))]
pub fn step_delay(_rank: usize) -> Option<Duration> {
    None
}

/// How much longer every checkpoint write takes, if the environment says so.
#[cfg(feature = "test-hooks")]
pub fn save_delay() -> Option<Duration> {
    std::env::var("TIDEMILL_TEST_SAVE_DELAY")
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
}

/// Without the `test-hooks` feature: never.
#[cfg(not(feature = "test-hooks"))]
pub fn save_delay() -> Option<Duration> {
    None
}
