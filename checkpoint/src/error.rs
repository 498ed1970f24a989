//! The one error type of this crate. Every variant names the file (and the
//! tensor key where there is one) so that a message alone tells the user
//! what to look at.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on `path` (open, read, write, rename, ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file (index, adapter config) could not be parsed or written.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The underlying error (carries line and column).
        source: serde_json::Error,
    },

    /// A `.safetensors` file is malformed: truncated, a header whose offsets
    /// do not match the data, invalid JSON in the header, ...
    #[error("reading {}: not a valid safetensors file: {message}", file.display())]
    Safetensors {
        /// The `.safetensors` file.
        file: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor is stored in a dtype this crate does not convert to f32.
    #[error(
        "reading {}: tensor `{key}` has dtype {dtype}; supported: F32, BF16, F16",
        file.display()
    )]
    UnsupportedDtype {
        /// The `.safetensors` file.
        file: PathBuf,
        /// The tensor's name.
        key: String,
        /// The dtype as safetensors spells it (`I64`, `F64`, ...).
        dtype: String,
    },

    /// A tensor handed to a writer has a data length that does not match its shape.
    #[error(
        "writing {}: tensor `{key}` has shape {shape:?} but {len} values",
        file.display()
    )]
    DataLength {
        /// The file being written.
        file: PathBuf,
        /// The tensor's name.
        key: String,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// How many values it actually holds.
        len: usize,
    },

    /// A Hugging Face model directory holds no weights this crate reads.
    #[error(
        "{}: no model.safetensors or model.safetensors.index.json found \
         (PyTorch .bin weights are not supported; convert them to safetensors)",
        dir.display()
    )]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },

    /// A sharded model's index and its shard files disagree about a tensor.
    #[error("{}: tensor `{key}`: {reason}", file.display())]
    IndexMismatch {
        /// The shard (or index) file where the disagreement shows.
        file: PathBuf,
        /// The tensor's name.
        key: String,
        /// What disagrees.
        reason: String,
    },

    /// A `model.safetensors.index.json` is well-formed JSON but not a usable index.
    #[error("{}: invalid index: {reason}", file.display())]
    InvalidIndex {
        /// The index file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A PEFT adapter uses a feature this crate does not implement.
    #[error("{}: unsupported adapter: {reason}", file.display())]
    UnsupportedAdapter {
        /// The adapter file (`adapter_config.json` or the weights file).
        file: PathBuf,
        /// Which field or feature, and why.
        reason: String,
    },

    /// A PEFT adapter's tensors do not agree with its config.
    #[error("{}: tensor `{key}`: {reason}", file.display())]
    InvalidAdapter {
        /// The adapter weights file.
        file: PathBuf,
        /// The tensor's name.
        key: String,
        /// What disagrees (e.g. the rank in its shape versus `r`).
        reason: String,
    },

    /// A sharded checkpoint that cannot be used (the file at fault and why).
    #[error(transparent)]
    Damaged(#[from] crate::sharded::Damaged),

    /// A conversion that cannot be done as asked (the file or tensor named).
    #[error("{}: {reason}", file.display())]
    Convert {
        /// The file, directory or tensor source at fault.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Whether the error is about files the user gave (a model, an adapter, an index):
    /// malformed, truncated, of a dtype we do not read, or missing.
    pub fn is_input(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            Error::Json { .. }
            | Error::Safetensors { .. }
            | Error::UnsupportedDtype { .. }
            | Error::NoWeights { .. }
            | Error::IndexMismatch { .. }
            | Error::InvalidIndex { .. }
            | Error::UnsupportedAdapter { .. }
            | Error::InvalidAdapter { .. }
            | Error::Convert { .. } => true,
            Error::DataLength { .. } | Error::Damaged(_) => false,
        }
    }

    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
