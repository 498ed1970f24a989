//! `launch plan`'s command line: a job file or model dimensions, the cluster, and any
//! choices to pin.

use std::path::PathBuf;

use clap::Args;
use parallel::plan::{Job, LoraTargets, Mode, ModelShape, Precision, Space};

use crate::config::JobConfig;
use crate::error::{Error, Result};

/// How `launch plan` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    #[default]
    Full,
    Lora,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// Mixed precision: bf16 compute, f32 master weights and AdamW state.
    Bf16,
    F32,
}

#[derive(Args, Debug, Default, Clone)]
pub struct PlanArgs {
    /// A job file (its model, data.max_seq_len, training.global_batch, LoRA and launch
    /// sizes); or give the model's dimensions below.
    pub config: Option<PathBuf>,
    /// Override a job file key: --set training.global_batch=256 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Nodes (default: the job file's launch.nnodes, else 1).
    #[arg(long)]
    pub nnodes: Option<usize>,
    /// Devices per node (default: the job file's launch.nproc_per_node, else the profile's).
    #[arg(long)]
    pub gpus_per_node: Option<usize>,
    /// A built-in profile (a100-80g, h100-80g, h200, cpu), NAME.toml in
    /// $TIDEMILL_HARDWARE_DIR, or a path to a .toml profile.
    #[arg(long)]
    pub hardware: Option<String>,
    /// Candidates to show, best first.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Measure this machine (matmul rate, copy and loopback bandwidth) and print a
    /// profile (or write it to --out).
    #[arg(long)]
    pub calibrate: bool,
    /// Where --calibrate writes its profile.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What --calibrate measures: this machine's CPU backend, or its first GPU (a build
    /// with `--features cuda`).
    #[arg(long, value_enum, default_value_t = crate::config::Device::Cpu, requires = "calibrate")]
    pub device: crate::config::Device,

    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Default: hidden / heads.
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// MLP width (each expert's); default 4 × hidden, or Llama's 8/3 × hidden rounded up
    /// to 256 for a gated MLP.
    #[arg(long)]
    pub ffn: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Experts per layer (a mixture of experts).
    #[arg(long, default_value_t = 0)]
    pub experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    pub topk: usize,
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per optimizer step.
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// SwiGLU MLP (true) or a plain two-matrix one (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gated_mlp: bool,
    /// LM head shares the embedding.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub tied: bool,
    /// Full fine-tuning, or LoRA with adapters on every projection but the head.
    #[arg(long, value_enum, default_value_t = ModeArg::Full)]
    pub mode: ModeArg,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// Default f32 for a job file (what tidemill trains in), bf16 otherwise.
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Megatron's sequence parallelism with tp > 1.
    #[arg(long)]
    pub sequence_parallel: bool,

    /// Pin a choice (price one layout): --tp 8 --pp 2 …
    #[arg(long)]
    pub dp: Option<usize>,
    #[arg(long)]
    pub tp: Option<usize>,
    #[arg(long)]
    pub pp: Option<usize>,
    #[arg(long)]
    pub ep: Option<usize>,
    #[arg(long)]
    pub micro_batch: Option<usize>,
    #[arg(long)]
    pub virtual_stages: Option<usize>,
    #[arg(long, action = clap::ArgAction::Set)]
    pub recompute: Option<bool>,
    #[arg(long, action = clap::ArgAction::Set)]
    pub zero1: Option<bool>,
}

fn usage(flag: &str, message: impl Into<String>) -> Error {
    Error::Config {
        file: flag.into(),
        message: message.into(),
    }
}

impl PlanArgs {
    /// The job as the cost model sees it, and the job file it came from (if any).
    pub fn job(&self) -> Result<(Job, Option<JobConfig>)> {
        match &self.config {
            Some(path) => self.job_of_file(path),
            None => Ok((self.job_of_dims()?, None)),
        }
    }

    fn job_of_file(&self, path: &std::path::Path) -> Result<(Job, Option<JobConfig>)> {
        let cfg = JobConfig::load(path, &self.set)?;
        let model = trainer::ModelConfig::from_dir(&cfg.model.path)?;
        let mut job = super::job_of(&cfg, &model);
        job.precision = match self.precision {
            Some(PrecisionArg::Bf16) => Precision::Bf16Mixed,
            Some(PrecisionArg::F32) => Precision::F32,
            None => job.precision,
        };
        job.seq_len = self.seq_len.unwrap_or(job.seq_len);
        job.global_batch = self.global_batch.unwrap_or(job.global_batch);
        job.sequence_parallel |= self.sequence_parallel;
        job.scatter_gather_sends = job.sequence_parallel;
        job.validate().map_err(|e| usage("CONFIG", e))?;
        Ok((job, Some(cfg)))
    }

    fn job_of_dims(&self) -> Result<Job> {
        let need = |flag: &str, v: Option<usize>| {
            v.filter(|&v| v > 0).ok_or_else(|| {
                usage(
                    flag,
                    "required (and at least 1) without a job file: give CONFIG or the model's \
                     --layers --hidden --heads --vocab --seq-len --global-batch",
                )
            })
        };
        let model = self.model_shape(need("--hidden", self.hidden)?, need("--heads", self.heads)?);
        let model = ModelShape {
            layers: need("--layers", self.layers)?,
            vocab: need("--vocab", self.vocab)?,
            ..model
        };
        if model.kv_heads == 0 || model.head_dim == 0 || model.ffn == 0 {
            return Err(usage("--kv-heads/--head-dim/--ffn", "must be at least 1"));
        }
        if self.experts > 0 && !(1..=self.experts).contains(&self.topk) {
            return Err(usage(
                "--topk",
                format!("{} must be 1 to --experts ({})", self.topk, self.experts),
            ));
        }
        let mode = match self.mode {
            ModeArg::Full => Mode::Full,
            ModeArg::Lora if self.lora_rank > 0 => Mode::Lora {
                rank: self.lora_rank,
                targets: LoraTargets {
                    head: false,
                    ..LoraTargets::all()
                },
            },
            ModeArg::Lora => return Err(usage("--lora-rank", "must be at least 1")),
        };
        let job = Job {
            model,
            seq_len: need("--seq-len", self.seq_len)?,
            global_batch: need("--global-batch", self.global_batch)?,
            mode,
            precision: match self.precision {
                Some(PrecisionArg::F32) => Precision::F32,
                Some(PrecisionArg::Bf16) | None => Precision::Bf16Mixed,
            },
            sequence_parallel: self.sequence_parallel,
            scatter_gather_sends: self.sequence_parallel,
        };
        job.validate()
            .map_err(|e| usage("--layers/--hidden/…", e))?;
        Ok(job)
    }

    /// The model's shape from the dimensions given (layers and vocabulary filled in by the
    /// caller).
    fn model_shape(&self, hidden: usize, heads: usize) -> ModelShape {
        let gated = self.gated_mlp;
        let ffn = self.ffn.unwrap_or(if gated {
            (hidden.saturating_mul(8) / 3).div_ceil(256) * 256
        } else {
            hidden.saturating_mul(4)
        });
        ModelShape {
            layers: 0,
            hidden,
            heads,
            kv_heads: self.kv_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(hidden / heads),
            ffn,
            vocab: 0,
            experts: self.experts,
            top_k: if self.experts > 0 { self.topk } else { 0 },
            gated_mlp: gated,
            tied_embeddings: self.tied,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            norm_bias: false,
            dropout: false,
        }
    }

    /// The choices pinned on the command line (and, from a job file under strategy =
    /// "auto", the file's; from any job file, its `training.recompute`).
    pub fn space(&self, cfg: Option<&JobConfig>) -> Result<Space> {
        let mut space = match cfg {
            Some(c) if c.parallel.strategy == trainer::Strategy::Auto => {
                super::pinned(&c.parallel, c.training.recompute)
            }
            Some(c) => Space {
                recompute: Some(c.training.recompute),
                ..Space::default()
            },
            None => Space::default(),
        };
        for (flag, v) in [
            ("--dp", self.dp),
            ("--tp", self.tp),
            ("--pp", self.pp),
            ("--ep", self.ep),
            ("--micro-batch", self.micro_batch),
            ("--virtual-stages", self.virtual_stages),
        ] {
            if v == Some(0) {
                return Err(usage(flag, "must be at least 1"));
            }
        }
        space.dp = self.dp.or(space.dp);
        space.tp = self.tp.or(space.tp);
        space.pp = self.pp.or(space.pp);
        space.ep = self.ep.or(space.ep);
        space.micro_batch = self.micro_batch.or(space.micro_batch);
        space.virtual_stages = self.virtual_stages.or(space.virtual_stages);
        space.zero1 = self.zero1.or(space.zero1);
        if let Some(r) = self.recompute {
            space.recompute = Some(r);
        }
        Ok(space)
    }
}
