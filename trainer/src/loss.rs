//! Causal-LM cross-entropy over supervised tokens.

use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// Label value of a position that is not supervised (PyTorch's `ignore_index`).
pub use crate::data::IGNORE_INDEX as IGNORE;

/// Sum of token cross-entropies over the supervised positions, divided by `denominator`.
///
/// `logits: [n, vocab]`; `targets[t]` is the token to predict from position `t` or
/// [`IGNORE`]. With `denominator` = the supervised tokens of the whole global batch, the
/// gradients of the micro-batches add up to the gradient of the global mean.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    denominator: f64,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let index: Vec<i64> = targets
        .iter()
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let weight: Vec<f32> = targets
        .iter()
        .map(|&t| {
            if t == IGNORE {
                0.0
            } else {
                (1.0 / denominator) as f32
            }
        })
        .collect();
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, [n, 1]), &device);
    let weight = Tensor::<B, 1>::from_data(TensorData::new(weight, [n]), &device);
    let picked = log_softmax(logits, 1).gather(1, index).reshape([n]);
    (picked * weight).sum().neg()
}

/// Number of supervised positions.
pub fn supervised(targets: &[i64]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE).count()
}
