//! `launch export`: the trained result of a run (or an adapter directory) as a PEFT adapter
//! or a merged Hugging Face model.

use std::path::{Path, PathBuf};

use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::setup;

/// What `launch export` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// adapter_config.json + adapter_model.safetensors
    Peft,
    /// config.json + safetensors + tokenizer files, LoRA merged
    Hf,
}

/// Where a source's trained weights are.
enum Source {
    /// A PEFT adapter and the base model it applies to (as recorded; checked when needed).
    Adapter {
        adapter: PathBuf,
        base: Option<PathBuf>,
    },
    /// A complete HF model directory.
    Model(PathBuf),
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadPath {
        key: "RUN_DIR_OR_CHECKPOINT".into(),
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn resolve(src: &Path) -> Result<Source> {
    if src.join("config.toml").is_file() {
        let cfg = JobConfig::load(&src.join("config.toml"), &[])?;
        let adapter = src.join("export").join("adapter");
        if cfg.lora.is_some() && adapter.join("adapter_config.json").is_file() {
            return Ok(Source::Adapter {
                adapter,
                base: Some(cfg.model.path),
            });
        }
        let model = src.join("export").join("model");
        if model.join("config.json").is_file() {
            return Ok(Source::Model(model));
        }
        return Err(bad(
            src,
            "the run has no exported result yet (export/adapter or export/model)",
        ));
    }
    if src.join("adapter_config.json").is_file() {
        let config = checkpoint::load_peft_adapter(src)?.0;
        return Ok(Source::Adapter {
            adapter: src.to_path_buf(),
            base: config.base_model_name_or_path.map(PathBuf::from),
        });
    }
    if src.join("config.json").is_file() {
        return Ok(Source::Model(src.to_path_buf()));
    }
    Err(bad(
        src,
        "neither a run directory, a PEFT adapter nor an HF model directory",
    ))
}

pub fn run(src: &Path, format: Format, out: &Path, dtype: checkpoint::DType) -> Result<()> {
    setup::require_dir("RUN_DIR_OR_CHECKPOINT", src)?;
    let device = Default::default();
    match (resolve(src)?, format) {
        (Source::Adapter { adapter, .. }, Format::Peft) => {
            let (config, tensors) = checkpoint::load_peft_adapter(&adapter)?;
            checkpoint::save_peft_adapter(out, &config, &tensors)?;
        }
        (Source::Adapter { adapter, base }, Format::Hf) => {
            let base = base.ok_or_else(|| {
                bad(
                    &adapter,
                    "adapter_config.json names no base_model_name_or_path",
                )
            })?;
            setup::require_dir("base model (model.path / base_model_name_or_path)", &base)?;
            let model = trainer::load_hf_model::<trainer::backend::Cpu>(&base, false, &device)?;
            let (model, _) = trainer::lora::load_adapter(model, &adapter, false)?;
            trainer::export::save_hf_model(&model, &base, out, dtype)?;
        }
        (Source::Model(_), Format::Peft) => {
            return Err(bad(
                src,
                "a full-parameter fine-tune has no LoRA adapter; use --format hf",
            ));
        }
        (Source::Model(dir), Format::Hf) => {
            let model = trainer::load_hf_model::<trainer::backend::Cpu>(&dir, false, &device)?;
            trainer::export::save_hf_model(&model, &dir, out, dtype)?;
        }
    }
    println!("written to {}", out.display());
    Ok(())
}
