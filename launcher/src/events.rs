//! `events.jsonl`: one JSON object per line, appended and flushed as things happen.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The job's event log. Every event carries `event`, `time` (Unix seconds), `generation`,
/// `rank` and `node` (null for job-wide events).
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

    /// Append an event of rank 0 on node 0 (a job run in one process).
    pub fn emit(&mut self, kind: &str, fields: Value) -> Result<()> {
        self.emit_as(kind, Some(0), Some(0), fields)
    }

    /// Append `{"event": kind, "time", "generation", "rank", "node", ...fields}`.
    pub fn emit_as(
        &mut self,
        kind: &str,
        rank: Option<usize>,
        node: Option<usize>,
        fields: Value,
    ) -> Result<()> {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut obj = Map::new();
        obj.insert("event".into(), json!(kind));
        obj.insert("time".into(), json!(time));
        obj.insert("generation".into(), json!(self.generation));
        obj.insert("rank".into(), json!(rank));
        obj.insert("node".into(), json!(node));
        if let Value::Object(extra) = fields {
            obj.extend(extra);
        }
        let line = Value::Object(obj).to_string();
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }
}
