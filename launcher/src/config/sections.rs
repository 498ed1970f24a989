//! The job file's own sections: `[job]`, `[model]`, `[export]`, `[checkpoint]`. Every
//! default is declared once, in a [`Default`] impl that serde fills missing keys from.

use std::path::PathBuf;

use checkpoint::DType;
use serde::{Deserialize, Serialize};

/// The compute backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// burn's Flex backend (pure Rust).
    #[default]
    Cpu,
    /// burn-cuda on the worker's local GPU (a build with `--features cuda`).
    Cuda,
}

impl Device {
    /// Whether this build can run on the device.
    pub fn check(self) -> Result<(), String> {
        match self {
            Device::Cuda if !cfg!(feature = "cuda") => {
                Err("job.device: `cuda` needs a build with `--features cuda`".into())
            }
            Device::Cpu | Device::Cuda => Ok(()),
        }
    }

    /// Get this process ready to compute on the device: on CUDA, check the driver, the
    /// CUDA headers and NVRTC are there (naming what is missing) and keep compiled kernels
    /// on disk (`trainer::backend::cuda_setup`). Before the device's first use; what is
    /// missing is an input error (exit 2), not a crash to retry.
    pub fn ready(self) -> crate::error::Result<()> {
        let refuse = |file: &str, message: String| crate::error::Error::Config {
            file: file.into(),
            message,
        };
        self.check().map_err(|m| refuse("this build", m))?;
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda => trainer::backend::cuda_setup(&trainer::backend::kernel_cache_dir())
                .map_err(|why| refuse("this host", format!("the GPU path cannot run here: {why}"))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Name of the job, used in logs and as the default run directory `runs/<name>`.
    pub name: String,
    /// Where the run directory goes (config.toml, events.jsonl, export/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
    #[serde(default = "cpu")]
    pub device: Device,
    /// burn's kernel fusion on the GPU (`device = "cuda"` only): element-wise chains and
    /// reductions compiled into fewer kernels at run time. Off until measured faster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fusion: bool,
}

fn cpu() -> Device {
    Device::Cpu
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory: config.json, safetensors (+ index), tokenizer files.
    pub path: PathBuf,
    /// Compute dtype: `f32`, or `bf16` (mixed precision: bf16 matmuls, f32 master weights,
    /// norms, softmax and loss; under LoRA the frozen base is kept in bf16). Weights
    /// stored as bf16/f16 are read whatever this says.
    #[serde(default = "f32")]
    pub dtype: DType,
}

fn f32() -> DType {
    DType::F32
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSection {
    /// With LoRA, also write the adapter merged into the base as an HF model in export/model.
    pub merged: bool,
    /// Dtype of exported HF weights.
    pub dtype: DType,
}

impl Default for ExportSection {
    fn default() -> Self {
        Self {
            merged: false,
            dtype: f32(),
        }
    }
}

/// `[checkpoint]`: periodic sharded checkpoints of a training job (atomic, optionally
/// written in the background) and resuming from the newest valid one.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointOptions {
    /// Save every N optimizer steps (0: only at the end).
    pub every: u64,
    /// Keep the newest N committed checkpoints (the newest is never deleted).
    pub keep_last: usize,
    /// Copy the state to host memory and write it from a background thread while
    /// training goes on (`false`: training waits for the write).
    #[serde(rename = "async")]
    pub async_save: bool,
    /// Go on from the newest valid checkpoint in the run directory, if there is one.
    pub resume: bool,
    /// Seconds the committing rank waits for every rank's part of a checkpoint.
    pub commit_timeout_s: f64,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: 2,
            async_save: true,
            resume: true,
            commit_timeout_s: 600.0,
        }
    }
}

impl CheckpointOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_last == 0 {
            return Err("checkpoint.keep_last: must be at least 1".into());
        }
        if !(self.commit_timeout_s.is_finite() && self.commit_timeout_s > 0.0) {
            return Err("checkpoint.commit_timeout_s: must be a positive number of seconds".into());
        }
        Ok(())
    }
}
