//! Checkpoint files for tidemill: safetensors I/O as f32 host tensors,
//! Hugging Face model directories (single file or sharded with an index),
//! PEFT LoRA adapter directories, and atomic file replacement.
//!
//! Everything here is synchronous and knows nothing of models or of the
//! parallel runtime. Every error names the file (and tensor key) at fault;
//! malformed input never panics, and a failed write never leaves a file
//! that looks valid.
//!
//! ```
//! # use tidemill_checkpoint as checkpoint;
//! use checkpoint::{load_hf_weights, save_hf_weights, DType, HostTensor, TensorMap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let mut weights = TensorMap::new();
//! weights.insert(
//!     "model.embed_tokens.weight".to_string(),
//!     HostTensor::new(vec![2, 3], vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25]),
//! );
//! // bf16 on disk; one `model.safetensors` since it fits in 5 GB.
//! save_hf_weights(dir.path(), &weights, DType::BF16, 5_000_000_000)?;
//!
//! let loaded = load_hf_weights(dir.path())?;
//! assert_eq!(loaded.tensors, weights);
//! assert_eq!(loaded.dtypes["model.embed_tokens.weight"], DType::BF16);
//! # Ok(())
//! # }
//! ```

mod atomic;
mod error;
mod hf;
mod host;
mod peft;
mod peft_config;
mod safetensors_io;
pub mod sharded;

pub use atomic::atomic_write;
pub use error::Error;
pub use hf::{check_hf_weights, load_hf_weights, save_hf_weights, LoadedWeights};
pub use host::{DType, HostTensor, TensorMap};
pub use peft::{load_peft_adapter, save_peft_adapter};
pub use peft_config::AdapterConfig;
pub use safetensors_io::{
    check_safetensors, read_safetensors, read_safetensors_with_dtypes, write_safetensors,
};
