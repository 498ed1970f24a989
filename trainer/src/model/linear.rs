//! A linear projection with an optional, unmerged LoRA branch:
//! `y = x·W + b + s · dropout(x)·A·B`, computed in the dtype of `x` (the weights are cast
//! to it on use: f32 masters and a bf16 frozen base alike).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, FloatDType, Tensor, TensorData};

use checkpoint::HostTensor;

use crate::collective::{ParallelBackend, TpRegion};

/// The low-rank update of one [`Linear`] (PEFT's `lora_A`, `lora_B`).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]` — PEFT stores its transpose, `lora_A.weight: [r, in]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]` — PEFT stores its transpose, `lora_B.weight: [out, r]`.
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the LoRA input, applied only in training.
    pub dropout: f64,
}

/// A dense projection. The weight is kept as `[in, out]` (burn's layout); HF stores `[out, in]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
}

/// Make a parameter from host data, trainable or frozen.
pub fn param<B: Backend, const D: usize>(
    t: HostTensor,
    trainable: bool,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let tensor = Tensor::from_data(TensorData::new(t.data, t.shape), device);
    Param::from_tensor(tensor).set_require_grad(trainable)
}

/// Transpose a row-major `[rows, cols]` host matrix.
pub fn transpose(t: &HostTensor) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    HostTensor::new(vec![cols, rows], transposed(rows, cols, &t.data))
}

/// The `[cols, rows]` transpose of row-major `[rows, cols]` values.
pub fn transposed(rows: usize, cols: usize, data: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    // In 32 × 32 tiles, so reads and writes both stay in cache (a plain double loop is
    // several times slower on large weights: it was a tenth of a checkpoint save).
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

/// Copy a tensor back to the host.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>();
    // A float tensor converted to f32 always yields an f32 vector.
    let values = data.to_vec::<f32>().unwrap_or_default();
    HostTensor::new(shape, values)
}

impl<B: Backend> Linear<B> {
    /// From HF tensors: `weight: [out, in]`, `bias: [out]`.
    pub fn from_hf(
        weight: HostTensor,
        bias: Option<HostTensor>,
        trainable: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: param(transpose(&weight), trainable, device),
            bias: bias.map(|b| param(b, trainable, device)),
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `x: [n, in]` → `[n, out]`.
    pub fn forward(&self, x: Tensor<B, 2>, train: bool) -> Tensor<B, 2> {
        self.add_bias(self.forward_unbiased(x, train))
    }

    /// A row-parallel projection (Megatron's `RowParallelLinear`): `x` holds this rank's
    /// slice of the input features, the weight (and LoRA's A) the matching rows; the
    /// partial products are summed over the group (this rank's rows of the sum under
    /// sequence parallelism), then the (replicated) bias is added.
    /// LoRA's replicated B sees a partial input, so its gradient is partial too (summed
    /// over the group after the backward pass).
    pub fn forward_row(&self, x: Tensor<B, 2>, train: bool, tp: Option<&TpRegion>) -> Tensor<B, 2>
    where
        B: ParallelBackend,
    {
        match tp {
            Some(r) => self.add_bias(r.leave(self.forward_unbiased(x, train))),
            None => self.forward(x, train),
        }
    }

    /// `x·W + s·dropout(x)·A·B`, without the bias.
    pub fn forward_unbiased(&self, x: Tensor<B, 2>, train: bool) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let mut y = x.clone().matmul(self.weight.val().cast(dtype));
        if let Some(lora) = &self.lora {
            let x = if train && lora.dropout > 0.0 {
                let keep = 1.0 - lora.dropout;
                let mask =
                    Tensor::<B, 2>::random(x.dims(), Distribution::Bernoulli(keep), &x.device());
                x * mask.div_scalar(keep).cast(dtype)
            } else {
                x
            };
            // The scale goes into B in f32 (a scalar multiply in bf16 would round it).
            let a = lora.a.val().cast(dtype);
            let b = lora.b.val().mul_scalar(lora.scale).cast(dtype);
            y = y + x.matmul(a).matmul(b);
        }
        y
    }

    fn add_bias(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.bias {
            // The bias in the compute dtype (as autocast casts it), the sum in f32 and rounded
            // once: the bias's gradient, a sum over the rows, then adds up in f32 too.
            Some(bias) => {
                let (dtype, f32) = (y.dtype(), FloatDType::F32);
                let bias = bias.val().cast(dtype).cast(f32).unsqueeze_dim(0);
                (y.cast(f32) + bias).cast(dtype)
            }
            None => y,
        }
    }

    /// HF `[out, in]` weight with the LoRA update merged in: `W + s·(A·B)ᵀ`.
    pub fn merged_hf_weight(&self) -> HostTensor {
        let mut w = self.weight.val().cast(FloatDType::F32);
        if let Some(lora) = &self.lora {
            w = w + lora.a.val().matmul(lora.b.val()).mul_scalar(lora.scale);
        }
        transpose(&to_host(w))
    }
}
