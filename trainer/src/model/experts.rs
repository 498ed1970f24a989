//! Spreading a mixture-of-experts model's experts over an expert-parallel group, and
//! putting them back together for export. The forward pass is in [`super::moe`].
//!
//! Each rank of the group keeps `experts / ep` consecutive experts of every sparse layer;
//! everything else (attention, norms, router, embeddings) is replicated over the group and,
//! the group being part of the data-parallel dimension, its gradients sum over `dp × ep`.
//! An expert's gradient already holds every token routed to it from the whole group, so
//! it sums over `dp` only.

use std::collections::{BTreeMap, HashSet};

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use parallel::dp::{params_by_path, replace_by_path, values_by_path};
use parallel::Collectives;

use super::decoder::{CausalLm, FeedForward};
use crate::collective::Group;
use crate::error::Result;

/// Whether a module path (as [`params_by_path`] writes it) is inside an expert.
pub fn is_expert_path(path: &str) -> bool {
    path.split('.').any(|segment| segment == "experts")
}

/// The expert-parallel side of training: which parameters are this rank's own experts.
pub struct ExpertParallel {
    group: Group,
    experts: HashSet<ParamId>,
}

impl ExpertParallel {
    /// For `model` as it will be trained (cut by [`spread`], and by tensor parallelism if
    /// any: parameter ids change when a parameter is cut).
    pub fn new<B: Backend>(group: Group, model: &CausalLm<B>) -> Self {
        let experts = params_by_path(model)
            .into_iter()
            .filter(|p| is_expert_path(&p.path))
            .map(|p| p.id)
            .collect();
        Self { group, experts }
    }

    /// Whether this rank counts the parameter in the global gradient norm: its experts are
    /// its own, everything else is the same on every rank of the group and counted once.
    pub fn counts_in_norm(&self, id: &ParamId) -> bool {
        self.experts.contains(id) || self.group.rank() == 0
    }
}

/// Keep this rank's share of the experts of every sparse layer.
pub fn spread<B: Backend>(mut model: CausalLm<B>, group: Group) -> Result<CausalLm<B>> {
    let (rank, ep) = (group.rank(), group.size());
    let shape = model.config.shape();
    parallel::Layout::new(1, 1, 1, ep)
        .and_then(|l| l.check_model(&shape))
        .map_err(parallel::Error::from)?;
    let local = shape.experts / ep;
    for layer in &mut model.layers {
        if let FeedForward::Sparse(moe) = &mut layer.ffn {
            moe.experts = moe
                .experts
                .drain(rank * local..(rank + 1) * local)
                .collect();
            moe.first_expert = rank * local;
        }
    }
    model.sharding.ep = Some(group);
    Ok(model)
}

/// Every expert again, on every rank of the group (a collective): the inverse of
/// [`spread`], for export (the experts that came from other ranks share parameter ids
/// with this rank's: the result is not for training).
pub fn gather<B: Backend>(mut model: CausalLm<B>) -> Result<CausalLm<B>> {
    let Some(group) = model.sharding.ep.take() else {
        return Ok(model);
    };
    for layer in &mut model.layers {
        let FeedForward::Sparse(moe) = &mut layer.ffn else {
            continue;
        };
        // Each local expert's values in path order; every rank's experts have the same
        // shapes, so rank r's come at r × len in the gathered vector.
        let local: Vec<BTreeMap<String, Vec<f32>>> =
            moe.experts.iter().map(values_by_path).collect();
        let flat: Vec<f32> = local
            .iter()
            .flat_map(|m| m.values().flatten().copied())
            .collect();
        let all = group.comm().all_gather(&flat)?;
        let mut experts = Vec::with_capacity(moe.experts.len() * group.size());
        for chunk in all.chunks(flat.len().max(1)) {
            let mut at = 0;
            for (template, values) in moe.experts.iter().zip(&local) {
                let mut theirs = BTreeMap::new();
                for (path, v) in values {
                    theirs.insert(path.clone(), chunk[at..at + v.len()].to_vec());
                    at += v.len();
                }
                experts.push(replace_by_path(template.clone(), theirs));
            }
        }
        moe.experts = experts;
        moe.first_expert = 0;
    }
    Ok(model)
}
