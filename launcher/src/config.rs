//! The job file: raw TOML sections with every key documented, `--set` overrides, and the
//! checks that turn it into a job we can run. Every key is described in `configs/README.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::layout::ParallelSection;

/// A whole job file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub job: JobSection,
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    /// Absent: full-parameter fine-tuning.
    pub lora: Option<LoraSection>,
    #[serde(default)]
    pub training: TrainingSection,
    #[serde(default)]
    pub export: ExportSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    #[serde(default)]
    pub checkpoint: crate::saving::CheckpointSection,
    #[serde(default)]
    pub launch: LaunchSection,
}

/// How `launch` starts workers (torchrun's flags; the command line overrides these).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchSection {
    /// Worker processes on this node (`--nproc-per-node`).
    #[serde(default = "one")]
    pub nproc_per_node: usize,
    /// Nodes in the job (`--nnodes`).
    #[serde(default = "one")]
    pub nnodes: usize,
    /// This node's index, 0 hosts the coordinator (`--node-rank`).
    #[serde(default)]
    pub node_rank: usize,
    /// HOST:PORT of the coordinator on node 0 (`--rdzv`); needed when nnodes > 1.
    pub rdzv: Option<String>,
    /// Address this node's workers listen on for the data plane; default: the address
    /// this node reaches the coordinator from (127.0.0.1 on one machine).
    pub host: Option<String>,
    /// Seconds a collective may wait for a peer before failing with an error naming it.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: f64,
    /// Seconds between an agent's heartbeats (they carry the workers' reports).
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_s: f64,
    /// Seconds without a heartbeat after which the coordinator declares a node lost.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_s: f64,
    /// A hang: no progress for max(hang_factor × the median recent step, hang_floor_s).
    #[serde(default = "default_hang_factor")]
    pub hang_factor: f64,
    #[serde(default = "default_hang_floor")]
    pub hang_floor_s: f64,
    /// A straggler: busy (not waiting for peers) over straggler_factor × the median for
    /// straggler_steps steps in a row.
    #[serde(default = "default_straggler_factor")]
    pub straggler_factor: f64,
    #[serde(default = "default_straggler_steps")]
    pub straggler_steps: u32,
    /// Restarts (of any kind) before the job gives up.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Fewest nodes the job may shrink to.
    #[serde(default = "one")]
    pub min_nodes: usize,
    /// Crashes or hangs on one node after which it is excluded.
    #[serde(default = "default_exclude_after")]
    pub exclude_after: u32,
    /// Exclude a straggling node (else it is only reported).
    #[serde(default)]
    pub exclude_stragglers: bool,
    /// This agent is a spare: it waits, and takes a lost node's place.
    #[serde(default)]
    pub spare: bool,
    /// Seconds to wait for every node to join.
    #[serde(default = "default_rdzv_timeout")]
    pub rdzv_timeout_s: f64,
    /// File whose first line is the control plane's shared secret (same on every node;
    /// `TIDEMILL_TOKEN` takes precedence). Required with nnodes > 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// TLS for the control plane: the CA (PEM) every agent checks the coordinator's
    /// certificate against; setting it turns TLS on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Node 0's certificate and private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The name to check in the coordinator's certificate (default: the host of `rdzv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_domain: Option<String>,
}

fn one() -> usize {
    1
}
fn default_collective_timeout() -> f64 {
    300.0
}
fn default_heartbeat_interval() -> f64 {
    1.0
}
fn default_heartbeat_timeout() -> f64 {
    3.0
}
fn default_hang_factor() -> f64 {
    10.0
}
fn default_hang_floor() -> f64 {
    120.0
}
fn default_straggler_factor() -> f64 {
    1.5
}
fn default_straggler_steps() -> u32 {
    3
}
fn default_max_restarts() -> u32 {
    3
}
fn default_exclude_after() -> u32 {
    3
}
fn default_rdzv_timeout() -> f64 {
    300.0
}

impl Default for LaunchSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("all launch keys have defaults"))
    }
}

impl LaunchSection {
    /// The defaults with `launch.KEY=VALUE` overrides applied (for `launch run`, which has
    /// no job file).
    pub fn from_overrides(overrides: &[String]) -> Result<Self> {
        let mut root = toml::Table::new();
        root.insert("launch".into(), toml::Value::Table(Default::default()));
        for o in overrides {
            apply_override(&mut root, o).map_err(|message| Error::Config {
                file: PathBuf::from("--set"),
                message,
            })?;
        }
        let section = root
            .remove("launch")
            .unwrap_or_else(|| toml::Value::Table(Default::default()));
        let launch: LaunchSection =
            section
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config {
                    file: PathBuf::from("command line"),
                    message: format!("launch: {e}"),
                })?;
        launch.validate().map_err(|message| Error::Config {
            file: PathBuf::from("command line"),
            message,
        })?;
        Ok(launch)
    }

    /// The checks torchrun makes on its flags, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.nproc_per_node == 0 {
            return Err("launch.nproc_per_node: must be at least 1".into());
        }
        if self.nnodes == 0 {
            return Err("launch.nnodes: must be at least 1".into());
        }
        if self.node_rank >= self.nnodes && !self.spare {
            return Err(format!(
                "launch.node_rank: {} must be below nnodes {}",
                self.node_rank, self.nnodes
            ));
        }
        if self.nnodes > 1 && self.rdzv.is_none() {
            return Err("launch.rdzv: HOST:PORT of node 0 is required when nnodes > 1".into());
        }
        if let Some(r) = &self.rdzv {
            let ok = r
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("launch.rdzv: `{r}`: expected HOST:PORT"));
            }
        }
        for (key, v) in [
            ("collective_timeout_s", self.collective_timeout_s),
            ("heartbeat_interval_s", self.heartbeat_interval_s),
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
            ("rdzv_timeout_s", self.rdzv_timeout_s),
            ("hang_floor_s", self.hang_floor_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= parallel::runtime::env::MAX_SECONDS) {
                return Err(format!(
                    "launch.{key}: {v} must be a positive number of seconds, at most {}",
                    parallel::runtime::env::MAX_SECONDS
                ));
            }
        }
        if self.spare && self.node_rank < self.nnodes {
            return Err(format!(
                "launch.node_rank: a spare needs a node rank of its own, at least nnodes = {} \
                 (it is {})",
                self.nnodes, self.node_rank
            ));
        }
        if self.heartbeat_interval_s < 0.01 {
            return Err(format!(
                "launch.heartbeat_interval_s: {} is below 0.01 s",
                self.heartbeat_interval_s
            ));
        }
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s {
            return Err(format!(
                "launch.heartbeat_timeout_s: {} must be longer than heartbeat_interval_s {}",
                self.heartbeat_timeout_s, self.heartbeat_interval_s
            ));
        }
        for (key, v) in [
            ("hang_factor", self.hang_factor),
            ("straggler_factor", self.straggler_factor),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return Err(format!("launch.{key}: {v} must be a number ≥ 1"));
            }
        }
        if self.straggler_steps == 0 || self.exclude_after == 0 || self.min_nodes == 0 {
            return Err(
                "launch.straggler_steps, exclude_after and min_nodes: must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The coordinator's detection thresholds.
    pub fn detect_policy(&self) -> crate::coordinator::detect::DetectPolicy {
        crate::coordinator::detect::DetectPolicy {
            heartbeat_timeout: Duration::from_secs_f64(self.heartbeat_timeout_s),
            hang_factor: self.hang_factor,
            hang_floor: Duration::from_secs_f64(self.hang_floor_s),
            straggler_factor: self.straggler_factor,
            straggler_steps: self.straggler_steps,
            // Positions ride on the heartbeats: a healthy rank is heard from every beat.
            position_silence: Duration::from_secs_f64((2.0 * self.heartbeat_interval_s).max(2.0)),
            ..Default::default()
        }
    }

    /// The coordinator's recovery limits.
    pub fn recovery_policy(&self) -> crate::coordinator::recover::RecoveryPolicy {
        crate::coordinator::recover::RecoveryPolicy {
            max_restarts: self.max_restarts,
            min_nodes: self.min_nodes,
            exclude_after: self.exclude_after,
            exclude_stragglers: self.exclude_stragglers,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Name of the job, used in logs and as the default run directory `runs/<name>`.
    pub name: String,
    /// Where the run directory goes (config.toml, events.jsonl, export/).
    pub run_dir: Option<PathBuf>,
    /// "cpu" (burn's Flex backend) or "cuda" (GPU 0; needs a build with `--features cuda`).
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory: config.json, safetensors (+ index), tokenizer files.
    pub path: PathBuf,
    /// Compute dtype. Only "f32" today; weights stored as bf16/f16 are widened on load.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_dtype() -> String {
    "f32".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training JSONL (needed by `train`).
    pub train: Option<PathBuf>,
    /// Evaluation JSONL (needed by `eval`; with `train`, evaluated every `training.eval_every` steps and at the end).
    pub eval: Option<PathBuf>,
    /// Longest row in tokens; longer samples are truncated (and counted in the audit).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Pack several short samples into one row (attention never crosses samples).
    #[serde(default = "yes")]
    pub packing: bool,
    /// Supervise prompt tokens too (default: only assistant/completion tokens).
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Drop samples with no supervised token instead of failing.
    #[serde(default)]
    pub allow_empty_samples: bool,
    /// Shuffle rows every epoch (deterministically from `training.seed`).
    #[serde(default = "yes")]
    pub shuffle: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: None,
            eval: None,
            max_seq_len: default_max_seq_len(),
            packing: true,
            train_on_prompt: false,
            allow_empty_samples: false,
            shuffle: true,
        }
    }
}

fn default_max_seq_len() -> usize {
    2048
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    #[serde(default)]
    pub dropout: f64,
    /// PEFT module names to adapt.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// Start from this PEFT adapter directory instead of fresh adapters (its
    /// adapter_config.json then defines r, alpha, targets, rslora).
    pub init_adapter: Option<PathBuf>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Optimizer steps to take.
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    /// Rows per optimizer step.
    #[serde(default = "default_global_batch")]
    pub global_batch: usize,
    /// Rows per forward/backward pass (gradients accumulate over global_batch / micro_batch).
    #[serde(default = "default_micro_batch")]
    pub micro_batch: usize,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// "constant", "linear" or "cosine" (after warm-up), as in transformers.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Linear warm-up steps from 0 to `lr`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_eps: f64,
    /// Clip the global gradient L2 norm to this; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Seeds data order, LoRA init and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate on data.eval every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Mixture of experts: each expert takes at most this multiple of an even share of a
    /// micro-batch's routed tokens, the most probable first; the rest are dropped (Megatron's
    /// `--moe-expert-capacity-factor`). Unset: no token is ever dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_capacity_factor: Option<f64>,
}

fn default_max_steps() -> u64 {
    100
}
fn default_global_batch() -> usize {
    8
}
fn default_micro_batch() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}

impl Default for TrainingSection {
    fn default() -> Self {
        // Deserialising an empty table applies every serde default above.
        toml::from_str("").unwrap_or_else(|_| unreachable!("all training keys have defaults"))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// With LoRA, also write the adapter merged into the base as an HF model in export/merged.
    #[serde(default)]
    pub merged: bool,
    /// Dtype of exported HF weights: "f32", "bf16" or "f16".
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

impl Default for ExportSection {
    fn default() -> Self {
        Self {
            merged: false,
            dtype: default_dtype(),
        }
    }
}

impl JobConfig {
    /// Read a job file and apply `--set section.key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigIo {
            path: path.to_path_buf(),
            source,
        })?;
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|message| Error::Config {
                file: PathBuf::from("--set"),
                message,
            })?;
        }
        let mut config: JobConfig =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config {
                    file: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        if let Some(m) = config.parallel.micro_batch {
            config.training.micro_batch = m;
        }
        config.validate().map_err(|message| Error::Config {
            file: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// `runs/<name>` unless `job.run_dir` says otherwise.
    pub fn run_dir(&self) -> PathBuf {
        self.job
            .run_dir
            .clone()
            .unwrap_or_else(|| Path::new("runs").join(&self.job.name))
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.checkpoint.validate()?;
        if self.job.name.is_empty() {
            return Err("job.name: must not be empty".into());
        }
        match self.job.device.as_str() {
            "cpu" => {}
            "cuda" if cfg!(feature = "cuda") => {}
            "cuda" => return Err("job.device: `cuda` needs a build with `--features cuda`".into()),
            other => {
                return Err(format!(
                    "job.device: `{other}`: expected \"cpu\" or \"cuda\""
                ))
            }
        }
        if self.model.dtype != "f32" {
            return Err(format!(
                "model.dtype: `{}` is not supported; use \"f32\"",
                self.model.dtype
            ));
        }
        if !["f32", "bf16", "f16"].contains(&self.export.dtype.as_str()) {
            return Err(format!(
                "export.dtype: `{}`: expected \"f32\", \"bf16\" or \"f16\"",
                self.export.dtype
            ));
        }
        if !["constant", "linear", "cosine"].contains(&self.training.schedule.as_str()) {
            return Err(format!(
                "training.schedule: `{}`: expected \"constant\", \"linear\" or \"cosine\"",
                self.training.schedule
            ));
        }
        if let Some(f) = self.training.moe_capacity_factor {
            if !(f.is_finite() && f > 0.0) {
                return Err(format!(
                    "training.moe_capacity_factor: {f} must be a positive number"
                ));
            }
        }
        self.launch.validate()?;
        self.parallel.validate()?;
        if self.data.max_seq_len < 2 {
            return Err("data.max_seq_len: must be at least 2".into());
        }
        // The same checks the trainer makes, here so that they fail before any work (exit 2).
        crate::train::train_options(&self.training, self.data.shuffle)
            .validate(1)
            .map_err(|e| format!("[training] {e}"))?;
        if let Some(lora) = self.lora.as_ref().filter(|l| l.init_adapter.is_none()) {
            crate::setup::lora_spec(lora)
                .validate()
                .map_err(|e| format!("[lora] {e}"))?;
        }
        Ok(())
    }
}

/// `section.key=value`: the value is parsed as TOML (number, bool, array, quoted string) and
/// otherwise taken as a bare string.
fn apply_override(root: &mut toml::Table, spec: &str) -> std::result::Result<(), String> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| format!("`{spec}`: expected section.key=value"))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(format!("`{spec}`: expected section.key=value"));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, sections) = path
        .split_last()
        .ok_or_else(|| format!("`{spec}`: empty key"))?;
    let mut table = root;
    for s in sections {
        let entry = table
            .entry(s.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{spec}`: `{s}` is not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[job]\nname = \"t\"\n[model]\npath = \"m\"\n";

    fn parse(text: &str, sets: &[&str]) -> Result<JobConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        JobConfig::load(
            &path,
            &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(
            MIN,
            &[
                "training.lr=0.5",
                "data.packing=false",
                "lora.r=4",
                "job.run_dir=out/x",
            ],
        )
        .unwrap();
        assert_eq!(c.training.lr, 0.5);
        assert!(!c.data.packing);
        assert_eq!(c.lora.as_ref().map(|l| l.r), Some(4));
        assert_eq!(c.run_dir(), PathBuf::from("out/x"));
        assert_eq!(c.training.max_grad_norm, 1.0);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(&format!("{MIN}[training]\nlearning_rate = 1.0\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        let err = parse(MIN, &["training.bogus=1"]).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = parse(&format!("{MIN}[training]\nschedule = \"step\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("training.schedule"), "{err}");
        let err = parse(MIN, &["training.global_batch=6", "training.micro_batch=4"]).unwrap_err();
        assert!(err.to_string().contains("global_batch"), "{err}");
        let err = parse(MIN, &["lora.targets=[\"qproj\"]"]).unwrap_err();
        assert!(err.to_string().contains("qproj"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }
}
