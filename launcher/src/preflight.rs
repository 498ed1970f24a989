//! What `launch train` checks before it starts any worker, so that bad input ends the job
//! at once (exit 2, naming the file and line) instead of crashing workers that would be
//! restarted: the model directory (config.json, every weight file's header and size, the
//! tokenizer when the data needs one), the adapter to start from, and every line of the
//! data files (valid JSON of a known shape; token ids inside the vocabulary). Nothing is
//! tokenized and no weight is read: the files' headers and lines only.

use std::path::Path;

use trainer::data::{self, DataError, RawSample, SampleError};
use trainer::ModelConfig;

use crate::config::JobConfig;
use crate::error::{require_exists, Result};
use crate::setup;

/// Check `cfg`'s files for `launch train`.
pub fn check(cfg: &JobConfig) -> Result<()> {
    cfg.job.device.ready()?;
    let model = check_model(cfg)?;
    let train = setup::required_file("data.train", cfg.data.train.as_deref(), "train")?;
    let mut files = vec![("data.train", train)];
    if let Some(eval) = &cfg.data.eval {
        files.push(("data.eval", eval.clone()));
    }
    let mut tokenizer = false;
    for (key, path) in &files {
        require_exists(key, path)?;
        tokenizer |= scan(path, model.vocab_size)?;
    }
    if tokenizer {
        data::TextTokenizer::load(&cfg.model.path).map_err(trainer::Error::from)?;
    }
    Ok(())
}

/// The model directory (and adapter) a job names: its config and weight files.
pub fn check_model(cfg: &JobConfig) -> Result<ModelConfig> {
    setup::require_dir("model.path", &cfg.model.path)?;
    let model = ModelConfig::from_dir(&cfg.model.path)?;
    checkpoint::check_hf_weights(&cfg.model.path)?;
    if let Some(dir) = cfg.lora.as_ref().and_then(|l| l.init_adapter.as_ref()) {
        setup::require_dir("lora.init_adapter", dir)?;
        checkpoint::load_peft_adapter(dir)?;
    }
    Ok(model)
}

/// Read every line of a JSONL file: the first bad one is an error naming the file and
/// line. Whether some line needs a tokenizer.
fn scan(path: &Path, vocab: usize) -> Result<bool> {
    let mut tokenizer = false;
    let mut outside = None;
    data::visit_jsonl(path, |line, sample| {
        match sample {
            RawSample::Tokens { input_ids, .. } => {
                if let Some(&id) = input_ids.iter().find(|&&id| id as usize >= vocab) {
                    outside = Some((line, id));
                    return false;
                }
            }
            RawSample::Messages(_) | RawSample::PromptCompletion { .. } | RawSample::Text(_) => {
                tokenizer = true;
            }
        }
        true
    })
    .map_err(trainer::Error::from)?;
    if let Some((line, id)) = outside {
        let source = SampleError::OutsideVocabulary { id, vocab };
        return Err(trainer::Error::from(DataError::Sample {
            path: path.to_path_buf(),
            line,
            source,
        })
        .into());
    }
    Ok(tokenizer)
}
