//! The cost of one candidate: FLOPs, memory of the fullest device and step time.
//!
//! Per layer and micro-batch of `b × s` tokens, on one device: matmul FLOPs (projections,
//! the s² attention terms, MLP or the top-k experts, the head), element-wise traffic
//! (norms, residuals, activation functions, softmax, dropout) at memory bandwidth, kernel
//! launches, and the tensor-parallel all-reduces (two per layer and pass) and
//! expert-parallel all-to-alls (two per MoE layer and pass) that block compute. Backward
//! is twice the forward (once, for the frozen base of LoRA, plus the adapters); full
//! activation recomputation repeats the forward before it. The pipeline runs
//! `m + (pp − 1)/v` micro-batches' time of its slowest rank (1F1B, interleaved over `v`
//! virtual stages); the data-parallel gradient all-reduce overlaps the last micro-batch's
//! backward; the optimizer step streams weights, gradients and moments once.
//! Activation memory follows Korthikanti et al. (2022), with the in-flight micro-batches
//! of 1F1B (pp − rank) and of the interleaved schedule (Megatron's warm-up).

use serde::{Deserialize, Serialize};

use super::hardware::Hardware;
use super::shape::{Mode, ModelShape, Precision, Share};

/// At most this many logits are widened to f32 at once by the loss (256 MiB): the
/// trainer's chunk (`trainer::loss::CHUNK_ELEMS` is this constant) and what the memory
/// model counts.
pub const LOSS_CHUNK_ELEMS: usize = 1 << 26;

/// What is trained: the model, the batch and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub model: ModelShape,
    pub seq_len: usize,
    /// Sequences per optimizer step.
    pub global_batch: usize,
    pub mode: Mode,
    pub precision: Precision,
    /// Megatron's sequence parallelism with tp > 1 (norms and residuals on 1/tp of the
    /// tokens; same communication volume).
    pub sequence_parallel: bool,
    /// Each tensor-parallel rank sends only its 1/tp of the activation to the next
    /// pipeline stage (Megatron's scatter-gather; tidemill does so under sequence
    /// parallelism, otherwise every rank sends the whole activation).
    pub scatter_gather_sends: bool,
}

impl Job {
    /// Dimensions the cost model can work with: each at least 1, whole heads per key/value
    /// head, 1 ≤ top-k ≤ experts, and a model small enough (10¹⁵ parameters) that counts
    /// stay exact.
    pub fn validate(&self) -> Result<(), String> {
        let m = &self.model;
        for (key, v) in [
            ("layers", m.layers),
            ("hidden", m.hidden),
            ("heads", m.heads),
            ("kv_heads", m.kv_heads),
            ("head_dim", m.head_dim),
            ("ffn", m.ffn),
            ("vocab", m.vocab),
            ("seq_len", self.seq_len),
            ("global_batch", self.global_batch),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if !m.heads.is_multiple_of(m.kv_heads) {
            return Err(format!(
                "kv_heads: {} must divide the attention heads ({})",
                m.kv_heads, m.heads
            ));
        }
        if m.experts > 0 && !(1..=m.experts).contains(&m.top_k) {
            return Err(format!(
                "top_k: {} must be 1 to the experts ({})",
                m.top_k, m.experts
            ));
        }
        let (h, f, v) = (m.hidden as f64, m.ffn as f64, m.vocab as f64);
        let per_layer =
            4.0 * h * (m.heads * m.head_dim) as f64 + 3.0 * h * f * m.experts.max(1) as f64;
        let params = m.layers as f64 * per_layer + 2.0 * h * v;
        if params > 1e15 || self.seq_len > 1 << 24 || self.global_batch > 1 << 32 {
            return Err(format!(
                "a model of {params:.3e} parameters, sequences of {} and batches of {} are beyond \
                 what the model plans for (10¹⁵, 2²⁴, 2³²)",
                self.seq_len, self.global_batch
            ));
        }
        Ok(())
    }
}

/// One point of the search space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
    pub micro_batch: usize,
    pub recompute: bool,
    pub zero1: bool,
    /// Chunks of layers per pipeline rank; 1 is plain 1F1B, more is interleaved.
    pub virtual_stages: usize,
}

impl Candidate {
    pub fn world(&self) -> usize {
        self.dp * self.tp * self.pp * self.ep
    }
    /// Ranks that each take their own share of the batch.
    pub fn data_ranks(&self) -> usize {
        self.dp * self.ep
    }
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dp={} tp={} pp={} ep={} mb={} v={}{}{}",
            self.dp,
            self.tp,
            self.pp,
            self.ep,
            self.micro_batch,
            self.virtual_stages,
            if self.recompute { " recompute" } else { "" },
            if self.zero1 { " zero1" } else { "" }
        )
    }
}

/// Bytes on the fullest device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    pub weights: f64,
    pub grads: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub reserved: f64,
}

impl Memory {
    pub fn total(&self) -> f64 {
        self.weights + self.grads + self.optimizer + self.activations + self.reserved
    }
}

/// A candidate's predicted cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub step_time_s: f64,
    /// Of the step: pipeline compute of the slowest rank (all micro-batches), of which the
    /// blocking tensor-parallel, expert-parallel and pipeline transfers, and the bubble.
    pub pipeline_s: f64,
    pub tp_comm_s: f64,
    pub ep_comm_s: f64,
    pub pp_comm_s: f64,
    pub bubble_s: f64,
    /// Data-parallel reduction left after overlapping the last backward.
    pub dp_comm_s: f64,
    pub optimizer_s: f64,
    /// FLOPs of the step over all devices, recomputation included / excluded.
    pub flops: f64,
    pub model_flops: f64,
    pub tflops_per_gpu: f64,
    /// Model FLOPs per second over the devices' bf16 (or f32) peak.
    pub mfu: f64,
    pub memory: Memory,
}

/// Seconds and bytes of one pass over one layer for one micro-batch on one device.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    compute_s: f64,
    tp_s: f64,
    ep_s: f64,
}

impl Pass {
    fn total(&self) -> f64 {
        self.compute_s + self.tp_s + self.ep_s
    }
    fn scaled(self, k: f64) -> Self {
        Self {
            compute_s: self.compute_s * k,
            tp_s: self.tp_s * k,
            ep_s: self.ep_s * k,
        }
    }
    fn add(&mut self, o: Self) {
        self.compute_s += o.compute_s;
        self.tp_s += o.tp_s;
        self.ep_s += o.ep_s;
    }
}

/// The per-micro-batch quantities of the model at a candidate's tp/ep/micro-batch.
struct Costs<'a> {
    job: &'a Job,
    hw: &'a Hardware,
    c: Candidate,
    tokens: f64,
    rate: f64,
    bytes_per_s: f64,
    e: f64,
}

impl<'a> Costs<'a> {
    fn new(job: &'a Job, hw: &'a Hardware, c: Candidate) -> Self {
        let peak = if job.precision.bf16() {
            hw.peak_tflops
        } else {
            hw.peak_tflops_f32
        };
        Self {
            job,
            hw,
            c,
            tokens: c.micro_batch as f64 * job.seq_len as f64,
            rate: peak * 1e12 * hw.achievable_fraction,
            bytes_per_s: hw.memory_bandwidth_gbs * 1e9,
            e: job.precision.activation_bytes() as f64,
        }
    }

    fn sp_div(&self) -> f64 {
        if self.job.sequence_parallel && self.c.tp > 1 {
            self.c.tp as f64
        } else {
            1.0
        }
    }

    /// Ring all-reduce of `bytes` over the tensor-parallel group.
    fn tp_all_reduce(&self, bytes: f64) -> f64 {
        let t = self.c.tp;
        if t == 1 {
            return 0.0;
        }
        let bw = self.hw.group_bandwidth(t, 1);
        2.0 * (t - 1) as f64 / t as f64 * bytes / bw + self.hw.latency_us * 1e-6
    }

    /// Matmul FLOPs of one layer's forward on one device, split into weight matmuls (whose
    /// backward needs weight gradients) and the s² attention terms.
    fn layer_flops(&self, tp: usize) -> (f64, f64) {
        let m = &self.job.model;
        let (t, h, f) = (self.tokens, m.hidden as f64, m.ffn as f64);
        let tpf = tp as f64;
        let q = (m.heads * m.head_dim) as f64;
        let kv = (m.kv_heads_per_rank(tp) * m.head_dim) as f64;
        let mlp_mats = if m.gated_mlp { 3.0 } else { 2.0 };
        let mlp = mlp_mats * h * f / tpf;
        let ffn = match m.experts {
            0 => mlp,
            e => h * e as f64 + m.top_k as f64 * mlp,
        };
        let weights = 2.0 * t * (2.0 * h * q / tpf + 2.0 * h * kv + ffn);
        let scores = 4.0 * t * self.job.seq_len as f64 * q / tpf;
        (weights, scores)
    }

    /// Element-wise bytes moved by one layer's forward on one device.
    fn layer_traffic(&self) -> f64 {
        let m = &self.job.model;
        let (t, h, f) = (self.tokens, m.hidden as f64, m.ffn as f64);
        let tp = self.c.tp as f64;
        let drop = if m.dropout { 1.0 } else { 0.0 };
        let q = (m.heads * m.head_dim) as f64 / tp;
        let kv = (m.kv_heads_per_rank(self.c.tp) * m.head_dim) as f64;
        // Norms (read, write), residual adds (two reads, a write), dropout.
        let replicated = (4.0 + 6.0 + 6.0 * drop) * t * h / self.sp_div();
        let k = if m.experts == 0 { 1.0 } else { m.top_k as f64 };
        let act = if m.gated_mlp { 4.0 } else { 3.0 } * t * f / tp * k;
        let rotary = 4.0 * (q + kv) * t;
        let routing = if m.experts == 0 { 0.0 } else { 4.0 * t * k * h };
        let probs = self.tokens * self.job.seq_len as f64 * (m.heads as f64 / tp);
        let softmax = (2.0 + 3.0 * drop) * probs;
        (replicated + act + rotary + routing + softmax) * self.e
    }

    /// One layer's forward for one micro-batch on one device.
    fn layer_forward(&self) -> Pass {
        let m = &self.job.model;
        let (weights, scores) = self.layer_flops(self.c.tp);
        let kernels = if m.experts == 0 {
            16.0
        } else {
            12.0 + 4.0 * (m.experts / self.c.ep) as f64
        };
        let compute_s = (weights + scores) / self.rate
            + self.layer_traffic() / self.bytes_per_s
            + kernels * self.hw.kernel_overhead_us * 1e-6;
        let activation = self.tokens * m.hidden as f64 * self.e;
        let tp_s = 2.0 * self.tp_all_reduce(activation);
        let ep_s = if m.experts > 0 && self.c.ep > 1 {
            let n = self.c.ep;
            let bw = self.hw.group_bandwidth(n, self.c.tp);
            let bytes = activation * m.top_k as f64 * (n - 1) as f64 / n as f64;
            2.0 * (bytes / bw + self.hw.latency_us * 1e-6)
        } else {
            0.0
        };
        Pass {
            compute_s,
            tp_s,
            ep_s,
        }
    }

    /// Whether backward computes the base weights' gradients (not under LoRA).
    fn full(&self) -> bool {
        matches!(self.job.mode, Mode::Full)
    }

    /// Forward, backward and (with recomputation) the repeated forward of one layer.
    fn layer_step(&self) -> Pass {
        let fwd = self.layer_forward();
        let (weights, scores) = self.layer_flops(self.c.tp);
        let grad_factor = if self.full() { 2.0 } else { 1.0 };
        let bwd_flops = weights * grad_factor + 2.0 * scores;
        let bwd_extra = (bwd_flops - 2.0 * (weights + scores)) / self.rate;
        // Backward: twice the forward's compute, the same collectives (Megatron's f/g
        // operators swap all-reduce and identity).
        let mut all = fwd;
        all.add(Pass {
            compute_s: 2.0 * fwd.compute_s + bwd_extra,
            ..fwd
        });
        if self.c.recompute {
            all.add(fwd);
        }
        all
    }

    /// The head on the last pipeline rank: final norm, logits and the loss, per micro-batch.
    fn head_step(&self) -> Pass {
        let m = &self.job.model;
        let (t, h, v) = (self.tokens, m.hidden as f64, m.vocab as f64);
        let tp = self.c.tp as f64;
        let fwd = 2.0 * t * h * v / tp;
        let passes = if self.full() { 3.0 } else { 2.0 };
        let traffic = 24.0 * t * v / tp + 4.0 * t * h * self.e;
        Pass {
            compute_s: fwd * passes / self.rate + 2.0 * traffic / self.bytes_per_s,
            // The gradient of the head's input sums over the vocabulary's ranks.
            tp_s: self.tp_all_reduce(t * h * self.e),
            ..Pass::default()
        }
    }

    /// The embedding lookup on the first pipeline rank (vocabulary-parallel: an
    /// all-reduce in the forward, none in the backward).
    fn embed_step(&self) -> Pass {
        let bytes = self.tokens * self.job.model.hidden as f64 * self.e;
        Pass {
            compute_s: 4.0 * bytes / self.bytes_per_s,
            tp_s: self.tp_all_reduce(bytes),
            ..Pass::default()
        }
    }

    /// Activation bytes one layer keeps for one micro-batch until its backward.
    fn layer_activations(&self) -> f64 {
        let m = &self.job.model;
        let (t, h, f) = (self.tokens, m.hidden as f64, m.ffn as f64);
        let tp = self.c.tp as f64;
        let (e, sp) = (self.e, self.sp_div());
        if self.c.recompute {
            return e * t * h / sp;
        }
        let drop = if m.dropout { 1.0 } else { 0.0 };
        let q = (m.heads * m.head_dim) as f64 / tp;
        let kv = (m.kv_heads_per_rank(self.c.tp) * m.head_dim) as f64;
        let probs = self.tokens * self.job.seq_len as f64 * (m.heads as f64 / tp);
        // Inputs of the two norms, of QKV and of the MLP; dropout masks (a byte each).
        let replicated = (4.0 * e * t * h + 2.0 * drop * t * h) / sp;
        let attention = e * t * (2.0 * q + 2.0 * kv) + e * probs * (1.0 + drop) + drop * probs;
        let k = if m.experts == 0 { 1.0 } else { m.top_k as f64 };
        let mlp = if m.gated_mlp { 4.0 } else { 2.0 } * e * t * f / tp * k;
        let router = if m.experts == 0 {
            0.0
        } else {
            4.0 * t * m.experts as f64 + e * t * k * h
        };
        replicated + attention + mlp + router
    }
}

/// Layers of each virtual stage along the pipeline (`stages` of them), balanced by
/// `costs`: contiguous, at least one each, the costliest stage as cheap as possible.
pub fn balance(costs: &[f64], stages: usize) -> Vec<usize> {
    let n = costs.len();
    if stages == 0 || stages > n {
        return Vec::new();
    }
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    // best[k][i]: the lowest possible maximum over the first i layers in k stages.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for k in 1..=stages {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[i] - prefix[j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut sizes = vec![0; stages];
    let mut i = n;
    for k in (1..=stages).rev() {
        let j = cut[k][i];
        sizes[k - 1] = i - j;
        i = j;
    }
    sizes
}

/// Layers each pipeline rank holds, from the layers of each virtual stage along the
/// pipeline (rank r runs virtual stages r, r + pp, …).
pub fn rank_layers(sizes: &[usize], pp: usize) -> Vec<usize> {
    let mut out = vec![0; pp];
    for (i, s) in sizes.iter().enumerate() {
        out[i % pp] += s;
    }
    out
}

/// The predicted cost of `c` for `job` on `hw`, with `sizes` layers per virtual stage
/// along the pipeline (`pp × virtual_stages` of them).
pub fn estimate(job: &Job, hw: &Hardware, c: Candidate, sizes: &[usize]) -> Estimate {
    let k = Costs::new(job, hw, c);
    let m = &job.model;
    let p = job.precision;
    let micro = job.global_batch / (c.micro_batch * c.data_ranks()).max(1);
    let layer = k.layer_step();
    let layers = rank_layers(sizes, c.pp);
    let v = c.virtual_stages.max(1);
    let p2p = if c.pp > 1 {
        let whole = k.tokens * m.hidden as f64 * k.e;
        let bytes = if job.scatter_gather_sends {
            whole / c.tp as f64
        } else {
            whole
        };
        // NVLink when the whole pipeline sits in one node; otherwise stages meet across
        // nodes, and every device sends at once: each gets its share of the node's NICs.
        let g = hw.gpus_per_node;
        let span = c.pp * c.tp * c.ep * c.dp;
        let bw = if span <= g && g.is_multiple_of(span) {
            hw.intra_node_gbs * 1e9
        } else {
            hw.inter_node_gbs * 1e9 / g as f64
        };
        2.0 * v as f64 * (bytes / bw + hw.latency_us * 1e-6)
    } else {
        0.0
    };
    let mut slowest = Pass::default();
    let mut slowest_total = 0.0;
    let mut memory = Memory::default();
    for (r, &l) in layers.iter().enumerate() {
        let (first, last) = (r == 0, r + 1 == c.pp);
        let mut t = layer.scaled(l as f64);
        if first {
            t.add(k.embed_step());
        }
        if last {
            t.add(k.head_step());
        }
        let total = t.total() + p2p;
        if total > slowest_total {
            slowest_total = total;
            slowest = t;
        }
        let share = Share {
            tp: c.tp,
            ep: c.ep,
            layers: l,
            first,
            last,
        };
        let mem = rank_memory(&k, share, r, micro);
        if mem.total() > memory.total() {
            memory = mem;
        }
    }
    let micro_f = micro as f64;
    let pipeline_s = (micro_f + (c.pp - 1) as f64 / v as f64) * slowest_total;
    let bubble_s = (c.pp - 1) as f64 / v as f64 * slowest_total;
    let steps = micro_f + (c.pp - 1) as f64 / v as f64;
    // The data-parallel reduction of each pipeline rank's gradients (under ZeRO-1, padded
    // to its fullest share): the step waits for the slowest.
    let owned: Vec<Owned> = (0..c.pp)
        .map(|r| {
            let share = Share {
                tp: c.tp,
                ep: c.ep,
                layers: layers[r],
                first: r == 0,
                last: r + 1 == c.pp,
            };
            Owned::of(job, c, share)
        })
        .collect();
    let (reduce_s, gather_s) = owned
        .iter()
        .map(|o| dp_reduce(hw, c, p, o))
        .fold((0.0f64, 0.0f64), |(r, g), (x, y)| (r.max(x), g.max(y)));
    // Gradients stream out during the last micro-batch's backward (twice its forward);
    // ZeRO-1's all-gather of the stepped weights comes after the optimizer.
    let deepest = layers.iter().copied().max().unwrap_or(0) as f64;
    let last_backward = k.layer_forward().compute_s * 2.0 * deepest;
    let dp_comm_s = (reduce_s - last_backward).max(0.0) + gather_s;
    let fullest = owned.iter().map(Owned::fullest).max().unwrap_or(0);
    let optimizer_s = fullest as f64
        * (2 * p.weight_bytes() + p.grad_bytes() + 2 * p.optimizer_bytes()) as f64
        / k.bytes_per_s;
    let step_time_s = pipeline_s + dp_comm_s + optimizer_s;
    let (flops, model_flops) = step_flops(job, c);
    let world = c.world() as f64;
    let peak = if p.bf16() {
        hw.peak_tflops
    } else {
        hw.peak_tflops_f32
    };
    Estimate {
        step_time_s,
        pipeline_s,
        tp_comm_s: slowest.tp_s * steps,
        ep_comm_s: slowest.ep_s * steps,
        pp_comm_s: p2p * steps,
        bubble_s,
        dp_comm_s,
        optimizer_s,
        flops,
        model_flops,
        tflops_per_gpu: flops / step_time_s / world / 1e12,
        mfu: model_flops / step_time_s / world / (peak * 1e12),
        memory,
    }
}

/// Elements of optimizer state the fullest rank holding `share` keeps: its trained
/// parameters, or under ZeRO-1 what it owns of them ([`Owned`]).
pub fn owned_state(job: &Job, c: Candidate, share: Share) -> f64 {
    Owned::of(job, c, share).fullest() as f64
}

/// The trained elements each rank holding one share owns: all of them, or under ZeRO-1
/// the trainer's own split ([`crate::dp::owners`]) of the tensors in module-path order
/// ([`super::ModelShape::trained_tensors`]), the dense ones over dp × ep, the experts'
/// over dp. The split hands out whole tensors, so one larger than an even share
/// (Llama-3.2-1B's tied embedding, a fifth of the model) leaves its owner above the rest.
#[derive(Clone, Debug, Default)]
struct Owned {
    /// Per rank of the data group (dp × ep; index `ep + ep_size × dp`).
    dense: Vec<u64>,
    /// Per dp rank.
    experts: Vec<u64>,
    ep: usize,
}

impl Owned {
    fn of(job: &Job, c: Candidate, share: Share) -> Self {
        let (dense, experts) = job.model.trained_tensors(&job.mode, &share);
        let (dn, en) = if c.zero1 {
            (c.data_ranks(), c.dp)
        } else {
            (1, 1)
        };
        let split = |sizes: &[u64], parts: usize| {
            let mut out = vec![0; parts];
            for (n, o) in sizes.iter().zip(crate::dp::owners(sizes, parts)) {
                out[o] += n;
            }
            out
        };
        Self {
            dense: split(&dense, dn),
            experts: split(&experts, en),
            ep: if c.zero1 { c.ep } else { 1 },
        }
    }

    /// What the fullest rank owns, dense and experts together.
    fn fullest(&self) -> u64 {
        (0..self.dense.len())
            .map(|k| self.dense[k] + self.experts.get(k / self.ep.max(1)).copied().unwrap_or(0))
            .max()
            .unwrap_or(0)
    }
}

/// Seconds of the data-parallel gradient reduction and of ZeRO-1's all-gather of the
/// stepped weights after it (0 without ZeRO-1, whose all-reduce does both halves at once).
fn dp_reduce(hw: &Hardware, c: Candidate, p: Precision, owned: &Owned) -> (f64, f64) {
    let ring = |bytes: f64, size: usize, stride: usize| {
        if size == 1 {
            return 0.0;
        }
        let n = size as f64;
        (n - 1.0) / n * bytes / hw.group_bandwidth(size, stride) + hw.latency_us * 1e-6
    };
    let (g, w) = (p.grad_bytes() as f64, p.weight_bytes() as f64);
    let (dn, en) = (c.data_ranks(), c.dp);
    let most = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
    if c.zero1 {
        // A reduce-scatter of the gradients, then an all-gather of the stepped weights:
        // every rank's chunk as long as the fullest rank's run (NCCL wants equal chunks,
        // and a ring step waits for its longest one).
        let phase = |b: f64| {
            ring(most(&owned.dense) * dn as f64 * b, dn, c.tp)
                + ring(most(&owned.experts) * en as f64 * b, en, c.tp * c.ep)
        };
        (phase(g), phase(w))
    } else {
        // An all-reduce: a reduce-scatter and an all-gather in one, both of gradients.
        let (dense, experts) = (most(&owned.dense), most(&owned.experts));
        let phase = |b: f64| ring(dense * b, dn, c.tp) + ring(experts * b, en, c.tp * c.ep);
        (phase(2.0 * g), 0.0)
    }
}

/// Bytes of weights, gradients and optimizer state a rank of `c` holding `share` keeps
/// (no activations): its parameters at the precision's widths, gradients of those it
/// trains, and AdamW's state (with master weights in mixed precision) of its trained
/// parameters, or under ZeRO-1 of what the fullest rank owns of them ([`owned_state`]).
pub fn state_memory(job: &Job, c: Candidate, share: Share) -> Memory {
    let p = job.precision;
    let held = job.model.params(&job.mode, &share);
    Memory {
        weights: held.weights as f64 * p.weight_bytes() as f64,
        grads: held.trainable as f64 * p.grad_bytes() as f64,
        optimizer: owned_state(job, c, share) * p.optimizer_bytes() as f64,
        ..Memory::default()
    }
}

/// Memory of pipeline rank `r` holding `share.layers` layers.
fn rank_memory(k: &Costs, share: Share, r: usize, micro: usize) -> Memory {
    let c = k.c;
    let layers = share.layers;
    let v = c.virtual_stages.max(1);
    let in_flight_layers = if c.pp == 1 {
        layers as f64
    } else if v == 1 {
        (micro.min(c.pp - r) * layers) as f64
    } else {
        let chunks = (2 * (c.pp - r - 1) + (v - 1) * c.pp + 1).min(micro * v);
        chunks as f64 * layers as f64 / v as f64
    };
    let m = &k.job.model;
    let mut activations = in_flight_layers * k.layer_activations();
    if c.recompute {
        // The layer being recomputed holds its full activations during its backward.
        let full = Costs {
            c: Candidate {
                recompute: false,
                ..c
            },
            ..*k
        };
        activations += full.layer_activations();
    }
    if share.last {
        // The logits and their gradient in the compute dtype; the loss widens one chunk of
        // rows at a time to f32, its softmax and that gradient (trainer::loss::CHUNK_ELEMS).
        let logits = k.tokens * m.vocab as f64 / c.tp as f64;
        activations += logits * 2.0 * k.e + logits.min(LOSS_CHUNK_ELEMS as f64) * 8.0;
    }
    Memory {
        activations,
        reserved: k.hw.reserved_gib * super::hardware::GIB,
        ..state_memory(k.job, c, share)
    }
}

/// FLOPs of a whole step over all devices: with recomputation's repeated forwards and
/// without (the model's own).
fn step_flops(job: &Job, c: Candidate) -> (f64, f64) {
    let k = Costs::new(job, &DUMMY, Candidate { tp: 1, ep: 1, ..c });
    let m = &job.model;
    let (weights, scores) = k.layer_flops(1);
    let grad = if k.full() { 2.0 } else { 1.0 };
    let layer_fwd = weights + scores;
    let layer_bwd = weights * grad + 2.0 * scores;
    let head_fwd = 2.0 * k.tokens * m.hidden as f64 * m.vocab as f64;
    let head = head_fwd * (1.0 + grad);
    let passes = (job.global_batch / c.micro_batch) as f64;
    let model = passes * (m.layers as f64 * (layer_fwd + layer_bwd) + head);
    let recomputed = if c.recompute {
        passes * m.layers as f64 * layer_fwd
    } else {
        0.0
    };
    (model + recomputed, model)
}

/// Rates do not enter FLOP counts; any valid profile serves [`step_flops`].
static DUMMY: Hardware = Hardware {
    name: String::new(),
    peak_tflops: 1.0,
    peak_tflops_f32: 1.0,
    achievable_fraction: 1.0,
    memory_gib: 1.0,
    reserved_gib: 0.0,
    memory_bandwidth_gbs: 1.0,
    intra_node_gbs: 1.0,
    inter_node_gbs: 1.0,
    gpus_per_node: 1,
    kernel_overhead_us: 0.0,
    latency_us: 0.0,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_evens_out_the_costliest_stage() {
        assert_eq!(balance(&[1.0; 4], 2), vec![2, 2]);
        assert_eq!(balance(&[1.0, 1.0, 1.0, 3.0], 2), vec![3, 1]);
        assert_eq!(balance(&[1.0; 5], 5), vec![1; 5]);
        assert!(balance(&[1.0; 2], 3).is_empty());
        for n in 1..12 {
            for p in 1..=n {
                let costs: Vec<f64> = (0..n).map(|i| ((i * 7) % 5 + 1) as f64).collect();
                let sizes = balance(&costs, p);
                assert_eq!(sizes.iter().sum::<usize>(), n);
                assert!(sizes.iter().all(|&s| s >= 1), "{sizes:?}");
            }
        }
    }
}
