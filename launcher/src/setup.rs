//! What `train` and `eval` share: the backend, the model with or without adapters, and
//! datasets read with the tokenizer only when one is needed.

use std::path::Path;

use burn::tensor::backend::Backend;
use trainer::data::{self, DataOptions, Row, TextTokenizer};
use trainer::{CausalLm, LoraSpec};

use crate::config::JobConfig;
use crate::error::{require_exists, Result};

/// Load the tokenizer of `model_dir` if any of `files` needs one (pre-tokenized data does not).
pub fn tokenizer_for(model_dir: &Path, files: &[&Path]) -> Result<Option<TextTokenizer>> {
    for f in files {
        if data::needs_tokenizer(f).map_err(trainer::Error::from)? {
            return Ok(Some(
                TextTokenizer::load(model_dir).map_err(trainer::Error::from)?,
            ));
        }
    }
    Ok(None)
}

/// Read one JSONL file (named `key` in errors) into rows.
pub fn dataset(
    key: &str,
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    opts: &DataOptions,
) -> Result<(Vec<Row>, data::DataAudit)> {
    require_exists(key, path)?;
    Ok(data::load_dataset(path, tokenizer, opts).map_err(trainer::Error::from)?)
}

/// Every token id of a dataset (`key`) must be inside the model's vocabulary.
pub fn check_vocab(key: &str, audit: &data::DataAudit, vocab: usize) -> Result<()> {
    if (audit.max_token_id as usize) < vocab {
        return Ok(());
    }
    Err(trainer::Error::Training {
        key: key.into(),
        message: format!(
            "{}: token id {} is outside the model's vocabulary of {vocab}",
            audit.file.display(),
            audit.max_token_id
        ),
    }
    .into())
}

/// The job's base model, with fresh or loaded adapters under `[lora]`; every base weight
/// is trainable only for full fine-tuning.
pub fn model<B: Backend>(
    cfg: &JobConfig,
    device: &B::Device,
) -> trainer::Result<(CausalLm<B>, Option<LoraSpec>)> {
    let lora = cfg.lora.as_ref();
    let base = trainer::load_hf_model::<B>(&cfg.model.path, lora.is_none(), device)?;
    match lora {
        None => Ok((base, None)),
        Some(spec) => {
            let (model, spec) = trainer::lora::apply(base, spec, cfg.training.seed)?;
            Ok((model, Some(spec)))
        }
    }
}

/// A data file the command needs: set in the config (exit 2 naming `key` if not) and present.
pub fn required_file(key: &str, path: Option<&Path>, command: &str) -> Result<std::path::PathBuf> {
    let path = path.ok_or_else(|| crate::error::Error::Config {
        file: "config".into(),
        message: format!("{key}: required by `launch {command}`"),
    })?;
    require_exists(key, path)?;
    Ok(path.to_path_buf())
}

/// A directory that must exist.
pub fn require_dir(key: &str, path: &Path) -> Result<()> {
    crate::error::require_path(key, path, true)
}
