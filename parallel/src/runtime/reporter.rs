//! Progress reporting that never blocks training: messages go into an unbounded channel
//! and a background thread writes them to the agent. If the agent is gone, they are dropped.
//! The same thread sends the worker's [`Position`] every [`POSITION_EVERY`], so the
//! coordinator hears from a rank blocked in a collective (and not from a stopped one).

use std::io::BufWriter;
use std::net::TcpStream;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::link::{write_line, Position, Progress, ToAgent, POSITION_EVERY};
use super::position;

/// Sends progress and events to the node agent.
pub struct Reporter {
    tx: Option<Sender<ToAgent>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    phase: String,
    step: u64,
    loss: f64,
    /// Phase and step, for the thread's position reports.
    shared: Arc<Mutex<(String, u64)>>,
    /// When the previous step was reported, and the collective wait by then.
    last_step: (Instant, f64),
}

impl Reporter {
    /// A reporter that drops everything (no launcher).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            thread: None,
            rank: 0,
            phase: "setup".into(),
            step: 0,
            loss: f64::NAN,
            shared: Arc::default(),
            last_step: (Instant::now(), 0.0),
        }
    }

    pub(crate) fn start(agent: TcpStream, rank: usize) -> Self {
        let (tx, rx) = channel::<ToAgent>();
        let shared = Arc::new(Mutex::new(("setup".to_string(), 0u64)));
        let seen = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tidemill-reporter".into())
            .spawn(move || {
                let mut out = BufWriter::new(agent);
                let mut next_position = Instant::now() + POSITION_EVERY;
                loop {
                    let wait = next_position.saturating_duration_since(Instant::now());
                    let msg = match rx.recv_timeout(wait) {
                        Ok(msg) => msg,
                        Err(RecvTimeoutError::Timeout) => {
                            next_position = Instant::now() + POSITION_EVERY;
                            where_now(rank, &seen)
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if write_line(&mut out, &msg).is_err() {
                        break;
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
            rank,
            phase: "setup".into(),
            step: 0,
            loss: f64::NAN,
            shared,
            last_step: (Instant::now(), position::snapshot().waited_s),
        }
    }

    fn share(&self) {
        *self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (self.phase.clone(), self.step);
    }

    fn send(&self, msg: ToAgent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(msg);
        }
    }

    /// Report a finished optimizer step: its loss, how long it took, the world group's
    /// collective sequence number; `extra` (an object) goes into the event log.
    pub fn step(
        &mut self,
        step: u64,
        loss: f64,
        step_time: f64,
        seq: u64,
        extra: serde_json::Value,
    ) {
        self.step = step;
        self.loss = loss;
        self.share();
        let now = (Instant::now(), position::snapshot());
        let period = now
            .0
            .saturating_duration_since(self.last_step.0)
            .as_secs_f64();
        let busy = (period - (now.1.waited_s - self.last_step.1)).max(0.0);
        self.last_step = (now.0, now.1.waited_s);
        self.send(ToAgent::Progress(Progress {
            rank: self.rank,
            step: self.step,
            loss: self.loss,
            phase: self.phase.clone(),
            seq,
            step_time,
            busy,
            collectives: now.1.entered,
            extra,
        }));
    }

    /// Enter a phase ("train", "eval", "export"...).
    pub fn phase(&mut self, phase: &str) {
        self.phase = phase.into();
        self.share();
        self.send(ToAgent::Event {
            rank: self.rank,
            event: "phase".into(),
            fields: serde_json::json!({"phase": phase, "step": self.step}),
        });
    }

    /// A job event for `events.jsonl` (`fields` is an object).
    pub fn event(&self, event: &str, fields: serde_json::Value) {
        self.send(ToAgent::Event {
            rank: self.rank,
            event: event.into(),
            fields,
        });
    }

    /// Tell the agent why this worker is failing; call before exiting non-zero.
    pub fn error(&self, message: &str) {
        self.send(ToAgent::Error {
            rank: self.rank,
            message: message.into(),
        });
    }

    /// Send what is queued (waiting at most `timeout`) and stop the thread.
    pub fn flush(&mut self, timeout: Duration) {
        self.tx = None;
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

/// The position message the reporter's thread sends when it has nothing else to.
fn where_now(rank: usize, shared: &Mutex<(String, u64)>) -> ToAgent {
    let (phase, step) = shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let p = position::snapshot();
    ToAgent::Position(Position {
        rank,
        step,
        phase,
        collectives: p.entered,
        collective: p.last.to_string(),
        inside: p.inside,
    })
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.flush(Duration::from_secs(2));
    }
}
