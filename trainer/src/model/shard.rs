//! Cutting a model for tensor parallelism, Megatron's way, and putting it back together.
//!
//! - q, k, v, gate/up (`w1`/`w3`) and the LM head are *column*-parallel: each rank holds a
//!   slice of the output features (whole heads for attention); their biases are cut alike.
//! - o and down (`w2`) are *row*-parallel: each rank holds the matching slice of the input
//!   features; the bias is replicated and added after the sum.
//! - When tp exceeds the kv heads, each rank holds one kv head and `tp / kv` ranks hold the
//!   same one (Megatron replicates them); its gradient is summed over those ranks.
//! - The embedding is cut by vocabulary rows (vocabulary-parallel), the head likewise.
//! - LoRA: for a column-parallel base A is replicated and B is cut like the base; for a
//!   row-parallel base A is cut like the base and B replicated. The replicated factor sees
//!   only this rank's part of the computation, so its gradient is summed over the group
//!   after the backward pass ([`Placement::Partial`]), as is the MoE router's.
//! - Norms are replicated. Under sequence parallelism (Megatron's `--sequence-parallel`)
//!   each rank runs norms and residuals on its chunk of the tokens: the regions are entered
//!   by an all-gather and left by a reduce-scatter, and norms and biases added after a
//!   row-parallel sum get partial gradients, summed over the group after backward.

use std::collections::HashMap;

use burn::module::{Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use parallel::dp::{all_reduce_params, params_by_path, ParamInfo, DEFAULT_BUCKET_ELEMS as BUCKET};
use parallel::{Collectives, Communicator};

use super::decoder::{CausalLm, FeedForward, Sharding};
use super::hf::{leaf_name, linears_mut};
use super::linear::{to_host, Linear};
use crate::collective::Group;
use crate::error::Result;

/// How a parameter is held across the tensor-parallel group, and so how its gradient is
/// completed and counted in the global norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Every rank holds all of it and computes its whole gradient.
    Replicated,
    /// Every rank holds all of it but computes only part of its gradient (summed over the
    /// group after the backward pass).
    Partial,
    /// Each rank holds its own slice; `copies` consecutive ranks hold the same one (kv heads
    /// when tp > kv heads) and sum their gradients.
    Sliced { copies: usize },
}

/// Which slice of a parameter a rank holds: along `dim`, `len` entries starting at
/// `(rank / copies) · len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cut {
    dim: usize,
    len: usize,
    copies: usize,
}

impl Cut {
    fn even(dim: usize, full: usize, tp: usize) -> Self {
        Self {
            dim,
            len: full / tp,
            copies: 1,
        }
    }

    fn start(&self, rank: usize) -> usize {
        rank / self.copies * self.len
    }
}

/// The tensor-parallel side of training: which gradients to complete over which ranks.
pub struct TensorParallel {
    group: Group,
    placements: HashMap<ParamId, Placement>,
    /// The ranks holding the same kv head as this one (tp > kv heads).
    copies: Option<Group>,
}

impl TensorParallel {
    pub fn group(&self) -> &Group {
        &self.group
    }

    pub fn placement(&self, id: &ParamId) -> Placement {
        self.placements
            .get(id)
            .copied()
            .unwrap_or(Placement::Replicated)
    }

    /// The group over which this parameter's gradient is summed after the backward pass.
    pub fn completion_group(&self, id: &ParamId) -> Option<&Group> {
        match self.placement(id) {
            Placement::Partial => Some(&self.group),
            Placement::Sliced { copies } if copies > 1 => self.copies.as_ref(),
            _ => None,
        }
    }

    /// Sum over the group the gradients this rank computed only part of: replicated
    /// factors fed partial inputs, and kv heads held in copies.
    pub fn complete_grads<B: AutodiffBackend<InnerBackend: parallel::device::DeviceBackend>>(
        &self,
        model: &CausalLm<B>,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        let trainable: Vec<ParamInfo> = params_by_path(model)
            .into_iter()
            .filter(|p| p.trainable)
            .collect();
        let partial: Vec<ParamInfo> = trainable
            .iter()
            .filter(|p| self.placement(&p.id) == Placement::Partial)
            .cloned()
            .collect();
        all_reduce_params(self.group.comm().as_ref(), model, &partial, grads, BUCKET)?;
        if let Some(copies) = &self.copies {
            let shared: Vec<ParamInfo> = trainable
                .into_iter()
                .filter(
                    |p| matches!(self.placement(&p.id), Placement::Sliced { copies } if copies > 1),
                )
                .collect();
            all_reduce_params(copies.comm().as_ref(), model, &shared, grads, BUCKET)?;
        }
        Ok(())
    }

    /// Whether this rank counts the parameter in the global gradient norm (each distinct
    /// value once across the group).
    pub fn counts_in_norm(&self, id: &ParamId) -> bool {
        match self.placement(id) {
            Placement::Sliced { copies } => self.group.rank().is_multiple_of(copies),
            Placement::Replicated | Placement::Partial => self.group.rank() == 0,
        }
    }
}

/// Keep this rank's slices of a whole model (with its adapters, if any); with
/// `sequence_parallel`, norms and residuals run on each rank's chunk of the tokens.
pub fn shard<B: Backend>(
    mut model: CausalLm<B>,
    group: Group,
    sequence_parallel: bool,
) -> Result<(CausalLm<B>, TensorParallel)> {
    let (rank, tp) = (group.rank(), group.size());
    parallel::Layout::new(1, tp, 1, 1)
        .and_then(|l| l.check_model(&model.config.shape()))
        .map_err(parallel::Error::from)?;
    let mut cutter = Cutter {
        rank,
        placements: HashMap::new(),
    };
    walk(&mut model, tp, sequence_parallel, &mut cutter);
    let c = &model.config;
    let kv_copies = (tp / c.num_kv_heads).max(1);
    for layer in &mut model.layers {
        layer.self_attn.num_heads = c.num_heads / tp;
        layer.self_attn.num_kv_heads = (c.num_kv_heads / tp).max(1);
    }
    let copies = if kv_copies > 1 {
        let first = rank / kv_copies * kv_copies;
        let ranks: Vec<usize> = (first..first + kv_copies).collect();
        Some(Group::new(group.comm().split(&ranks)?))
    } else {
        None
    };
    model.sharding = Sharding {
        vocab_start: rank * (c.vocab_size / tp),
        tp: Some(group.clone()),
        sequence_parallel,
        ..model.sharding
    };
    Ok((
        model,
        TensorParallel {
            group,
            placements: cutter.placements,
            copies,
        },
    ))
}

/// The whole model again, on every rank of the group (a collective): the inverse of
/// [`shard`], for export.
pub fn unshard<B: Backend>(mut model: CausalLm<B>) -> Result<CausalLm<B>> {
    let Some(group) = model.sharding.tp.clone() else {
        return Ok(model);
    };
    let mut gatherer = Gatherer {
        comm: group.comm().as_ref(),
        tp: group.size(),
        failure: None,
    };
    walk(&mut model, group.size(), false, &mut gatherer);
    if let Some(e) = gatherer.failure {
        return Err(e.into());
    }
    let c = model.config.clone();
    for layer in &mut model.layers {
        layer.self_attn.num_heads = c.num_heads;
        layer.self_attn.num_kv_heads = c.num_kv_heads;
    }
    model.sharding.tp = None;
    model.sharding.vocab_start = 0;
    model.sharding.sequence_parallel = false;
    Ok(model)
}

/// Something done to each parameter, knowing how it is cut (`None`: not cut).
trait Visit<B: Backend> {
    fn param<const D: usize>(
        &mut self,
        p: &mut Param<Tensor<B, D>>,
        cut: Option<Cut>,
        placement: Placement,
    );
}

/// Every parameter of a whole-model layout, in a fixed order, with its cut. `model` may be
/// whole or already cut: cuts are computed from the config. Under sequence parallelism
/// (`sp`) what runs on a rank's chunk of the tokens — norms, biases added after a
/// row-parallel sum — gets only a partial gradient.
fn walk<B: Backend>(model: &mut CausalLm<B>, tp: usize, sp: bool, f: &mut impl Visit<B>) {
    let c = model.config.clone();
    let whole = if sp {
        Placement::Partial
    } else {
        Placement::Replicated
    };
    let sliced = Placement::Sliced { copies: 1 };
    let vocab = Cut::even(0, c.vocab_size, tp);
    if let Some(embed) = &mut model.embed_tokens {
        f.param(embed, Some(vocab), sliced);
    }
    for layer in &mut model.layers {
        for norm in [
            &mut layer.input_layernorm,
            &mut layer.post_attention_layernorm,
        ] {
            f.param(&mut norm.weight, None, whole);
        }
        if let FeedForward::Sparse(moe) = &mut layer.ffn {
            // The router: replicated, fed the same input everywhere, but it weighs partial
            // expert outputs, so its gradient is partial.
            visit_linear(f, &mut moe.gate, Role::Router, Placement::Partial);
        }
    }
    if let Some(norm) = &mut model.norm {
        f.param(&mut norm.weight, None, whole);
    }
    let d = c.head_dim;
    let kv = if tp <= c.num_kv_heads {
        Cut::even(1, c.num_kv_heads * d, tp)
    } else {
        Cut {
            dim: 1,
            len: d,
            copies: tp / c.num_kv_heads,
        }
    };
    let (heads, inter) = (c.num_heads * d, c.intermediate_size);
    for (name, linear) in linears_mut(model) {
        let role = match leaf_name(&name) {
            "q_proj" => Role::Column(Cut::even(1, heads, tp)),
            "k_proj" | "v_proj" => Role::Column(kv),
            "o_proj" => Role::Row(Cut::even(0, heads, tp)),
            "gate_proj" | "up_proj" | "w1" | "w3" => Role::Column(Cut::even(1, inter, tp)),
            "down_proj" | "w2" => Role::Row(Cut::even(0, inter, tp)),
            "lm_head" => Role::Column(Cut::even(1, c.vocab_size, tp)),
            // The router, visited above.
            _ => continue,
        };
        visit_linear(f, linear, role, whole);
    }
}

#[derive(Clone, Copy)]
enum Role {
    /// Output features cut (weight `[in, out]` along dim 1).
    Column(Cut),
    /// Input features cut (weight along dim 0).
    Row(Cut),
    Router,
}

/// `bias_after_sum`: how a row-parallel projection's bias (added after the sum) is held.
fn visit_linear<B: Backend>(
    f: &mut impl Visit<B>,
    l: &mut Linear<B>,
    role: Role,
    bias_after_sum: Placement,
) {
    let sliced = |cut: Cut| Placement::Sliced { copies: cut.copies };
    match role {
        Role::Column(cut) => {
            f.param(&mut l.weight, Some(cut), sliced(cut));
            if let Some(b) = &mut l.bias {
                f.param(b, Some(Cut { dim: 0, ..cut }), sliced(cut));
            }
            if let Some(lora) = &mut l.lora {
                f.param(&mut lora.a, None, Placement::Partial);
                f.param(&mut lora.b, Some(cut), sliced(cut));
            }
        }
        Role::Row(cut) => {
            f.param(&mut l.weight, Some(cut), sliced(cut));
            if let Some(b) = &mut l.bias {
                f.param(b, None, bias_after_sum);
            }
            if let Some(lora) = &mut l.lora {
                f.param(&mut lora.a, Some(cut), sliced(cut));
                f.param(&mut lora.b, None, Placement::Partial);
            }
        }
        Role::Router => {
            f.param(&mut l.weight, None, Placement::Partial);
            if let Some(b) = &mut l.bias {
                f.param(b, None, Placement::Partial);
            }
            if let Some(lora) = &mut l.lora {
                f.param(&mut lora.a, None, Placement::Partial);
                f.param(&mut lora.b, None, Placement::Partial);
            }
        }
    }
}

/// Keeps this rank's slice of each parameter and remembers placements by (new) id.
struct Cutter {
    rank: usize,
    placements: HashMap<ParamId, Placement>,
}

impl<B: Backend> Visit<B> for Cutter {
    fn param<const D: usize>(
        &mut self,
        p: &mut Param<Tensor<B, D>>,
        cut: Option<Cut>,
        placement: Placement,
    ) {
        if let Some(cut) = cut {
            let trainable = p.is_require_grad();
            let piece = p.val().narrow(cut.dim, cut.start(self.rank), cut.len);
            *p = fresh(piece.into_data(), &p.device(), trainable);
        }
        self.placements.insert(p.id, placement);
    }
}

/// Gathers every rank's slice back into whole parameters.
struct Gatherer<'a> {
    comm: &'a dyn Communicator,
    tp: usize,
    failure: Option<parallel::Error>,
}

impl<B: Backend> Visit<B> for Gatherer<'_> {
    fn param<const D: usize>(
        &mut self,
        p: &mut Param<Tensor<B, D>>,
        cut: Option<Cut>,
        _: Placement,
    ) {
        let Some(cut) = cut else { return };
        if self.failure.is_some() {
            return;
        }
        let shape = p.dims();
        let values = to_host(p.val()).data;
        let all = match self.comm.all_gather(&values) {
            Ok(all) => all,
            Err(e) => {
                self.failure = Some(e);
                return;
            }
        };
        let device = p.device();
        let pieces: Vec<Tensor<B, D>> = all
            .chunks(values.len().max(1))
            .step_by(cut.copies)
            .take(self.tp / cut.copies)
            .map(|v| Tensor::from_data(TensorData::new(v.to_vec(), shape), &device))
            .collect();
        let whole = Tensor::cat(pieces, cut.dim);
        *p = fresh(whole.into_data(), &device, p.is_require_grad());
    }
}

/// A new leaf parameter holding `data`.
fn fresh<B: Backend, const D: usize>(
    data: TensorData,
    device: &B::Device,
    trainable: bool,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(data, device)).set_require_grad(trainable)
}
