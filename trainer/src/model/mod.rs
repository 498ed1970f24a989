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

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, FloatDType, Tensor};

pub use config::{Family, ModelConfig, MoeConfig, RopeScaling};
pub use decoder::{CausalLm, Inputs, Sharding};
pub use experts::ExpertParallel;
pub use shard::{Placement, TensorParallel};

use crate::error::{Error, Result};

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

/// Mixed precision (`model.dtype`): `f32` leaves `model` as it is; `bf16` makes its matmuls
/// run in bf16 (see [`CausalLm::compute`]) and stores the frozen projection weights (LoRA's
/// base model, all but the embedding and the norms) in bf16, half their memory; trainable
/// parameters stay f32, the master weights AdamW updates. The embedding and norm weights
/// stay f32 as `torch.autocast` leaves them (the embedding lookup and RMSNorm run in f32).
/// `f16` is refused: without loss scaling its gradients underflow.
pub fn set_precision<B: Backend>(
    model: CausalLm<B>,
    dtype: checkpoint::DType,
) -> Result<CausalLm<B>> {
    match dtype {
        checkpoint::DType::F32 => Ok(model),
        checkpoint::DType::BF16 => {
            let mut model = model.map(&mut FrozenProjections {
                dtype: FloatDType::BF16,
                path: Vec::new(),
            });
            model.compute = FloatDType::BF16;
            Ok(model)
        }
        checkpoint::DType::F16 => Err(Error::Training {
            key: "model.dtype".into(),
            message: "f16 compute needs loss scaling, which tidemill does not do; use \"bf16\" \
                      (or \"f32\")"
                .into(),
        }),
    }
}

/// Casts every 2-D parameter that does not require grad, but the embedding.
struct FrozenProjections {
    dtype: FloatDType,
    path: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for FrozenProjections {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let embedding = self.path.iter().any(|p| p == "embed_tokens");
        let tensor = if D == 2 && !embedding && !tensor.is_require_grad() {
            tensor.cast(self.dtype)
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}
