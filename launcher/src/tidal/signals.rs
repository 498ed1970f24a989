//! The signals a tidal job's `launch train` notes for its whole life, whatever runs when
//! they come (between windows, while planning, in the agent): SIGTERM or SIGUSR1 (a
//! preemption) and SIGINT. signal-hook flags; tokio's handlers in the agent share the same
//! registry, so both see every signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// SIGTERM or SIGUSR1 came (a preemption: this process is being asked to go, so the loop
/// over windows ends with status 75 rather than waiting for the next window), and SIGINT.
/// Noted from the loop's start to the process's end, whatever runs when they come.
static TERM: std::sync::OnceLock<(Arc<AtomicBool>, Arc<AtomicBool>)> = std::sync::OnceLock::new();

pub fn watch() -> &'static (Arc<AtomicBool>, Arc<AtomicBool>) {
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
pub fn stopping(when: &str) -> Result<()> {
    let (term, int) = watch();
    if int.load(Ordering::SeqCst) {
        return Err(Error::JobStopped("interrupted (SIGINT)".into()));
    }
    if term.load(Ordering::SeqCst) {
        return Err(Error::Yielded(format!("preempted {when}")));
    }
    Ok(())
}
