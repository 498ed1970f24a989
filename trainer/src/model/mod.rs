//! Model families (Llama, Mistral, Qwen2, Mixtral) and their Hugging Face name maps.

pub mod config;
pub mod decoder;
pub mod experts;
pub mod hf;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod names;
pub mod rope;
pub mod shard;

use std::path::Path;

use burn::tensor::backend::Backend;

pub use config::{Family, ModelConfig, MoeConfig, RopeScaling};
pub use decoder::{CausalLm, Inputs, Sharding};
pub use experts::ExpertParallel;
pub use shard::{Placement, TensorParallel};

use crate::error::Result;

/// Load an HF model directory (`config.json` + safetensors, single or sharded), every
/// parameter `trainable` or frozen.
pub fn load_hf_model<B: Backend>(
    dir: &Path,
    trainable: bool,
    device: &B::Device,
) -> Result<CausalLm<B>> {
    let config = ModelConfig::from_dir(dir)?;
    let weights = checkpoint::load_hf_weights(dir)?;
    tracing::info!(
        dir = %dir.display(),
        family = config.family.name(),
        layers = config.num_layers,
        hidden = config.hidden_size,
        tensors = weights.tensors.len(),
        "loaded weights"
    );
    hf::from_hf_tensors(
        &config,
        weights.tensors,
        &weights.files,
        dir,
        trainable,
        device,
    )
}
