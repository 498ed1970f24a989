//! What the cost model knows of a job: the model's dimensions, how it is trained (full
//! or LoRA, in which precision) and the parameters one rank of a layout holds.

use serde::{Deserialize, Serialize};

/// A decoder-only transformer's dimensions: all the cost model knows of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// MLP width (each expert's, for a mixture of experts).
    pub ffn: usize,
    pub vocab: usize,
    /// Experts per MoE layer; 0 for a dense model.
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// SwiGLU (gate, up, down) rather than a plain two-matrix MLP.
    pub gated_mlp: bool,
    /// The LM head is the embedding matrix.
    pub tied_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// LayerNorm with a bias (GPT) rather than RMSNorm.
    pub norm_bias: bool,
    /// Dropout after attention and MLP (GPT-era models): its masks cost activation memory.
    pub dropout: bool,
}

/// Which projections carry LoRA adapters (experts' w1/w3/w2 are gate/up/down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraTargets {
    pub q: bool,
    pub k: bool,
    pub v: bool,
    pub o: bool,
    pub gate: bool,
    pub up: bool,
    pub down: bool,
    pub head: bool,
}

impl LoraTargets {
    /// Every projection, the head included.
    pub fn all() -> Self {
        Self {
            q: true,
            k: true,
            v: true,
            o: true,
            gate: true,
            up: true,
            down: true,
            head: true,
        }
    }
}

/// Full-parameter fine-tuning or LoRA (base frozen, only the adapters train).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Full,
    Lora { rank: usize, targets: LoraTargets },
}

/// Bytes per element of what training keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32 (what tidemill trains in today): weights, gradients, AdamW's two
    /// moments and activations.
    F32,
    /// Megatron's mixed precision: bf16 weights and activations, f32 gradients, f32 master
    /// weights and AdamW moments (18 bytes per trained parameter).
    Bf16Mixed,
}

impl Precision {
    pub fn weight_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16Mixed => 2,
        }
    }
    pub fn grad_bytes(self) -> u64 {
        4
    }
    /// Optimizer-owned bytes per trained parameter: AdamW's two f32 moments, plus an f32
    /// master copy when the weights themselves are bf16.
    pub fn optimizer_bytes(self) -> u64 {
        match self {
            Self::F32 => 8,
            Self::Bf16Mixed => 12,
        }
    }
    pub fn activation_bytes(self) -> u64 {
        self.weight_bytes()
    }
    /// Whether matmuls run at the bf16 rate (else at the f32/TF32 rate).
    pub fn bf16(self) -> bool {
        matches!(self, Self::Bf16Mixed)
    }
}

/// What one rank of a layout holds: its tensor- and expert-parallel degree, the layers of
/// its pipeline rank (all its virtual stages together), and whether it holds the embedding
/// (first pipeline rank) and the final norm and head (last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub tp: usize,
    pub ep: usize,
    pub layers: usize,
    pub first: bool,
    pub last: bool,
}

/// Parameter elements one rank holds: all of them, those it trains, and of those the
/// experts' (reduced over data-parallel ranks only, not over expert-parallel ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub weights: u64,
    pub trainable: u64,
    pub expert_trainable: u64,
}

impl std::ops::AddAssign for Params {
    fn add_assign(&mut self, o: Self) {
        self.weights += o.weights;
        self.trainable += o.trainable;
        self.expert_trainable += o.expert_trainable;
    }
}

/// One parameter tensor a rank holds: its elements, whether it is trained, whether it is
/// an expert's (reduced over dp only).
#[derive(Clone, Copy, Debug)]
struct Tensor {
    elems: u64,
    trained: bool,
    expert: bool,
}

/// A rank's parameter tensors in the order the trainer sorts their module paths, in three
/// runs: before the layers (the embedding), one layer's (every layer holds the same, so
/// their order does not matter), and after them (the head, the final norm).
struct Tensors {
    before: Vec<Tensor>,
    layer: Vec<Tensor>,
    after: Vec<Tensor>,
}

impl ModelShape {
    /// Megatron's GPT: LayerNorm, biases everywhere, a GeLU MLP of 4 × hidden, the head tied
    /// to the embedding, dropout.
    pub fn gpt(layers: usize, hidden: usize, heads: usize, vocab: usize) -> Self {
        Self {
            layers,
            hidden,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            ffn: 4 * hidden,
            vocab,
            experts: 0,
            top_k: 0,
            gated_mlp: false,
            tied_embeddings: true,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            norm_bias: true,
            dropout: true,
        }
    }

    /// Key/value heads one tensor-parallel rank holds (one, in copies, when tp exceeds them).
    pub fn kv_heads_per_rank(&self, tp: usize) -> usize {
        (self.kv_heads / tp).max(1)
    }

    /// Parameters per layer as [`layer_costs`] weighs them: attention projections and the
    /// experts a token visits (or the MLP), plus the router.
    fn layer_cost(&self) -> f64 {
        let (h, d) = (self.hidden as f64, self.head_dim as f64);
        let attn = h * d * (2 * self.heads + 2 * self.kv_heads) as f64;
        let mlp = if self.gated_mlp { 3.0 } else { 2.0 } * h * self.ffn as f64;
        attn + match self.experts {
            0 => mlp,
            e => h * e as f64 + self.top_k as f64 * mlp,
        }
    }

    /// Relative compute of each layer, the head counted with the last: what pipeline
    /// stages are balanced by.
    pub fn layer_costs(&self) -> Vec<f64> {
        let mut costs = vec![self.layer_cost(); self.layers];
        if let Some(last) = costs.last_mut() {
            *last += self.hidden as f64 * self.vocab as f64;
        }
        costs
    }

    /// The tensors a rank holds, exactly as the trainer builds its shard ([`Tensors`]):
    /// column-parallel projections (q, k, v, gate, up, the head and the embedding's
    /// vocabulary) and their biases cut over tp, row-parallel ones (o, down) cut on their
    /// input with the bias whole, norms and the router whole; k/v whole heads in copies
    /// when tp exceeds them; experts/ep experts each; a tied head on a last stage that is
    /// not the first holds its copy of the embedding. LoRA trains only the adapters: A of a
    /// column projection whole and B cut, the other way round for a row projection.
    ///
    /// Path order: `embed_tokens`, then each layer's `ffn` (the experts, then an MoE
    /// router; a dense MLP's down, gate, up), its two norms and `self_attn`'s k, o, q, v,
    /// then `lm_head` and `norm`; within a linear `bias`, `lora.a`, `lora.b`, `weight`.
    fn tensors(&self, mode: &Mode, s: &Share) -> Tensors {
        let tp = s.tp as u64;
        let (h, v, f) = (self.hidden as u64, self.vocab as u64, self.ffn as u64);
        let d = self.head_dim as u64;
        let q = self.heads as u64 * d;
        let kv = self.kv_heads_per_rank(s.tp) as u64 * d;
        let (lora, targets) = match *mode {
            Mode::Full => (None, LoraTargets::default()),
            Mode::Lora { rank, targets } => (Some(rank as u64), targets),
        };
        let full = lora.is_none();
        // A tensor trained only in full fine-tuning.
        let base = |elems: u64, expert: bool| Tensor {
            elems,
            trained: full,
            expert,
        };
        let linear = |out: &mut Vec<Tensor>,
                      input: u64,
                      output: u64,
                      column: bool,
                      target: bool,
                      bias: bool,
                      expert: bool| {
            let (in_here, out_here) = if column {
                (input, output / tp)
            } else {
                (input / tp, output)
            };
            if bias {
                out.push(base(if column { out_here } else { output }, expert));
            }
            if let (Some(r), true) = (lora, target) {
                for elems in [r * in_here, out_here * r] {
                    out.push(Tensor {
                        elems,
                        trained: true,
                        expert,
                    });
                }
            }
            out.push(base(in_here * out_here, expert));
        };
        let norm = |out: &mut Vec<Tensor>| {
            if self.norm_bias {
                out.push(base(h, false));
            }
            out.push(base(h, false));
        };
        let mlp = |out: &mut Vec<Tensor>, expert: bool| {
            linear(out, f, h, false, targets.down, self.mlp_bias, expert);
            linear(out, h, f, true, targets.gate, self.mlp_bias, expert);
            if self.gated_mlp {
                linear(out, h, f, true, targets.up, self.mlp_bias, expert);
            }
        };
        let mut before = Vec::new();
        if s.first || (s.last && self.tied_embeddings) {
            before.push(base(v / tp * h, false));
        }
        let mut layer = Vec::new();
        if self.experts == 0 {
            mlp(&mut layer, false);
        } else {
            for _ in 0..self.experts / s.ep {
                mlp(&mut layer, true);
            }
            layer.push(base(h * self.experts as u64, false));
        }
        norm(&mut layer);
        norm(&mut layer);
        // k and v: whole heads per rank (`kv × tp` columns cut tp ways).
        linear(
            &mut layer,
            h,
            kv * tp,
            true,
            targets.k,
            self.qkv_bias,
            false,
        );
        linear(&mut layer, q, h, false, targets.o, self.o_bias, false);
        linear(&mut layer, h, q, true, targets.q, self.qkv_bias, false);
        linear(
            &mut layer,
            h,
            kv * tp,
            true,
            targets.v,
            self.qkv_bias,
            false,
        );
        let mut after = Vec::new();
        if s.last {
            if !self.tied_embeddings {
                linear(&mut after, h, v, true, targets.head, false, false);
            }
            norm(&mut after);
        }
        Tensors {
            before,
            layer,
            after,
        }
    }

    /// Parameter elements a rank holds and trains ([`Self::tensors`]).
    pub fn params(&self, mode: &Mode, s: &Share) -> Params {
        let t = self.tensors(mode, s);
        let sum = |run: &[Tensor]| {
            let mut p = Params::default();
            for x in run {
                p.weights += x.elems;
                if x.trained {
                    p.trainable += x.elems;
                    if x.expert {
                        p.expert_trainable += x.elems;
                    }
                }
            }
            p
        };
        let (layer, l) = (sum(&t.layer), s.layers as u64);
        let mut p = sum(&t.before);
        p += Params {
            weights: l * layer.weights,
            trainable: l * layer.trainable,
            expert_trainable: l * layer.expert_trainable,
        };
        p += sum(&t.after);
        p
    }

    /// The tensors a rank trains, as `(dense, experts)` element counts, each in the order
    /// the trainer sorts their module paths ([`Self::tensors`]): ZeRO-1 cuts its runs in
    /// that order, the dense ones over dp × ep and the experts' over dp.
    pub fn trained_tensors(&self, mode: &Mode, s: &Share) -> (Vec<u64>, Vec<u64>) {
        let t = self.tensors(mode, s);
        let (mut dense, mut experts) = (Vec::new(), Vec::new());
        let layers = std::iter::repeat_n(&t.layer, s.layers).flatten();
        for x in t.before.iter().chain(layers).chain(&t.after) {
            if x.trained {
                if x.expert { &mut experts } else { &mut dense }.push(x.elems);
            }
        }
        (dense, experts)
    }
}
