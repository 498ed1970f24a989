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

/// What a worker sends its agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    Hello {
        rank: usize,
        data_addr: String,
        pid: u32,
    },
    /// Sent after every optimizer step and on phase changes.
    Progress(Progress),
    /// Sent by the reporter's thread every [`POSITION_EVERY`], also while the worker is
    /// blocked in a collective (a stopped process sends nothing).
    Position(Position),
    /// A job event for `events.jsonl` (audit, eval, export, done...).
    Event {
        rank: usize,
        event: String,
        fields: serde_json::Value,
    },
    /// Why this worker is about to exit non-zero.
    Error { rank: usize, message: String },
}

/// A worker's progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub rank: usize,
    /// Optimizer steps done.
    pub step: u64,
    /// Loss of the last step (NaN before the first).
    pub loss: f64,
    /// "setup", "train", "eval", "export", ...
    pub phase: String,
    /// Collectives issued on the world group so far.
    pub seq: u64,
    /// Seconds the last step took.
    pub step_time: f64,
    /// Seconds since the previous step's report not spent waiting in collectives (what a
    /// slow rank has more of; its peers wait for it).
    #[serde(default)]
    pub busy: f64,
    /// Collectives this process has entered (see [`crate::runtime::position`]).
    #[serde(default)]
    pub collectives: u64,
    /// Anything else for the event log (lr, grad norm, tokens...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// How often a worker says where it is.
pub const POSITION_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a worker is: for the coordinator's hang detector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub rank: usize,
    /// Optimizer steps done.
    pub step: u64,
    pub phase: String,
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
    let msg = ToAgent::Hello {
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
        let p = ToAgent::Progress(Progress {
            rank: 1,
            step: 3,
            loss: 2.5,
            phase: "train".into(),
            seq: 40,
            step_time: 0.25,
            busy: 0.2,
            collectives: 41,
            extra: serde_json::json!({"lr": 1e-3}),
        });
        let mut buf = Vec::new();
        write_line(&mut buf, &p).expect("write");
        let text = String::from_utf8(buf).expect("utf8");
        assert!(
            text.ends_with('\n') && text.contains("\"type\":\"progress\""),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<ToAgent>(text.trim()).expect("parse"),
            p
        );
    }
}
