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
    /// Options that do not fit together or do not fit the model (the message names the
    /// key, e.g. `parallel: tp=3 must divide the attention heads (32)`).
    #[error("{0}")]
    Options(String),
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
        "step {step}: the loss is {loss} and the gradient norm {grad_norm}; lower the \
         learning rate or check the data"
    )]
    NonFinite {
        step: u64,
        loss: f64,
        grad_norm: f64,
    },
    /// A collective failed after the optimizer step: the ranks' replicas may differ, so
    /// the trainer refuses to go on (resume from the last checkpoint).
    #[error("the trainer cannot go on: {0}")]
    Broken(String),
}

impl Error {
    /// Whether the error is about the user's input (a data file, the model's files, an
    /// adapter, an option) rather than the run: restarting cannot mend it.
    pub fn is_input(&self) -> bool {
        match self {
            Error::Json { .. }
            | Error::ModelConfig { .. }
            | Error::ShapeMismatch { .. }
            | Error::MissingTensor { .. }
            | Error::UnexpectedTensor { .. }
            | Error::Lora(_)
            | Error::Training { .. }
            | Error::Options(_)
            | Error::Data(_) => true,
            Error::Checkpoint(e) => e.is_input(),
            Error::Parallel(e) => matches!(e, parallel::Error::Layout(_)),
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            Error::NonFinite { .. } | Error::Broken(_) => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
