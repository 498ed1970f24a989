//! The automatic parallel strategy: an analytical cost model of a transformer step
//! (FLOPs, memory per device, communication, pipeline bubble) on a [`Hardware`] profile,
//! and a search over dp × tp × pp × ep × micro-batch × recomputation × ZeRO-1 × virtual
//! stages that ranks what fits by predicted step time and says why the rest does not.
//!
//! ```
//! use tidemill_parallel::plan::{search, Hardware, Job, Mode, ModelShape, Precision, Space};
//!
//! let model = ModelShape {
//!     layers: 32, hidden: 4096, heads: 32, kv_heads: 8, head_dim: 128, ffn: 14336,
//!     vocab: 128256, experts: 0, top_k: 0, gated_mlp: true, tied_embeddings: false,
//!     qkv_bias: false, o_bias: false, mlp_bias: false, norm_bias: false, dropout: false,
//! };
//! let job = Job { model, seq_len: 4096, global_batch: 64, mode: Mode::Full,
//!                 precision: Precision::Bf16Mixed, sequence_parallel: false,
//!                 scatter_gather_sends: false };
//! let hw = Hardware {
//!     name: "h100-80g".into(), peak_tflops: 989.0, peak_tflops_f32: 495.0,
//!     achievable_fraction: 0.6, memory_gib: 79.6, reserved_gib: 3.0,
//!     memory_bandwidth_gbs: 2800.0, intra_node_gbs: 360.0, inter_node_gbs: 400.0,
//!     gpus_per_node: 8, kernel_overhead_us: 4.0, latency_us: 10.0,
//! };
//! let plan = search(&job, &hw, 16, &Space::default());
//! let best = plan.best().expect("an 8B model fits on two nodes");
//! assert!(best.estimate.memory.total() <= hw.memory_bytes());
//! ```

mod cost;
mod hardware;
mod search;
mod shape;

pub use cost::{
    balance, estimate, owned_state, rank_layers, state_memory, Candidate, Estimate, Job, Memory,
    LOSS_CHUNK_ELEMS,
};
pub use hardware::{human_bytes, Hardware, GIB};
pub use search::{search, Plan, Priced, Rejection, Space, MAX_WORLD};
pub use shape::{LoraTargets, Mode, ModelShape, Params, Precision, Share};

#[cfg(test)]
mod tests;
