//! The decoder-only transformer shared by Llama, Mistral, Qwen2 and Mixtral.
//!
//! Shapes: `b` batch, `s` sequence, `h` hidden, `n = b·s` tokens, `d` head dim.

use std::ops::Range;

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, FloatDType, Int, Tensor, TensorData};

use super::config::ModelConfig;
use super::linear::Linear;
pub use super::moe::Moe;
use super::rope;
use crate::collective::{enter, split_rows, Group, ParallelBackend, TpRegion};
use crate::loss;

/// RMSNorm as transformers computes it: `w · x / sqrt(mean(x²) + eps)`, in f32 whatever the
/// compute dtype (and the weight's storage dtype).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `x: [n, h]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = x.cast(FloatDType::F32);
        let variance = x.clone().powi_scalar(2).mean_dim(1);
        let normed = x * variance.add_scalar(self.eps).sqrt().recip();
        normed * self.weight.val().cast(FloatDType::F32).unsqueeze_dim(0)
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Everything about a batch that every layer shares, made on the device once per pass.
pub struct ForwardContext<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    /// RoPE tables (see [`rope::Tables`]).
    pub rope: rope::Tables<B>,
    /// Additive attention mask `[b, 1, s, s]` (broadcast over the heads; `[b, heads, s, s]`
    /// where the backend wants it dense): 0 where attention is allowed, -inf elsewhere.
    pub mask: Tensor<B, 4>,
    pub train: bool,
    /// The dtype matmuls run in (see [`CausalLm::compute`]).
    pub compute: FloatDType,
    /// The tensor-parallel group heads and MLP columns are split over (and, under sequence
    /// parallelism, the rows of each rank outside them).
    pub tp: Option<TpRegion>,
    /// The expert-parallel group the experts are spread over.
    pub ep: Option<Group>,
}

impl<B: ParallelBackend> Attention<B> {
    /// `[n, heads·d]` → `[b, heads, s, d]`, rotated by RoPE on the way as query or key
    /// heads when `rope` says which.
    fn heads(
        &self,
        x: Tensor<B, 2>,
        heads: usize,
        rope: Option<bool>,
        ctx: &ForwardContext<B>,
    ) -> Tensor<B, 4> {
        let n = ctx.batch * ctx.seq;
        let x = x.reshape([n, heads, self.head_dim]);
        let x = match rope {
            Some(query) => ctx.rope.apply(x, query),
            None => x,
        };
        x.reshape([ctx.batch, ctx.seq, heads, self.head_dim])
            .swap_dims(1, 2)
    }

    /// `[b, kv, s, d]` → `[b, kv·groups, s, d]`, each kv head repeated `groups` times in place
    /// (transformers' `repeat_kv`).
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, kv, s, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, groups, s, d])
            .reshape([b, kv * groups, s, d])
    }

    /// `x: [n, h]` → `[n, h]`. Under tensor parallelism this rank computes its
    /// `num_heads` query heads (and their kv heads) only.
    ///
    /// Mixed precision as `torch.autocast` runs transformers' eager attention: projections
    /// and the two attention matmuls in the compute dtype; RoPE, the mask and the softmax
    /// in f32; the output in the compute dtype.
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &ForwardContext<B>) -> Tensor<B, 2> {
        let f32 = FloatDType::F32;
        let x = enter(x, ctx.tp.as_ref()).cast(ctx.compute);
        let q = self.q_proj.forward(x.clone(), ctx.train).cast(f32);
        let q = self.heads(q, self.num_heads, Some(true), ctx);
        let k = self.k_proj.forward(x.clone(), ctx.train).cast(f32);
        let k = self.repeat_kv(self.heads(k, self.num_kv_heads, Some(false), ctx));
        let v = self.repeat_kv(self.heads(
            self.v_proj.forward(x, ctx.train),
            self.num_kv_heads,
            None,
            ctx,
        ));
        let scale = (self.head_dim as f64).powf(-0.5);
        let (q, k) = (q.cast(ctx.compute), k.cast(ctx.compute));
        let [b, heads, s, _] = q.dims();
        // Scaled as torch scales a bf16 tensor by a float: in f32, rounded to the compute
        // dtype (burn's CPU backend would round the scalar itself to bf16 first).
        let scores = q.matmul(k.swap_dims(2, 3)).cast(f32).mul_scalar(scale);
        let scores = scores.cast(ctx.compute).cast(f32) + ctx.mask.clone().expand([b, heads, s, s]);
        let out = softmax(scores, 3).cast(ctx.compute).matmul(v);
        let n = ctx.batch * ctx.seq;
        let out = out
            .swap_dims(1, 2)
            .reshape([n, self.num_heads * self.head_dim]);
        self.o_proj.forward_row(out, ctx.train, ctx.tp.as_ref())
    }
}

/// The SwiGLU feed-forward: `down(silu(gate(x)) · up(x))`. Mixtral's experts name the
/// same three projections `w1` (gate), `w3` (up) and `w2` (down).
pub use super::mlp::Mlp;

/// The feed-forward half of a layer: dense or mixture of experts.
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Sparse(Moe<B>),
}

#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub ffn: FeedForward<B>,
}

impl<B: ParallelBackend> Layer<B> {
    /// `x: [n, h]` (the residual stream, f32) → `[n, h]`.
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &ForwardContext<B>) -> Tensor<B, 2> {
        let f32 = FloatDType::F32;
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx);
        let x = x + attn.cast(f32);
        let normed = self.post_attention_layernorm.forward(x.clone());
        let y = match &self.ffn {
            FeedForward::Dense(mlp) => {
                mlp.forward(normed.cast(ctx.compute), ctx.train, ctx.tp.as_ref())
            }
            FeedForward::Sparse(moe) => moe.forward(normed, ctx),
        };
        x + y.cast(f32)
    }
}

/// A causal language model: embeddings, decoder layers, final norm, LM head. A pipeline
/// stage holds only its layers: the embedding on the first stage (and, tied, on the last
/// as the head), the final norm and head on the last.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub embed_tokens: Option<Param<Tensor<B, 2>>>,
    pub layers: Vec<Layer<B>>,
    pub norm: Option<RmsNorm<B>>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub inv_freq: Vec<f32>,
    /// How this rank's copy is cut (whole model by default; see [`super::shard`]).
    #[module(skip)]
    pub sharding: Sharding,
    /// The dtype the matmuls run in: f32, or bf16 for mixed precision (`model.dtype`).
    /// Parameters keep their own dtype (trainable ones f32, the master weights); the
    /// residual stream, norms, softmax and loss stay f32, as under `torch.autocast`.
    #[module(skip)]
    pub compute: FloatDType,
}

/// How one rank's copy of a model is cut.
#[derive(Clone, Debug, Default)]
pub struct Sharding {
    /// The tensor-parallel group heads, MLP columns and the vocabulary are split over.
    pub tp: Option<Group>,
    /// First vocabulary id of this rank's rows of the embedding and the head.
    pub vocab_start: usize,
    /// The pipeline stage this rank runs (`None`: all layers).
    pub stage: Option<Stage>,
    /// The expert-parallel group the experts are spread over (see [`super::moe`]).
    pub ep: Option<Group>,
    /// Sequence parallelism (with `tp`): outside the tensor-parallel regions (norms,
    /// residuals, what passes between pipeline stages) each rank holds only its chunk of
    /// the tokens (see [`CausalLm::local_rows`]).
    pub sequence_parallel: bool,
}

/// What one pipeline rank runs: rank `index` of `count`, holding one chunk of consecutive
/// layers, or several under the interleaved schedule (chunk `c` is virtual stage
/// `c · count + index`, so the embedding is on rank 0's first chunk and the head on the
/// last rank's last chunk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    pub count: usize,
    /// Global layer ranges of this rank's chunks, in order; `layers` holds them one after
    /// the other.
    pub chunks: Vec<Range<usize>>,
}

impl Stage {
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }

    /// Global index of the rank's `local`-th layer.
    pub fn global_layer(&self, local: usize) -> usize {
        let mut rest = local;
        for c in &self.chunks {
            if rest < c.len() {
                return c.start + rest;
            }
            rest -= c.len();
        }
        unreachable!("layer {local} is not in {:?}", self.chunks)
    }

    /// Indices into `layers` of chunk `chunk`.
    pub fn local_layers(&self, chunk: usize) -> Range<usize> {
        let start = self.chunks[..chunk].iter().map(|c| c.len()).sum();
        start..start + self.chunks[chunk].len()
    }

    /// Virtual stage of `chunk` (its place along the whole pipeline).
    pub fn virtual_stage(&self, chunk: usize) -> usize {
        chunk * self.count + self.index
    }

    /// Virtual stages along the whole pipeline.
    pub fn virtual_stages(&self) -> usize {
        self.count * self.chunks.len()
    }
}

/// The token-level inputs of one forward pass, on the host, row-major `[batch, seq]`.
pub struct Inputs<'a> {
    pub batch: usize,
    pub seq: usize,
    pub tokens: &'a [u32],
    /// Position ids (restart at 0 for each packed sample).
    pub positions: &'a [u32],
    /// Sample id of each token; attention never crosses samples.
    pub segments: &'a [u32],
    /// Where the dropout of each layer is drawn from in training (see
    /// [`CausalLm::layer_forward`]); `None`: from the backend's current state.
    pub dropout_seed: Option<u64>,
}

impl<B: Backend> CausalLm<B> {
    /// The device the parameters live on.
    pub fn device(&self) -> B::Device {
        self.devices().into_iter().next().unwrap_or_default()
    }

    /// Global index of `layers[i]`.
    pub fn global_layer(&self, i: usize) -> usize {
        self.sharding
            .stage
            .as_ref()
            .map_or(i, |s| s.global_layer(i))
    }

    /// Whether running `chunk` ends in the head (a whole model, or the last chunk of the
    /// last pipeline rank).
    pub fn ends_in_head(&self, chunk: usize) -> bool {
        self.sharding
            .stage
            .as_ref()
            .is_none_or(|s| s.is_last() && chunk + 1 == s.chunks.len())
    }

    /// The first failure of a collective in this model's groups since the last check
    /// (a collective failing inside the backward pass cannot return it).
    pub fn check_collectives(&self) -> parallel::Result<()> {
        for group in [&self.sharding.tp, &self.sharding.ep].into_iter().flatten() {
            group.check()?;
        }
        Ok(())
    }
}

impl<B: ParallelBackend> CausalLm<B> {
    /// Logits `[b·s, vocab]` (under tensor parallelism, this rank's slice of the vocabulary
    /// starting at `sharding.vocab_start`).
    pub fn forward(&self, inputs: &Inputs<'_>, train: bool) -> Tensor<B, 2> {
        self.forward_stage(0, None, inputs, train)
    }

    /// One chunk of the forward pass this rank holds (see [`Stage`]; a whole model is one
    /// chunk): from the token ids (first virtual stage) or the previous one's hidden states
    /// `hidden: [local_rows(n), h]`, through the chunk's layers, to the hidden states for
    /// the next virtual stage or, on the last, the logits.
    pub fn forward_stage(
        &self,
        chunk: usize,
        hidden: Option<Tensor<B, 2>>,
        inputs: &Inputs<'_>,
        train: bool,
    ) -> Tensor<B, 2> {
        let ctx = self.context(inputs, train);
        let mut x = match hidden {
            Some(x) => x,
            None => self.embed(inputs.tokens, ctx.tp.as_ref()),
        };
        for i in self.chunk_layers(chunk) {
            x = self.layer_forward(i, x, &ctx, inputs);
        }
        if self.ends_in_head(chunk) && self.norm.is_some() {
            self.head(x, &ctx)
        } else {
            x
        }
    }

    /// What every layer of a pass over `inputs` shares: RoPE tables, the mask, the
    /// compute dtype and the parallel groups.
    pub fn context(&self, inputs: &Inputs<'_>, train: bool) -> ForwardContext<B> {
        let device = self.device();
        let (b, s) = (inputs.batch, inputs.seq);
        let c = &self.config;
        // Heads held here: all of them, or this rank's share under tensor parallelism.
        let heads = self
            .layers
            .first()
            .map_or((c.num_heads, c.num_kv_heads), |l| {
                (l.self_attn.num_heads, l.self_attn.num_kv_heads)
            });
        let dense = B::dense_tables();
        let rope = rope::Tables::new(&self.inv_freq, inputs.positions, heads, dense, &device);
        let mask = if dense {
            host_attention_mask::<B>(inputs, c.sliding_window, &device).repeat_dim(1, heads.0)
        } else {
            attention_mask::<B>(inputs, c.sliding_window, &device)
        };
        ForwardContext {
            batch: b,
            seq: s,
            rope,
            mask,
            train,
            compute: self.compute,
            tp: self.region(b * s),
            ep: self.sharding.ep.clone(),
        }
    }

    /// Indices into `layers` of `chunk` (see [`Stage`]; a whole model is one chunk).
    pub fn chunk_layers(&self, chunk: usize) -> Range<usize> {
        match &self.sharding.stage {
            Some(s) => s.local_layers(chunk),
            None => 0..self.layers.len(),
        }
    }

    /// `layers[i]` on the residual stream `x`. In training with a dropout seed, the
    /// backend is seeded from it and the layer first, so the layer draws the same dropout
    /// masks whenever it runs again on the same inputs (activation recomputation).
    pub fn layer_forward(
        &self,
        i: usize,
        x: Tensor<B, 2>,
        ctx: &ForwardContext<B>,
        inputs: &Inputs<'_>,
    ) -> Tensor<B, 2> {
        if let (true, Some(seed)) = (ctx.train, inputs.dropout_seed) {
            let layer = self.global_layer(i) as u64 + 1;
            B::seed(
                &self.device(),
                seed ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
        }
        self.layers[i].forward(x, ctx)
    }

    /// The final norm and the LM head on the residual stream `x`: logits `[n, vocab]` in
    /// the compute dtype (this rank's slice of the vocabulary under tensor parallelism).
    pub fn head(&self, x: Tensor<B, 2>, ctx: &ForwardContext<B>) -> Tensor<B, 2> {
        let norm = self
            .norm
            .as_ref()
            .expect("the last pipeline stage holds the final norm");
        let x = enter(norm.forward(x), ctx.tp.as_ref()).cast(ctx.compute);
        match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => head.forward(x, ctx.train),
            (None, Some(tied)) => x.matmul(tied.val().cast(ctx.compute).transpose()),
            (None, None) => unreachable!("a last stage holds its head or the tied embedding"),
        }
    }

    /// Sum of the token cross-entropies of a batch over the supervised positions, divided by
    /// `denominator` (see [`loss::cross_entropy`]); the vocabulary-parallel form when the
    /// head is split, which never gathers the whole vocabulary.
    pub fn loss(
        &self,
        inputs: &Inputs<'_>,
        targets: &[i64],
        denominator: f64,
        train: bool,
    ) -> Tensor<B, 1> {
        self.loss_of_logits(self.forward(inputs, train), targets, denominator)
    }

    /// [`CausalLm::loss`] from logits already computed, a chunk of rows at a time
    /// ([`loss::chunk_rows`]).
    pub fn loss_of_logits(
        &self,
        logits: Tensor<B, 2>,
        targets: &[i64],
        denominator: f64,
    ) -> Tensor<B, 1> {
        let rows = loss::chunk_rows(logits.dims()[1]);
        loss::chunked(logits, targets, rows, |z, t| {
            self.loss_rows(z, t, denominator)
        })
    }

    /// The loss of some rows of logits (all at once, widened to f32): the
    /// vocabulary-parallel form when the head is split.
    pub fn loss_rows(
        &self,
        logits: Tensor<B, 2>,
        targets: &[i64],
        denominator: f64,
    ) -> Tensor<B, 1> {
        match &self.sharding.tp {
            Some(g) => loss::vocab_parallel_cross_entropy(
                logits,
                targets,
                denominator,
                self.sharding.vocab_start,
                g,
            ),
            None => loss::cross_entropy(logits, targets, denominator),
        }
    }

    /// The tensor-parallel region of a pass over `n` tokens, if tensor parallel.
    fn region(&self, n: usize) -> Option<TpRegion> {
        let group = self.sharding.tp.clone()?;
        let rows = self.sequence_rows(n, group.size());
        Some(TpRegion { group, rows })
    }

    /// Rows of each tensor-parallel rank under sequence parallelism (`None`: every rank
    /// holds all `n`; also when there are fewer tokens than ranks).
    fn sequence_rows(&self, n: usize, tp: usize) -> Option<Vec<usize>> {
        (self.sharding.sequence_parallel && tp > 1 && n >= tp).then(|| split_rows(n, tp))
    }

    /// Rows of the hidden states this rank holds outside the tensor-parallel regions (and
    /// sends to the next pipeline stage) for `n` tokens: its chunk under sequence
    /// parallelism, else all of them.
    pub fn local_rows(&self, n: usize) -> usize {
        let Some(g) = &self.sharding.tp else { return n };
        self.sequence_rows(n, g.size())
            .map_or(n, |rows| rows[g.rank()])
    }

    /// Token embeddings `[n, h]` in f32 (this rank's rows under sequence parallelism).
    /// Vocabulary-parallel: each rank looks up the ids in its rows, zeros the others, and
    /// the group sums.
    pub fn embed(&self, tokens: &[u32], tp: Option<&TpRegion>) -> Tensor<B, 2> {
        let device = self.device();
        let n = tokens.len();
        let embed_tokens = self
            .embed_tokens
            .as_ref()
            .expect("the first pipeline stage holds the embedding");
        let Some(tp) = tp else {
            let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
            let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &device);
            return embed_tokens.val().select(0, ids).cast(FloatDType::F32);
        };
        let rows = embed_tokens.dims()[0];
        let start = self.sharding.vocab_start;
        let local = |t: u32| (t as usize).checked_sub(start).filter(|&i| i < rows);
        let ids: Vec<i64> = tokens
            .iter()
            .map(|&t| local(t).map_or(0, |i| i as i64))
            .collect();
        let keep: Vec<f32> = tokens
            .iter()
            .map(|&t| if local(t).is_some() { 1.0 } else { 0.0 })
            .collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [n, 1]), &device);
        tp.leave(embed_tokens.val().select(0, ids).cast(FloatDType::F32) * keep)
    }
}

/// Causal, per-sample (packing) and optional sliding-window mask, `[b, 1, s, s]` (0 where
/// attention is allowed, -inf elsewhere), made on the device from the `b·s` sample ids: only
/// those are uploaded, and every head shares the one mask by broadcasting.
fn attention_mask<B: Backend>(
    inputs: &Inputs<'_>,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let (b, s) = (inputs.batch, inputs.seq);
    // Sample ids go to the device as i32 (padding's u32::MAX wraps to -1: ids only need to
    // stay distinct).
    let segments: Vec<i32> = inputs.segments.iter().map(|&x| x as i32).collect();
    let seg = Tensor::<B, 2, Int>::from_data(TensorData::new(segments, [b, s]), device);
    let same_sample = seg
        .clone()
        .reshape([b, s, 1])
        .expand([b, s, s])
        .equal(seg.reshape([b, 1, s]).expand([b, s, s]));
    let at = Tensor::<B, 1, Int>::arange(0..s as i64, device);
    let (i, j) = (
        at.clone().reshape([s, 1]).expand([s, s]),
        at.reshape([1, s]).expand([s, s]),
    );
    // Key j is visible from query i when j ≤ i (and i - j < window).
    let mut visible = i.clone().greater_equal(j.clone());
    if let Some(w) = window {
        visible = visible.bool_and((i - j).lower_elem(w as i64));
    }
    let allowed = same_sample.bool_and(visible.reshape([1, s, s]).expand([b, s, s]));
    Tensor::<B, 3>::zeros([b, s, s], device)
        .cast(FloatDType::F32)
        .mask_fill(allowed.bool_not(), f32::NEG_INFINITY)
        .reshape([b, 1, s, s])
}

/// [`attention_mask`] made on the host (for the CPU backend, where that is no upload and
/// fewer ops).
fn host_attention_mask<B: Backend>(
    inputs: &Inputs<'_>,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let (b, s) = (inputs.batch, inputs.seq);
    let mut mask = vec![f32::NEG_INFINITY; b * s * s];
    for row in 0..b {
        let seg = &inputs.segments[row * s..(row + 1) * s];
        for i in 0..s {
            for j in 0..=i {
                let in_window = window.is_none_or(|w| i - j < w);
                if seg[i] == seg[j] && in_window {
                    mask[(row * s + i) * s + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(mask, [b, 1, s, s]), device)
}

/// Set the capacity factor of every sparse layer of `model` (see [`Moe::capacity_factor`]).
pub fn set_capacity_factor<B: Backend>(model: &mut CausalLm<B>, factor: Option<f64>) {
    for layer in &mut model.layers {
        if let FeedForward::Sparse(moe) = &mut layer.ffn {
            moe.capacity_factor = factor;
        }
    }
}
