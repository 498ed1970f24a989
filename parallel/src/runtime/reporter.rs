//! Progress reporting that never blocks training: messages go into an unbounded channel
//! and a background thread writes them to the agent. If the agent is gone, they are dropped.

use std::io::BufWriter;
use std::net::TcpStream;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::link::{write_line, Progress, ToAgent};

/// Sends progress and events to the node agent.
pub struct Reporter {
    tx: Option<Sender<ToAgent>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    phase: String,
    step: u64,
    loss: f64,
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
        }
    }

    pub(crate) fn start(agent: TcpStream, rank: usize) -> Self {
        let (tx, rx) = channel::<ToAgent>();
        let thread = std::thread::Builder::new()
            .name("tidemill-reporter".into())
            .spawn(move || {
                let mut out = BufWriter::new(agent);
                for msg in rx {
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
        }
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
        self.progress(step_time, extra, seq);
    }

    fn progress(&self, step_time: f64, extra: serde_json::Value, seq: u64) {
        self.send(ToAgent::Progress(Progress {
            rank: self.rank,
            step: self.step,
            loss: self.loss,
            phase: self.phase.clone(),
            seq,
            step_time,
            extra,
        }));
    }

    /// Enter a phase ("train", "eval", "export"...).
    pub fn phase(&mut self, phase: &str) {
        self.phase = phase.into();
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

impl Drop for Reporter {
    fn drop(&mut self) {
        self.flush(Duration::from_secs(2));
    }
}
