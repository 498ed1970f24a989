//! Causal-LM cross-entropy over supervised tokens.

use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::collective::{reduce_from, Group, ParallelBackend};

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
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, [n, 1]), &device);
    let picked = log_softmax(logits, 1).gather(1, index).reshape([n]);
    (picked * weights::<B>(targets, denominator, &device))
        .sum()
        .neg()
}

/// [`cross_entropy`] over logits split by vocabulary across `group` (Megatron's
/// `vocab_parallel_cross_entropy`): this rank holds `logits: [n, v]` for the ids
/// `vocab_start..vocab_start + v`. Only `[n, 1]` columns cross the group: the row maxima,
/// the sums of exponentials and the target logits; the result is the same on every rank.
pub fn vocab_parallel_cross_entropy<B: ParallelBackend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    denominator: f64,
    vocab_start: usize,
    group: &Group,
) -> Tensor<B, 1> {
    let [n, v] = logits.dims();
    let device = logits.device();
    // Subtracting the global row maximum keeps exp() finite; it cancels out of the loss, so
    // it needs no gradient.
    let max = group.all_max(logits.clone().detach().max_dim(1));
    let z = logits - max;
    let sum_exp = reduce_from(z.clone().exp().sum_dim(1), group);
    let local = |t: i64| {
        usize::try_from(t)
            .ok()
            .and_then(|t| t.checked_sub(vocab_start))
            .filter(|&i| i < v && t != IGNORE)
    };
    let index: Vec<i64> = targets
        .iter()
        .map(|&t| local(t).map_or(0, |i| i as i64))
        .collect();
    let here: Vec<f32> = targets
        .iter()
        .map(|&t| if local(t).is_some() { 1.0 } else { 0.0 })
        .collect();
    let index = Tensor::<B, 2, Int>::from_data(TensorData::new(index, [n, 1]), &device);
    let here = Tensor::<B, 2>::from_data(TensorData::new(here, [n, 1]), &device);
    let target_logit = reduce_from(z.gather(1, index) * here, group);
    let per_token = (sum_exp.log() - target_logit).reshape([n]);
    (per_token * weights::<B>(targets, denominator, &device)).sum()
}

/// `1 / denominator` at supervised positions, 0 elsewhere.
fn weights<B: Backend>(targets: &[i64], denominator: f64, device: &B::Device) -> Tensor<B, 1> {
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
    Tensor::from_data(TensorData::new(weight, [targets.len()]), device)
}

/// Number of supervised positions.
pub fn supervised(targets: &[i64]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE).count()
}
