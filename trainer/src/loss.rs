//! Causal-LM cross-entropy over supervised tokens, in f32 whatever the logits' dtype, a
//! chunk of rows at a time (never the whole `[tokens, vocab]` in f32).

use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, FloatDType, Int, Tensor, TensorData};

use crate::collective::{reduce_from, Group, ParallelBackend};

/// Label value of a position that is not supervised (PyTorch's `ignore_index`).
pub use crate::data::IGNORE_INDEX as IGNORE;

/// At most this many logits are widened to f32 at once (256 MiB): 441 rows of Qwen2's
/// 152k vocabulary, 523 of Llama 3's 128k. The strategy search's memory model counts the
/// same constant.
pub const CHUNK_ELEMS: usize = parallel::plan::LOSS_CHUNK_ELEMS;

/// Rows of a `[n, vocab]` logits matrix per chunk.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_ELEMS / vocab.max(1)).max(1)
}

/// `loss(rows, their targets)` summed over chunks of `rows` rows of `logits`.
pub fn chunked<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    rows: usize,
    mut loss: impl FnMut(Tensor<B, 2>, &[i64]) -> Tensor<B, 1>,
) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    if n <= rows {
        return loss(logits, targets);
    }
    let mut total: Option<Tensor<B, 1>> = None;
    for start in (0..n).step_by(rows.max(1)) {
        let end = (start + rows).min(n);
        let part = loss(logits.clone().slice(start..end), &targets[start..end]);
        total = Some(match total {
            Some(t) => t + part,
            None => part,
        });
    }
    total.unwrap_or_else(|| Tensor::zeros([1], &logits.device()))
}

/// Sum of token cross-entropies over the supervised positions, divided by `denominator`.
///
/// `logits: [n, vocab]` (any float dtype; the softmax runs in f32); `targets[t]` is the
/// token to predict from position `t` or [`IGNORE`]. With `denominator` = the supervised
/// tokens of the whole global batch, the gradients of the micro-batches add up to the
/// gradient of the global mean. One chunk: see [`chunked`].
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    denominator: f64,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    // The index and the weights are made on the device from the uploaded targets.
    let t = Tensor::<B, 1, Int>::from_data(TensorData::new(targets.to_vec(), [n]), &device);
    let ignored = t.clone().equal_elem(IGNORE);
    let weight = ignored
        .clone()
        .bool_not()
        .float()
        .cast(FloatDType::F32)
        .mul_scalar(1.0 / denominator);
    let index = t.mask_fill(ignored, 0).reshape([n, 1]);
    let picked = log_softmax(logits.cast(FloatDType::F32), 1)
        .gather(1, index)
        .reshape([n]);
    (picked * weight).sum().neg()
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
    let logits = logits.cast(FloatDType::F32);
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
