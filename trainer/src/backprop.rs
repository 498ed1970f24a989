//! Forward and backward of one micro-batch on a rank without pipeline stages.
//!
//! The loss is taken a chunk of rows at a time, each chunk with its own small backward to
//! the logits, then one backward from the logits through the model: only one chunk of the
//! `[tokens, vocab]` logits is ever widened to f32 (Liger's and torchtune's chunked
//! cross-entropy do the same).
//!
//! With `recompute` (Megatron's full recomputation, one layer per checkpoint) a first pass
//! runs without a graph, keeping only the input of every decoder layer; the backward pass
//! then rebuilds one layer's graph at a time from its saved input, back from the head to
//! the embedding. Each layer draws its dropout from a seed of its own
//! ([`CausalLm::layer_forward`]), so its second run is the same as its first.

use burn::module::{AutodiffModule, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::collective::TrainBackend;
use crate::data::Batch;
use crate::eval::inputs;
use crate::loss;
use crate::model::CausalLm;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// The summed loss of `batch` over `denominator` (on the device, detached) and its
/// gradients. `seed` draws the micro-batch's dropout.
pub fn micro_batch<B: TrainBackend>(
    model: &CausalLm<B>,
    batch: &Batch,
    denominator: f64,
    recompute: bool,
    seed: u64,
) -> (Tensor<Inner<B>, 1>, GradientsParams) {
    run(model, batch, denominator, recompute, seed, None)
}

/// [`micro_batch`], the loss `chunk` rows at a time when given ([`loss::chunk_rows`]
/// when not).
fn run<B: TrainBackend>(
    model: &CausalLm<B>,
    batch: &Batch,
    denominator: f64,
    recompute: bool,
    seed: u64,
    chunk: Option<usize>,
) -> (Tensor<Inner<B>, 1>, GradientsParams) {
    let inputs = crate::model::Inputs {
        dropout_seed: Some(seed),
        ..inputs(batch)
    };
    if !recompute {
        let logits = model.forward(&inputs, true);
        let [n, vocab] = logits.dims();
        if chunk.unwrap_or_else(|| loss::chunk_rows(vocab)) >= n {
            // One chunk: the plain graph holds no more f32 than a chunk.
            let loss = model.loss_of_logits(logits, &batch.targets, denominator);
            let value = loss.clone().inner();
            return (value, GradientsParams::from_grads(loss.backward(), model));
        }
        let (loss, dlogits) = loss_and_grad(model, &logits, &batch.targets, denominator, chunk);
        let grads = (logits * dlogits).sum().backward();
        return (loss, GradientsParams::from_grads(grads, model));
    }
    let ctx = model.context(&inputs, true);
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let (pass, output) = Recomputed::forward(model, 0, None, &inputs);
    // The head and the loss from the last layer's output, then the layers from the last.
    let x = leaf(output);
    let logits = model.head(x.clone(), &ctx);
    let (loss, dlogits) = loss_and_grad(model, &logits, &batch.targets, denominator, chunk);
    let g = backward(model, &mut acc, &x, logits * dlogits);
    pass.backward(model, &ctx, &inputs, g, &mut acc);
    (loss, acc.grads())
}

/// A chunk of layers run once without a graph, keeping only each layer's input, to be run
/// again one layer at a time in its backward pass (Megatron's full recomputation).
pub(crate) struct Recomputed<B: TrainBackend> {
    chunk: usize,
    /// The input of each of the chunk's layers, in order (the first is the chunk's input).
    saved: Vec<Tensor<Inner<B>, 2>>,
    /// Whether the chunk starts from the token embeddings (the first virtual stage).
    embedded: bool,
}

impl<B: TrainBackend> Recomputed<B> {
    /// Whether the chunk started from the token embeddings (else from received states).
    pub fn embedded(&self) -> bool {
        self.embedded
    }

    /// Run `chunk` of `model` on `input` (the previous stage's hidden states) or, without
    /// one, on the token embeddings: the pass to recompute, and the chunk's output (the last
    /// layer's, before the final norm).
    pub fn forward(
        model: &CausalLm<B>,
        chunk: usize,
        input: Option<Tensor<Inner<B>, 2>>,
        inputs: &crate::model::Inputs<'_>,
    ) -> (Self, Tensor<Inner<B>, 2>) {
        let inner = model.valid();
        let ctx = inner.context(inputs, true);
        let embedded = input.is_none();
        let mut x = input.unwrap_or_else(|| inner.embed(inputs.tokens, ctx.tp.as_ref()));
        let mut saved = Vec::new();
        for i in model.chunk_layers(chunk) {
            saved.push(x.clone());
            x = inner.layer_forward(i, x, &ctx, inputs);
        }
        let pass = Self {
            chunk,
            saved,
            embedded,
        };
        (pass, x)
    }

    /// Backward from `g`, the gradient of the output: each layer rebuilt from its saved
    /// input and run back, then the embedding's lookup when the chunk started from it;
    /// parameter gradients go to `acc`. Returns the gradient of the chunk's input.
    pub fn backward(
        mut self,
        model: &CausalLm<B>,
        ctx: &crate::model::decoder::ForwardContext<B>,
        inputs: &crate::model::Inputs<'_>,
        mut g: Tensor<Inner<B>, 2>,
        acc: &mut GradientsAccumulator<CausalLm<B>>,
    ) -> Tensor<Inner<B>, 2> {
        let trainable_embedding = model
            .embed_tokens
            .as_ref()
            .is_some_and(|e: &Param<Tensor<B, 2>>| e.val().is_require_grad());
        let layers = model.chunk_layers(self.chunk);
        let first = layers.start;
        for i in layers.rev() {
            let saved = self.saved.pop().expect("each layer's input is saved");
            if i == first && self.embedded && !trainable_embedding {
                // Nothing wants the gradient of a frozen embedding's output.
                let y = model.layer_forward(i, Tensor::from_inner(saved), ctx, inputs);
                let grads = (y * Tensor::from_inner(g.clone())).sum().backward();
                acc.accumulate(model, GradientsParams::from_grads(grads, model));
                continue;
            }
            let x = leaf(saved);
            let y = model.layer_forward(i, x.clone(), ctx, inputs);
            g = backward(model, acc, &x, y * Tensor::from_inner(g.clone()));
        }
        if self.embedded && trainable_embedding {
            let e = model.embed(inputs.tokens, ctx.tp.as_ref());
            let grads = (e * Tensor::from_inner(g.clone())).sum().backward();
            acc.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        g
    }
}

/// `seed` and `value` hashed together (splitmix64's finaliser over their combination), so
/// that seeds made of different (step, rank, micro-batch) never coincide by arithmetic.
pub(crate) fn mix(seed: u64, value: u64) -> u64 {
    let mut z = seed
        ^ value
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A saved activation as a leaf of a new graph.
pub(crate) fn leaf<B: TrainBackend>(x: Tensor<Inner<B>, 2>) -> Tensor<B, 2> {
    Tensor::from_inner(x).require_grad()
}

/// Backward from `weighted` (an output times its upstream gradient), its parameter
/// gradients added to `acc`: the gradient of the leaf `x`.
pub(crate) fn backward<B: TrainBackend>(
    model: &CausalLm<B>,
    acc: &mut GradientsAccumulator<CausalLm<B>>,
    x: &Tensor<B, 2>,
    weighted: Tensor<B, 2>,
) -> Tensor<Inner<B>, 2> {
    let grads = weighted.sum().backward();
    let g = x
        .grad(&grads)
        .unwrap_or_else(|| Tensor::<Inner<B>, 2>::zeros(x.dims(), &x.device()).cast(x.dtype()));
    acc.accumulate(model, GradientsParams::from_grads(grads, model));
    g
}

/// The loss of `logits` (detached, on the device) and its gradient with respect to them,
/// in their dtype: computed a chunk of rows at a time, each chunk's f32 softmax freed
/// before the next.
pub(crate) fn loss_and_grad<B: TrainBackend>(
    model: &CausalLm<B>,
    logits: &Tensor<B, 2>,
    targets: &[i64],
    denominator: f64,
    chunk: Option<usize>,
) -> (Tensor<Inner<B>, 1>, Tensor<B, 2>) {
    let whole = logits.clone().inner();
    let n = whole.dims()[0];
    let rows = chunk.unwrap_or_else(|| loss::chunk_rows(whole.dims()[1]));
    let mut total: Option<Tensor<Inner<B>, 1>> = None;
    let mut grads = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows) {
        let end = (start + rows).min(n);
        let z = leaf(whole.clone().slice(start..end));
        let l = model.loss_rows(z.clone(), &targets[start..end], denominator);
        let value = l.clone().inner();
        let g = l.backward();
        grads.push(z.grad(&g).unwrap_or_else(|| {
            Tensor::<Inner<B>, 2>::zeros(z.dims(), &z.device()).cast(z.dtype())
        }));
        total = Some(match total {
            Some(t) => t + value,
            None => value,
        });
    }
    let total = total.unwrap_or_else(|| Tensor::zeros([1], &whole.device()));
    (total, Tensor::from_inner(Tensor::cat(grads, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuTrain;
    use crate::data::{collate, Row};
    use burn::tensor::ElementConversion;

    /// A tiny random Llama whose two layers both matter.
    fn model() -> CausalLm<CpuTrain> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/llama2");
        crate::model::load_hf_model(&dir, true, &Default::default()).expect("fixture")
    }

    fn batch() -> Batch {
        let rows: Vec<Row> = (0..2)
            .map(|r| {
                let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + r * 5 + 3) % 96).collect();
                let mut targets: Vec<i64> = tokens[1..].iter().map(|&t| i64::from(t)).collect();
                targets.push(loss::IGNORE);
                targets[0] = loss::IGNORE;
                Row {
                    positions: (0..12).collect(),
                    segments: vec![0; 12],
                    tokens,
                    targets,
                }
            })
            .collect();
        collate(&rows.iter().collect::<Vec<_>>())
    }

    fn values(model: &CausalLm<CpuTrain>, grads: &GradientsParams) -> Vec<f32> {
        let mut out = Vec::new();
        for p in parallel::dp::params_by_path(model) {
            if let Some(g) = grads.get::<Inner<CpuTrain>, 2>(p.id) {
                out.extend(g.into_data().convert::<f32>().to_vec::<f32>().expect("f32"));
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// burn's random state is one per process: tests that seed it (training passes seed
    /// every layer) take turns.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn recompute_and_chunked_loss_give_the_plain_gradients() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let model = model();
        let batch = batch();
        // The plain way: one graph, the whole loss at once.
        let plain = model.loss(&inputs(&batch), &batch.targets, 17.0, true);
        let plain_loss = plain.clone().into_scalar().elem::<f64>();
        let plain_grads = values(
            &model,
            &GradientsParams::from_grads(plain.backward(), &model),
        );
        assert!(!plain_grads.is_empty());
        for (recompute, chunk) in [
            (false, None),
            (false, Some(5)),
            (true, Some(7)),
            (true, None),
        ] {
            let (loss, grads) = run(&model, &batch, 17.0, recompute, 3, chunk);
            let loss = loss.into_scalar().elem::<f64>();
            assert!(
                (loss - plain_loss).abs() < 1e-6,
                "{recompute} {chunk:?}: {loss} vs {plain_loss}"
            );
            let d = max_diff(&values(&model, &grads), &plain_grads);
            assert!(d < 1e-6, "{recompute} {chunk:?}: gradients differ by {d}");
        }
    }

    #[test]
    fn a_recomputed_layer_draws_the_dropout_it_drew_the_first_time() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let spec = crate::LoraSpec {
            dropout: 0.3,
            targets: crate::lora::TARGETS.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        let model = crate::lora::add_lora(model(), &spec, 5).expect("adapters");
        // B starts at 0: one optimizer-free nudge so the adapters matter.
        let model = burn::module::Module::map(model, &mut Nudge);
        let batch = batch();
        let (plain_loss, plain) = run(&model, &batch, 9.0, false, 11, Some(5));
        let (loss, grads) = run(&model, &batch, 9.0, true, 11, Some(5));
        let (a, b) = (
            plain_loss.into_scalar().elem::<f64>(),
            loss.into_scalar().elem::<f64>(),
        );
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        let d = max_diff(&values(&model, &grads), &values(&model, &plain));
        assert!(d < 1e-6, "gradients differ by {d}");
        // And the dropout is drawn: another seed gives another loss.
        let (other, _) = run(&model, &batch, 9.0, true, 12, Some(5));
        assert!((other.into_scalar().elem::<f64>() - b).abs() > 1e-6);
    }

    /// Adds 0.01 to every trainable parameter.
    struct Nudge;

    impl burn::module::ModuleMapper<CpuTrain> for Nudge {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<CpuTrain, D>>,
        ) -> burn::module::Param<Tensor<CpuTrain, D>> {
            param.map(|t| {
                if t.is_require_grad() {
                    Tensor::from_inner(t.inner().add_scalar(0.01)).require_grad()
                } else {
                    t
                }
            })
        }
    }

    #[test]
    fn chunked_cross_entropy_equals_the_whole() {
        let model = model();
        let batch = batch();
        let logits = model.valid().forward(&inputs(&batch), false);
        let whole = loss::cross_entropy(logits.clone(), &batch.targets, 5.0)
            .into_scalar()
            .elem::<f64>();
        for rows in [1, 5, 7, 24] {
            let chunked = loss::chunked(logits.clone(), &batch.targets, rows, |z, t| {
                loss::cross_entropy(z, t, 5.0)
            })
            .into_scalar()
            .elem::<f64>();
            // The same sums in another order: equal to f32 rounding.
            let rel = (chunked - whole).abs() / whole.abs();
            assert!(rel < 1e-6, "{rows} rows: {chunked} vs {whole}");
        }
    }
}
