//! The dense SwiGLU MLP of Llama, Mistral and Qwen2 (and of each Mixtral expert).

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{backend::Backend, FloatDType, Tensor};

use super::linear::Linear;
use crate::collective::{enter, ParallelBackend, TpRegion};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: ParallelBackend> Mlp<B> {
    /// `x: [n, h]` → `[n, h]`; under tensor parallelism over this rank's columns of gate/up
    /// and rows of down.
    pub fn forward(&self, x: Tensor<B, 2>, train: bool, tp: Option<&TpRegion>) -> Tensor<B, 2> {
        let x = enter(x, tp);
        self.down_proj.forward_row(self.hidden(x, train), train, tp)
    }

    /// This rank's part of the output, before the sum over the tensor-parallel group.
    pub(crate) fn forward_partial(&self, x: Tensor<B, 2>, train: bool) -> Tensor<B, 2> {
        self.down_proj
            .forward_unbiased(self.hidden(x, train), train)
    }

    /// `silu(gate(x)) · up(x)` in the dtype of `x`; silu (`x · sigmoid(x)`, two ops in burn)
    /// runs in f32 and is rounded once, as torch's fused silu is.
    fn hidden(&self, x: Tensor<B, 2>, train: bool) -> Tensor<B, 2> {
        let gate = self.gate_proj.forward(x.clone(), train);
        let dtype = gate.dtype();
        silu(gate.cast(FloatDType::F32)).cast(dtype) * self.up_proj.forward(x, train)
    }
}
