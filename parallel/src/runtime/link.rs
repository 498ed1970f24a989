//! The worker ↔ agent link: JSON lines over a loopback TCP connection.
//!
//! Worker → agent: one [`ToAgent::Hello`] (rank, data-plane address, pid), then any number
//! of [`ToAgent::Progress`], [`ToAgent::Event`] and at most one [`ToAgent::Error`].
//! Agent → worker: one [`ToWorker::Peers`] once every rank of the job said hello.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a worker sends its agent. `E` is the job's event type: the worker's code writes
/// typed events (tidemill's `launcher::events::Event`, or a user program's own) and the
/// coordinator reads them back as that type; in between, the agent relays each line as
/// written, reading only its kind (`E` = [`Relayed`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent<E> {
    Hello {
        rank: usize,
        data_addr: String,
        pid: u32,
    },
    /// Sent after every optimizer step.
    Progress(Progress),
    /// Sent by the reporter's thread every [`POSITION_EVERY`], also while the worker is
    /// blocked in a collective (a stopped process sends nothing).
    Position(Position),
    /// The worker entered a phase.
    Phase {
        rank: usize,
        phase: Phase,
        step: u64,
    },
    /// A job event for `events.jsonl`.
    Event { rank: usize, event: E },
    /// Why this worker is about to exit non-zero.
    Error { rank: usize, message: String },
}

/// An event the agent relays without reading it.
pub type Relayed = serde::de::IgnoredAny;

/// What a worker is doing: the coordinator looks for hangs only while every rank trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Loading, sharding, resuming: before the first step.
    #[default]
    Setup,
    Train,
    Eval,
    Export,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Train => "train",
            Phase::Eval => "eval",
            Phase::Export => "export",
        }
    }
}

/// What one optimizer step did, as the trainer reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based number of the step just taken.
    pub step: u64,
    /// Mean cross-entropy over the supervised tokens of the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (padding excluded) and supervised, in the global batch.
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// Seconds the step took, and tokens per second over it.
    pub step_time: f64,
    pub tokens_per_s: f64,
    /// Gradient elements this rank computed, parameter elements it holds, and elements it
    /// keeps AdamW state for (its share under ZeRO-1).
    pub grad_elems: usize,
    pub param_elems: usize,
    pub optimizer_state_elems: usize,
    /// Device memory held after the step, bytes: the CUDA allocator's pools (their
    /// high-water mark), or on the CPU the process's peak resident memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_mem_bytes: Option<u64>,
    /// The dtype this rank's matmuls ran in (`f32`, or `bf16` under mixed precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<String>,
}

/// A worker's progress after a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub rank: usize,
    pub phase: Phase,
    /// Collectives issued on the data-parallel group so far.
    pub seq: u64,
    /// Seconds since the previous step's report not spent waiting in collectives (what a
    /// slow rank has more of; its peers wait for it).
    pub busy: f64,
    /// Collectives this process has entered (see [`crate::runtime::position`]).
    pub collectives: u64,
    #[serde(flatten)]
    pub stats: StepReport,
}

/// How often a worker says where it is.
pub const POSITION_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a worker is: for the coordinator's hang detector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub rank: usize,
    /// Optimizer steps done.
    pub step: u64,
    pub phase: Phase,
    /// Collectives entered, the kind of the last, and whether the worker is inside it.
    pub collectives: u64,
    pub collective: String,
    pub inside: bool,
}

/// What an agent sends a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Data-plane address of every rank, and the job's connection token.
    Peers { addrs: Vec<String>, nonce: u64 },
}

/// Write one message as a line.
pub fn write_line<T: Serialize>(mut w: impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Say hello and wait (up to `timeout`) for the peer table.
pub(crate) fn hello(
    agent: &TcpStream,
    rank: usize,
    data_addr: SocketAddr,
    timeout: Duration,
) -> Result<(Vec<SocketAddr>, u64)> {
    let lost = |e: std::io::Error| Error::Connect(format!("talking to the agent: {e}"));
    let msg = ToAgent::<()>::Hello {
        rank,
        data_addr: data_addr.to_string(),
        pid: std::process::id(),
    };
    write_line(agent, &msg).map_err(lost)?;
    let mut reader = BufReader::new(agent.try_clone().map_err(lost)?);
    agent.set_read_timeout(Some(timeout)).map_err(lost)?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(lost)?;
    agent.set_read_timeout(None).map_err(lost)?;
    let ToWorker::Peers { addrs, nonce } = serde_json::from_str(&line)
        .map_err(|e| Error::Connect(format!("the agent's peer table `{}`: {e}", line.trim())))?;
    let addrs = addrs
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|e| Error::Connect(format!("peer address `{a}`: {e}")))
        })
        .collect::<Result<Vec<SocketAddr>>>()?;
    Ok((addrs, nonce))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let p: ToAgent<()> = ToAgent::Progress(Progress {
            rank: 1,
            phase: Phase::Train,
            seq: 40,
            busy: 0.2,
            collectives: 41,
            stats: StepReport {
                step: 3,
                loss: 2.5,
                lr: 1e-3,
                step_time: 0.25,
                ..Default::default()
            },
        });
        let mut buf = Vec::new();
        write_line(&mut buf, &p).expect("write");
        let text = String::from_utf8(buf).expect("utf8");
        assert!(
            text.ends_with('\n')
                && text.contains("\"type\":\"progress\"")
                && text.contains("\"loss\":2.5"),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<ToAgent<()>>(text.trim()).expect("parse"),
            p
        );
        // An event travels as the worker wrote it and is read back as its own type.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "event", rename_all = "snake_case")]
        enum Mine {
            Done { seconds: f64 },
        }
        let line = serde_json::to_string(&ToAgent::Event {
            rank: 0,
            event: &Mine::Done { seconds: 1.5 },
        })
        .expect("line");
        let relayed: ToAgent<Relayed> = serde_json::from_str(&line).expect("relayed");
        assert!(matches!(relayed, ToAgent::Event { rank: 0, .. }));
        match serde_json::from_str::<ToAgent<Mine>>(&line).expect("typed") {
            ToAgent::Event { rank: 0, event } => assert_eq!(event, Mine::Done { seconds: 1.5 }),
            other => panic!("{other:?}"),
        }
    }
}
