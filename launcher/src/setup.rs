//! What `train` and `eval` share: the backend, the model with or without adapters, and
//! datasets read with the tokenizer only when one is needed.

use std::path::Path;

use burn::tensor::backend::Backend;
use trainer::data::{self, DataAudit, DataOptions, Row, TextTokenizer};
use trainer::{CausalLm, LoraSpec};

use crate::config::{DataSection, LoraSection};
use crate::error::{require_exists, Result};

/// CPU backend (burn's pure-Rust Flex).
pub type Cpu = burn::backend::Flex;

pub fn data_options(d: &DataSection) -> DataOptions {
    DataOptions {
        max_seq_len: d.max_seq_len,
        packing: d.packing,
        train_on_prompt: d.train_on_prompt,
        allow_empty_samples: d.allow_empty_samples,
    }
}

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
    d: &DataSection,
) -> Result<(Vec<Row>, DataAudit)> {
    require_exists(key, path)?;
    let (rows, audit) =
        data::load_dataset(path, tokenizer, &data_options(d)).map_err(trainer::Error::from)?;
    Ok((rows, audit))
}

/// Every token id of a dataset must be inside the model's vocabulary.
pub fn check_vocab(key: &str, audit: &DataAudit, vocab: usize) -> Result<()> {
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

/// The LoRA spec of a `[lora]` section.
pub fn lora_spec(l: &LoraSection) -> LoraSpec {
    LoraSpec {
        r: l.r,
        alpha: l.alpha,
        dropout: l.dropout,
        targets: l.targets.clone(),
        use_rslora: l.use_rslora,
    }
}

/// The base model, with fresh or loaded adapters when `lora` is given; every base weight is
/// trainable only for full fine-tuning.
pub fn model<B: Backend>(
    model_dir: &Path,
    lora: Option<&LoraSection>,
    seed: u64,
    device: &B::Device,
) -> Result<(CausalLm<B>, Option<LoraSpec>)> {
    require_exists("model.path", model_dir)?;
    let base = trainer::load_hf_model::<B>(model_dir, lora.is_none(), device)?;
    let Some(l) = lora else {
        return Ok((base, None));
    };
    match &l.init_adapter {
        Some(dir) => {
            require_exists("lora.init_adapter", dir)?;
            let (m, spec) = trainer::lora::load_adapter(base, dir, true)?;
            Ok((m, Some(spec)))
        }
        None => {
            let spec = lora_spec(l);
            let m = trainer::lora::add_lora(base, &spec, seed)?;
            Ok((m, Some(spec)))
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
