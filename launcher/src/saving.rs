//! `[checkpoint]`: periodic sharded checkpoints of a training job (atomic, optionally
//! written in the background) and resuming from the newest valid one.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::sharded::{self, Checkpoint};
use serde_json::Value;

use parallel::runtime::Report;

use crate::config::CheckpointOptions;
use crate::error::Result;
use crate::events::Event;
use trainer::state::write_snapshot;
use trainer::{TrainBackend, Trainer};

/// Where a job's checkpoints go.
pub fn root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// On the lead rank: the step of the newest checkpoint that verifies (dropping unfinished
/// saves), each newer damaged one reported as an event naming the file.
pub fn find_resume(root: &Path, report: &Report) -> Result<Option<u64>> {
    if !root.exists() {
        return Ok(None);
    }
    sharded::clean_staging(root)?;
    let (found, skipped) = sharded::latest(root);
    for s in skipped {
        eprintln!("skipping checkpoint {}: {}", s.dir.display(), s.error);
        report.event(&Event::CheckpointSkipped {
            dir: s.dir,
            file: s.error.file,
            reason: s.error.reason,
        });
    }
    Ok(found.map(|c| c.step()))
}

/// Restore `trainer` from the checkpoint of `step` (every rank, after the lead found it).
pub fn resume<B: TrainBackend>(
    trainer: &mut Trainer<B>,
    root: &Path,
    step: u64,
) -> Result<PathBuf> {
    let dir = root.join(sharded::dir_name(step));
    let ckpt = Checkpoint::open(&dir, false).map_err(|e| trainer::Error::Training {
        key: "checkpoint".into(),
        message: e.to_string(),
    })?;
    trainer.restore(&ckpt)?;
    Ok(dir)
}

/// Saves of one rank: at most one in the background at a time.
pub struct Saver {
    root: PathBuf,
    rank: usize,
    world: usize,
    /// Where committed checkpoints are reported.
    report: Report,
    section: CheckpointOptions,
    /// The model's config and tokenizer files, copied into each checkpoint (by rank 0).
    extras: Vec<(String, PathBuf)>,
    pending: Option<Pending>,
    /// The newest save that finished: its step and seconds from its start to its commit.
    finished: Option<(u64, f64)>,
}

/// The save in the background.
struct Pending {
    step: u64,
    started: Instant,
    /// Seconds it has blocked training so far.
    stall_s: f64,
    /// Seconds of its host copy.
    snapshot_s: f64,
    /// The committed directory (rank 0) and seconds from the save's start to its end.
    writer: JoinHandle<Result<(Option<PathBuf>, f64)>>,
}

impl Saver {
    pub fn new(
        root: PathBuf,
        rank: usize,
        world: usize,
        report: Report,
        section: CheckpointOptions,
        extras: Vec<(String, PathBuf)>,
    ) -> Self {
        Self {
            root,
            rank,
            world,
            report,
            section,
            extras,
            pending: None,
            finished: None,
        }
    }

    /// The newest save that finished: its step and seconds from its start to its commit
    /// (on rank 0; to this rank's part written elsewhere).
    pub fn finished(&self) -> Option<(u64, f64)> {
        self.finished
    }

    /// Seconds since the save in the background started, if one is in flight.
    pub fn in_flight(&self) -> Option<f64> {
        self.pending
            .as_ref()
            .map(|p| p.started.elapsed().as_secs_f64())
    }

    /// Whether to save after `step` of `max_steps`.
    pub fn due(&self, step: u64, max_steps: u64) -> bool {
        step == max_steps || (self.section.every > 0 && step.is_multiple_of(self.section.every))
    }

    /// Save the trainer's state now (`extra` goes into the manifest's state next to the
    /// trainer's position): copied to the host here, written here or in the background.
    pub fn save<B: TrainBackend>(&mut self, trainer: &Trainer<B>, extra: &Value) -> Result<()> {
        self.wait()?;
        let started = Instant::now();
        let step = trainer.steps_done();
        let snapshot = trainer.snapshot();
        let snapshot_s = started.elapsed().as_secs_f64();
        let mut state = trainer.position();
        if let (Some(s), Some(e)) = (state.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        std::fs::create_dir_all(&self.root).map_err(|e| checkpoint::Error::Io {
            path: self.root.clone(),
            source: e,
        })?;
        let staging = sharded::stage(&self.root, step)?;
        sharded::crash_point("before_shards");
        let (root, rank, world) = (self.root.clone(), self.rank, self.world);
        let (keep, timeout) = (
            self.section.keep_last,
            Duration::from_secs_f64(self.section.commit_timeout_s),
        );
        let extras = self.extras.clone();
        let delay = crate::hooks::save_delay();
        let write = move || -> Result<(Option<PathBuf>, f64)> {
            write_snapshot(&snapshot, &staging, rank, &extras)?;
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            if rank != 0 {
                return Ok((None, started.elapsed().as_secs_f64()));
            }
            let dir = sharded::commit(&root, &staging, step, world, state, timeout)?;
            sharded::retire(&root, keep)?;
            Ok((Some(dir), started.elapsed().as_secs_f64()))
        };
        if self.section.async_save {
            let handle = std::thread::spawn(write);
            self.pending = Some(Pending {
                step,
                started,
                stall_s: started.elapsed().as_secs_f64(),
                snapshot_s,
                writer: handle,
            });
        } else {
            let (dir, took) = write()?;
            let stall = started.elapsed().as_secs_f64();
            self.finished = Some((step, took));
            self.report(step, (stall, took), snapshot_s, dir);
        }
        Ok(())
    }

    /// Wait for the save in the background, if any, and report it.
    pub fn wait(&mut self) -> Result<()> {
        let Some(Pending {
            step,
            started: _,
            stall_s,
            snapshot_s,
            writer,
        }) = self.pending.take()
        else {
            return Ok(());
        };
        let started = Instant::now();
        let (dir, took) = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        let waited = started.elapsed().as_secs_f64();
        self.finished = Some((step, took));
        self.report(step, (stall_s + waited, took), snapshot_s, dir);
        Ok(())
    }

    /// A committed checkpoint (only the committing rank has its directory).
    fn report(
        &self,
        step: u64,
        (blocked_s, took): (f64, f64),
        snapshot_s: f64,
        dir: Option<PathBuf>,
    ) {
        if let Some(path) = dir {
            self.report.event(&Event::Checkpoint {
                step,
                path,
                async_save: self.section.async_save,
                stall_s: blocked_s,
                snapshot_s,
                took_s: Some(took),
            });
        }
    }
}
