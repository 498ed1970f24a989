//! `events.jsonl`: one [`Record`] per line, appended and flushed as things happen. Every
//! line is one [`Event`] (tagged by its `event` field) with the time, the generation and
//! the rank and node it concerns. The coordinator writes them (a job run in one process
//! writes its own), workers send theirs typed, and tests and tools read them back with
//! [`read`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parallel::runtime::{Phase, StepReport, ToAgent};
use serde::{Deserialize, Serialize};
use trainer::data::DataAudit;

use crate::error::{Error, Result};
pub use crate::plan::{AutoPick, PlanEvent};

/// One line of `events.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix seconds.
    pub time: f64,
    /// The coordinator's generation (bumped by every restart).
    pub generation: u64,
    /// The rank and node it concerns; `None` for job-wide events.
    pub rank: Option<usize>,
    pub node: Option<usize>,
    #[serde(flatten)]
    pub event: Event,
}

/// Everything that happens to a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The job started: what it runs and how it is laid out.
    Start(Start),
    /// A node's agent joined.
    Join {
        host: String,
        nproc: u32,
        spare: bool,
    },
    /// An agent started a worker.
    Spawn { pid: u32, local_rank: usize },
    /// A worker entered a phase.
    Phase { phase: Phase, step: u64 },
    /// What the data pipeline made of a split (rank 0).
    Audit { split: Split, audit: DataAudit },
    /// A finished optimizer step of a rank.
    Step(StepEvent),
    /// The whole evaluation set's mean token loss after `step` steps.
    Eval {
        step: u64,
        #[serde(with = "any_f64")]
        loss: f64,
        tokens: usize,
    },
    /// A committed checkpoint; `stall_s`: how long it blocked training.
    Checkpoint {
        step: u64,
        path: PathBuf,
        #[serde(rename = "async")]
        async_save: bool,
        stall_s: f64,
        snapshot_s: f64,
        /// Seconds from the save's start to its commit (a background save's too).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        took_s: Option<f64>,
    },
    /// A checkpoint that did not verify and was passed over.
    CheckpointSkipped {
        dir: PathBuf,
        file: PathBuf,
        reason: String,
    },
    /// Training went on from a checkpoint.
    Resumed { step: u64, from_checkpoint: PathBuf },
    /// The automatic plan's predicted step time next to the measured one.
    PlanCheck {
        #[serde(with = "any_f64")]
        predicted_step_time_s: f64,
        #[serde(with = "any_f64")]
        measured_step_time_s: f64,
        #[serde(with = "any_f64")]
        measured_over_predicted: f64,
        steps: usize,
    },
    /// A result written by rank 0.
    Export { format: ExportFormat, path: PathBuf },
    /// The job finished: steps and last loss for `launch train`, time for every job.
    Done {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        steps: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f64>,
        seconds: f64,
    },
    /// A worker's last words before exiting non-zero.
    Error { message: String },
    /// A worker process ended.
    Exit {
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
        message: String,
    },
    /// A detected fault.
    Fault {
        kind: FaultKind,
        detail: String,
        /// Unix seconds.
        detected_at: f64,
        detection_latency_s: f64,
    },
    /// What the coordinator decided about a fault, and why.
    Decision {
        action: Action,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fault: Option<FaultKind>,
    },
    /// A new generation started with these nodes and this layout.
    Restart {
        world: usize,
        nodes: Vec<usize>,
        plan: Option<PlanEvent>,
    },
    /// The first step after a fault.
    Recovered { step: u64, seconds_since_fault: f64 },
    /// A control-plane call without the job's token.
    AuthRejected { peer: String, reason: String },
    /// A tidal window opened: this part of the job runs from `start` (Unix seconds) and
    /// must have handed the GPUs back by `handback` (the window's `end` − the margin).
    WindowOpen {
        start: f64,
        end: f64,
        handback: f64,
        world: usize,
    },
    /// Rank 0, at the step boundary where a tidal window's job stopped: the steps taken,
    /// whether this window took steps and every one is in a committed checkpoint, and how
    /// many since the last checkpoint are lost.
    Yield {
        step: u64,
        checkpointed: bool,
        lost_steps: u64,
        /// Unix seconds of the decision's end (the final checkpoint committed, if any).
        at: f64,
    },
    /// A tidal job was preempted: every worker is to be gone by `by` (Unix seconds).
    Preempt { by: f64 },
    /// A tidal window closed: why, the step reached, the steps to do again next time.
    WindowClose {
        reason: CloseReason,
        steps: u64,
        lost_steps: u64,
    },
    /// A node's workers and their process groups are gone, and no process of ours holds
    /// GPU memory (checked with NVML on CUDA): `margin_s` to spare before the hand-back.
    GpusReleased {
        at: f64,
        margin_s: f64,
        checked: String,
    },
    /// An event of a user's program (`launch run`) that is not one of tidemill's: its own
    /// name and fields, as it sent them.
    User {
        name: String,
        fields: serde_json::Map<String, serde_json::Value>,
    },
}

/// A number that may not be finite (a diverged model's loss): JSON has no NaN or infinity,
/// so it is written `null` and read back as NaN.
mod any_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match v.is_finite() {
            true => s.serialize_f64(*v),
            false => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// An event as a user's program may send it: any `event` name, any fields.
#[derive(Deserialize)]
struct UserEvent {
    event: String,
    #[serde(flatten)]
    fields: serde_json::Map<String, serde_json::Value>,
}

/// A worker's (or agent's) report line, typed: tidemill's own events as [`Event`], a user
/// program's others as [`Event::User`]. The error says why a line is not a report.
pub fn parse_report(line: &str) -> std::result::Result<ToAgent<Event>, String> {
    match serde_json::from_str::<ToAgent<Event>>(line) {
        Ok(msg) => Ok(msg),
        Err(typed) => match serde_json::from_str::<ToAgent<UserEvent>>(line) {
            Ok(ToAgent::Event { rank, event }) => Ok(ToAgent::Event {
                rank,
                event: Event::User {
                    name: event.event,
                    fields: event.fields,
                },
            }),
            Ok(_) | Err(_) => Err(typed.to_string()),
        },
    }
}

/// A rank's step, as the coordinator logs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    pub phase: Phase,
    /// Collectives issued on the data-parallel group so far.
    pub seq: u64,
    /// Seconds since the previous step not spent waiting in collectives.
    pub busy: f64,
    /// Collectives this rank has entered.
    pub collectives: u64,
    #[serde(flatten)]
    pub stats: StepReport,
}

/// Why a tidal window closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The window's end (less the margin) came.
    Deadline,
    /// A signal or `launch preempt` ended it early.
    Preempted,
    /// `training.max_steps` reached.
    Finished,
    /// The job stopped with an error (the coordinator gave up).
    Stopped,
}

/// The kinds of fault the coordinator detects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A worker exited non-zero or by a signal.
    Crash,
    /// An agent stopped beating.
    LostHeartbeat,
    /// No progress for longer than the hang limit.
    Hang,
    /// A rank much busier than the others for several steps.
    Straggler,
    /// A member's agent came back as a new process while its generation ran.
    AgentRestart,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::LostHeartbeat => "lost_heartbeat",
            FaultKind::Hang => "hang",
            FaultKind::Straggler => "straggler",
            FaultKind::AgentRestart => "agent_restart",
        }
    }
}

/// What the coordinator does about a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Report only; training goes on.
    Continue,
    /// Kill every worker and start the same layout again from the last checkpoint.
    RestartInPlace,
    /// Put a spare where a lost node was, restart with the same layout.
    ReplaceNode,
    /// Drop a node, re-plan for the nodes left, reshard and restart.
    Shrink,
    /// Stop the job with an error.
    GiveUp,
    /// A spare went silent: it stops being one.
    DropSpare,
}

/// A data split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

/// What `export/` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// A PEFT adapter.
    Peft,
    /// A Hugging Face model directory.
    Hf,
}

/// The `start` event of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Start {
    /// `launch train`: the job's name, model and mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// `launch run`: the user's program and its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    pub world_size: usize,
    pub nnodes: usize,
    pub nproc_per_node: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanEvent>,
}

/// Full-parameter fine-tuning or LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Full,
    Lora,
}

/// The job's event log.
pub struct EventLog {
    file: File,
    path: PathBuf,
    generation: u64,
}

impl EventLog {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            generation: 0,
        })
    }

    /// Stamp later events with `generation` (the coordinator's, after a restart).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Append `event` about `rank` on `node` (`None`: job-wide).
    pub fn emit(&mut self, event: Event, rank: Option<usize>, node: Option<usize>) -> Result<()> {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let record = Record {
            time,
            generation: self.generation,
            rank,
            node,
            event,
        };
        let line = serde_json::to_string(&record).map_err(|e| Error::Launch(e.to_string()))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Every record of an event log, in order; a line that is not a record (a run cut off
/// mid-line) is an error naming the file and line.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Config {
                file: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the coordinator writes reads back as the same records, a diverged loss and a
    /// user program's event included.
    #[test]
    fn records_read_back_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let mut log = EventLog::open(&path).expect("open");
        let eval = Event::Eval {
            step: 3,
            loss: f64::INFINITY,
            tokens: 7,
        };
        log.emit(eval, Some(0), Some(0)).expect("emit");
        let line = r#"{"type":"event","rank":1,"event":{"event":"finished","steps":3}}"#;
        let Ok(ToAgent::Event { rank, event }) = parse_report(line) else {
            panic!("a user's event is a report");
        };
        log.emit(event, Some(rank), Some(0)).expect("emit");
        assert!(parse_report(r#"{"type":"nonsense"}"#).is_err());
        let records = read(&path).expect("read");
        assert_eq!(records.len(), 2);
        assert!(
            matches!(records[0].event, Event::Eval { loss, tokens: 7, .. } if loss.is_nan()),
            "{records:?}"
        );
        match &records[1].event {
            Event::User { name, fields } => {
                assert_eq!(
                    (name.as_str(), &fields["steps"]),
                    ("finished", &serde_json::json!(3))
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
