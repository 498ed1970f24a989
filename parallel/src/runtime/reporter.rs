//! Progress reporting that never blocks training: messages go into an unbounded channel
//! and a background thread hands them, one JSON line each, to a sink — the node agent's
//! link for a launched worker, or whatever a process running alone installs (`launch
//! train`'s single-process mode writes its event log). If the sink is gone they are
//! dropped. The same thread sends the worker's [`Position`] every [`POSITION_EVERY`], so
//! the coordinator hears from a rank blocked in a collective (and not from a stopped one).
//!
//! A launched worker has one reporter: [`init`](super::init) puts it in place ([`install`])
//! and a trainer built without a reporter of its own reports its steps and phases to it
//! ([`report`]) by itself: a custom training loop needs no reporting code. A program
//! that runs several jobs at once (tests, a notebook) gives each trainer its own.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::link::{Phase, Position, Progress, StepReport, ToAgent, POSITION_EVERY};
use super::position;

/// Where the reporter's lines go.
pub type Sink = Box<dyn FnMut(&str) -> std::io::Result<()> + Send>;

enum Msg {
    Line(String),
    Stop,
}

/// A cheap handle to the process's reporter; every method returns at once.
#[derive(Clone, Default)]
pub struct Report {
    tx: Option<Sender<Msg>>,
    rank: usize,
    /// When the previous step was reported, and the collective wait by then.
    last_step: Arc<Mutex<Option<(Instant, f64)>>>,
}

/// The process's reporter: its thread runs until this is dropped (or [`Reporter::flush`]ed),
/// which sends what is queued first.
pub struct Reporter {
    report: Report,
    thread: Option<JoinHandle<()>>,
}

static CURRENT: Mutex<Option<Report>> = Mutex::new(None);

fn current() -> std::sync::MutexGuard<'static, Option<Report>> {
    CURRENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The process's reporter (one that drops everything when none is installed).
pub fn report() -> Report {
    current().clone().unwrap_or_default()
}

/// Make `reporter` the process's reporter (the previous one stops receiving).
pub fn install(reporter: &Reporter) {
    *current() = Some(reporter.report.clone());
}

impl Reporter {
    /// A reporter that drops everything (no launcher).
    pub fn disabled() -> Self {
        Self {
            report: Report::default(),
            thread: None,
        }
    }

    /// A reporter for `rank` whose lines go to `sink`, from a thread of its own.
    pub fn start(rank: usize, mut sink: Sink) -> Self {
        let (tx, rx) = channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("tidemill-reporter".into())
            .spawn(move || {
                let mut next_position = Instant::now() + POSITION_EVERY;
                loop {
                    let wait = next_position.saturating_duration_since(Instant::now());
                    let line = match rx.recv_timeout(wait) {
                        Ok(Msg::Line(line)) => line,
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                        Err(RecvTimeoutError::Timeout) => {
                            next_position = Instant::now() + POSITION_EVERY;
                            match serde_json::to_string(&where_now(rank)) {
                                Ok(line) => line,
                                Err(_) => continue,
                            }
                        }
                    };
                    if sink(&line).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            report: Report {
                tx: Some(tx),
                rank,
                last_step: Arc::default(),
            },
            thread,
        }
    }

    /// A handle to this reporter.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Send what is queued (waiting at most `timeout`) and stop the thread.
    pub fn flush(&mut self, timeout: Duration) {
        if let Some(tx) = self.report.tx.take() {
            let _ = tx.send(Msg::Stop);
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + timeout;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl std::ops::Deref for Reporter {
    type Target = Report;
    fn deref(&self) -> &Report {
        &self.report
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.flush(Duration::from_secs(2));
    }
}

impl Report {
    fn send<E: Serialize>(&self, msg: &ToAgent<E>) {
        if let Some(tx) = &self.tx {
            if let Ok(line) = serde_json::to_string(msg) {
                let _ = tx.send(Msg::Line(line));
            }
        }
    }

    /// Enter `phase` (returning the phase left): the coordinator hears of it (hangs are
    /// looked for only while every rank trains). The trainer calls this itself.
    pub fn set_phase(&self, phase: Phase) -> Phase {
        let before = position::set_phase(phase);
        if before != phase {
            self.send(&ToAgent::<()>::Phase {
                rank: self.rank,
                phase,
                step: position::step(),
            });
        }
        before
    }

    /// Report a finished optimizer step; `seq` is the data-parallel group's collective
    /// count. The trainer calls this itself after every step.
    pub fn step(&self, stats: &StepReport, seq: u64) {
        position::set_step(stats.step);
        let now = (Instant::now(), position::snapshot());
        let mut last = self
            .last_step
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (before, waited) = last.unwrap_or((now.0, now.1.waited_s));
        let period = now.0.saturating_duration_since(before).as_secs_f64();
        let busy = if last.is_some() {
            (period - (now.1.waited_s - waited)).max(0.0)
        } else {
            stats.step_time
        };
        *last = Some((now.0, now.1.waited_s));
        self.send(&ToAgent::<()>::Progress(Progress {
            rank: self.rank,
            phase: position::phase(),
            seq,
            busy,
            collectives: now.1.entered,
            stats: stats.clone(),
        }));
    }

    /// A job event for `events.jsonl`, of the job's own event type.
    pub fn event<E: Serialize>(&self, event: &E) {
        self.send(&ToAgent::Event {
            rank: self.rank,
            event,
        });
    }

    /// Tell the agent why this worker is failing; call before exiting non-zero.
    pub fn error(&self, message: &str) {
        self.send(&ToAgent::<()>::Error {
            rank: self.rank,
            message: message.into(),
        });
    }
}

/// The position message the reporter's thread sends when it has nothing else to.
fn where_now(rank: usize) -> ToAgent<()> {
    let p = position::snapshot();
    ToAgent::Position(Position {
        rank,
        step: position::step(),
        phase: position::phase(),
        collectives: p.entered,
        collective: p.last.to_string(),
        inside: p.inside,
    })
}
