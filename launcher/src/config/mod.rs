//! The job file: the library's option types, one section each (`[training]` is
//! `trainer::TrainOptions`, `[parallel]` `trainer::ParallelOptions`, …), `--set`
//! overrides, and the checks that turn it into a job we can run. Every key is described
//! in `configs/README.md`.

mod launch;
pub mod scheduler;
mod sections;
mod tidal;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trainer::{DataOptions, LoraSpec, ParallelOptions, TrainOptions};

use crate::error::{Error, Result};
pub use launch::{DataPlane, LaunchOptions};
pub use sections::{CheckpointOptions, Device, ExportSection, JobSection, ModelSection};
pub use tidal::TidalOptions;

/// A whole job file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub job: JobSection,
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataOptions,
    /// Absent: full-parameter fine-tuning.
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub training: TrainOptions,
    #[serde(default)]
    pub export: ExportSection,
    #[serde(default)]
    pub parallel: ParallelOptions,
    #[serde(default)]
    pub checkpoint: CheckpointOptions,
    #[serde(default)]
    pub launch: LaunchOptions,
    /// Present: a tidal job, trained only inside its windows (`crate::tidal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tidal: Option<TidalOptions>,
}

fn config_error(file: &Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Config {
        file: file.to_path_buf(),
        message,
    }
}

impl LaunchOptions {
    /// The defaults with `launch.KEY=VALUE` overrides applied (for `launch run`, which has
    /// no job file).
    pub fn from_overrides(overrides: &[String]) -> Result<Self> {
        let mut root = toml::Table::new();
        root.insert("launch".into(), toml::Value::Table(Default::default()));
        for o in overrides {
            apply_override(&mut root, o).map_err(config_error("--set".as_ref()))?;
        }
        let section = root
            .remove("launch")
            .unwrap_or_else(|| toml::Value::Table(Default::default()));
        let command_line = Path::new("command line");
        let launch: LaunchOptions = section
            .try_into()
            .map_err(|e: toml::de::Error| config_error(command_line)(format!("launch: {e}")))?;
        launch.validate().map_err(config_error(command_line))?;
        Ok(launch)
    }
}

impl JobConfig {
    /// Read a job file and apply `--set section.key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigIo {
            path: path.to_path_buf(),
            source,
        })?;
        let mut value: toml::Table =
            toml::from_str(&text).map_err(|e| config_error(path)(e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o).map_err(config_error("--set".as_ref()))?;
        }
        let mut config: JobConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| config_error(path)(e.to_string()))?;
        if let Some(m) = config.parallel.micro_batch {
            config.training.micro_batch = m;
        }
        config.validate().map_err(config_error(path))?;
        Ok(config)
    }

    /// `runs/<name>` unless `job.run_dir` says otherwise.
    pub fn run_dir(&self) -> PathBuf {
        self.job
            .run_dir
            .clone()
            .unwrap_or_else(|| Path::new("runs").join(&self.job.name))
    }

    /// The resolved config as written to the run directory (and into checkpoints).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config {
            file: self.run_dir().join("config.toml"),
            message: format!("writing the resolved config: {e}"),
        })
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.checkpoint.validate()?;
        if self.job.name.is_empty() {
            return Err("job.name: must not be empty".into());
        }
        self.job.device.check()?;
        if self.model.dtype == checkpoint::DType::F16 {
            return Err(
                "model.dtype: \"f16\" compute needs loss scaling, which tidemill does \
                        not do; use \"bf16\" (mixed precision) or \"f32\""
                    .into(),
            );
        }
        if self.job.fusion && self.job.device != Device::Cuda {
            return Err(
                "job.fusion: kernel fusion is burn's GPU path and needs job.device = \"cuda\""
                    .into(),
            );
        }
        self.launch.validate()?;
        if self.launch.data_plane == DataPlane::Nccl && self.job.device != Device::Cuda {
            return Err(
                "launch.data_plane: \"nccl\" moves GPU memory and needs job.device = \"cuda\""
                    .into(),
            );
        }
        if let Some(t) = &self.tidal {
            t.validate()?;
        }
        self.parallel.validate()?;
        if self.data.max_seq_len < 2 {
            return Err("data.max_seq_len: must be at least 2".into());
        }
        // The same checks the trainer makes, here so that they fail before any work (exit 2).
        self.training
            .validate()
            .map_err(|e| format!("[training] {e}"))?;
        if let Some(lora) = self.lora.as_ref().filter(|l| l.init_adapter.is_none()) {
            lora.validate().map_err(|e| format!("[lora] {e}"))?;
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
        // What is not written is the library's own default.
        assert_eq!(
            c.data,
            DataOptions {
                packing: false,
                ..Default::default()
            }
        );
        assert_eq!(c.launch, LaunchOptions::default());
        // The resolved config reads back as itself.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, c.to_toml().unwrap()).unwrap();
        assert_eq!(JobConfig::load(&path, &[]).unwrap(), c);
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

    /// A string-typed choice that is not one of its values: the error names the key and
    /// lists what it may be.
    #[test]
    fn precision_refusal_names_the_key() {
        assert!(parse(MIN, &["model.dtype=bf16", "training.recompute=true"]).is_ok());
        let err = parse(MIN, &["model.dtype=f16"]).unwrap_err();
        assert!(err.to_string().contains("model.dtype") && err.to_string().contains("bf16"));
        assert_eq!(err.exit_code(), 2);
        assert!(parse(MIN, &["training.recompute=true", "parallel.pp=2"]).is_ok());
    }

    /// Kernel fusion is burn's GPU path: asked for on the CPU it is an input error naming the
    /// key; off, it is left out of the resolved config.
    #[test]
    fn fusion_needs_the_gpu() {
        let err = parse(MIN, &["job.fusion=true"]).unwrap_err();
        assert!(err.to_string().contains("job.fusion"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let c = parse(MIN, &["job.fusion=false"]).unwrap();
        assert!(!c.job.fusion);
        assert!(!c.to_toml().unwrap().contains("fusion"));
    }

    /// NCCL moves GPU memory: asked for on the CPU it is refused before any work; `auto`
    /// means NCCL only for GPU ranks with peers.
    #[test]
    fn the_data_plane_follows_the_device() {
        let err = parse(MIN, &["launch.data_plane=nccl"]).unwrap_err();
        assert!(err.to_string().contains("launch.data_plane"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let auto = DataPlane::Auto;
        assert!(!auto.nccl(Device::Cpu, 8));
        assert!(!auto.nccl(Device::Cuda, 1));
        assert!(auto.nccl(Device::Cuda, 2));
        assert!(DataPlane::Nccl.nccl(Device::Cuda, 1));
        assert!(!DataPlane::Tcp.nccl(Device::Cuda, 8));
    }

    #[test]
    fn the_bucket_size_is_a_positive_number_of_mib() {
        for bad in [
            "parallel.bucket_mb=0",
            "parallel.bucket_mb=-2.5",
            "parallel.bucket_mb=nan",
        ] {
            let err = parse(MIN, &[bad]).unwrap_err();
            assert!(
                err.to_string().contains("parallel.bucket_mb"),
                "{bad}: {err}"
            );
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
        assert!(parse(MIN, &["parallel.bucket_mb=0.01"]).is_ok());
    }

    #[test]
    fn choices_list_their_values() {
        for (set, key, allowed) in [
            ("job.device=tpu", "job.device", &["cpu", "cuda"][..]),
            (
                "training.schedule=step",
                "training.schedule",
                &["constant", "linear", "cosine"],
            ),
            (
                "parallel.schedule=zb",
                "parallel.schedule",
                &["1f1b", "gpipe", "interleaved"],
            ),
            (
                "parallel.strategy=best",
                "parallel.strategy",
                &["manual", "auto"],
            ),
            ("export.dtype=f8", "export.dtype", &["f32", "bf16", "f16"]),
            ("model.dtype=f8", "model.dtype", &["f32", "bf16", "f16"]),
            (
                "launch.data_plane=gloo",
                "launch.data_plane",
                &["auto", "tcp", "nccl"],
            ),
        ] {
            let err = parse(MIN, &[set]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
            for a in allowed {
                assert!(err.contains(a), "{set}: {err}");
            }
        }
    }
}
