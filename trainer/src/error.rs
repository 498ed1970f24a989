//! The one error type of the trainer crate.

use std::path::PathBuf;

use crate::data::DataError;

/// Everything that can go wrong while building, loading, training or exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config.json, tokenizer_config.json…) is not what we expect.
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    /// A key of an HF `config.json` is missing, has the wrong type or an unsupported value.
    #[error("{path}: key `{key}`: {message}")]
    ModelConfig {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The weights on disk do not fit the architecture described by config.json.
    #[error("{file}: tensor `{key}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        file: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// config.json asks for a tensor that no weight file holds.
    #[error("{dir}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor {
        dir: PathBuf,
        key: String,
        expected: Vec<usize>,
    },
    /// A weight file holds tensors the architecture does not use.
    #[error("{file}: unexpected tensor `{key}`{more}")]
    UnexpectedTensor {
        file: PathBuf,
        key: String,
        /// ", and N more" when there are several.
        more: String,
    },
    /// A LoRA setting or adapter that does not fit the model.
    #[error("LoRA: {0}")]
    Lora(String),
    /// A training option that is out of range.
    #[error("training option `{key}`: {message}")]
    Training { key: String, message: String },
    /// Reading or writing safetensors / PEFT files.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// A collective failed (a peer died, stopped answering, or the ranks diverged).
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// Reading or tokenizing a dataset.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The loss or the gradient norm became NaN or infinite (the step was not applied).
    #[error(
        "step {step}: loss or gradient norm is {loss}; lower the learning rate or check the data"
    )]
    NonFiniteLoss { step: u64, loss: f64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
