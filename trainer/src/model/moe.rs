//! Mixtral's sparse block, on one rank or with its experts spread over an expert-parallel
//! group (Megatron's token dispatcher with all-to-all, no token dropping).
//!
//! Under expert parallelism each rank of the `ep` group holds `experts / ep` consecutive
//! experts and its own tokens (the group is part of the data-parallel dimension). Each rank
//! routes its tokens exactly as one process would (the router is replicated), sends every
//! (token, slot) row to the rank owning its expert, runs its experts on what arrived from
//! all ranks, sends the outputs back and combines them with the routing weights. Both
//! exchanges are differentiable all-to-alls ([`crate::collective::all_to_all`]).
//!
//! Every rank must run the same collectives in its backward pass, whatever its tokens
//! chose. The dispatch ends in one zero row that every local expert also runs on (its
//! output is never sent, its gradient is zero): so each expert's output always depends on
//! the dispatched rows and on the expert's parameters, and the graph of every rank holds
//! both all-to-alls whether or not any token reached it.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

use super::decoder::{enter, leave, Mlp};
use super::linear::Linear;
use crate::collective::{all_to_all, Collective, Exchange, Group};

/// Softmax over the router logits, keep the top-k, renormalise them to sum to 1, and add
/// each chosen expert's output weighted by its share.
#[derive(Module, Debug)]
pub struct Moe<B: Backend> {
    pub gate: Linear<B>,
    /// The experts this rank holds: all of them, or `first_expert..` under expert
    /// parallelism.
    pub experts: Vec<Mlp<B>>,
    pub top_k: usize,
    /// Global index of `experts[0]`.
    pub first_expert: usize,
}

impl<B: Collective> Moe<B> {
    /// `x: [n, h]` → `[n, h]`. Under tensor parallelism every expert is split like a dense
    /// MLP; the router sees the same input on every rank of the group (so routes
    /// identically) and the weighted partial outputs are summed once at the end. Experts
    /// have no biases (Mixtral).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        train: bool,
        tp: Option<&Group>,
        ep: Option<&Group>,
    ) -> Tensor<B, 2> {
        let x = enter(x, tp);
        let probs = softmax(self.gate.forward(x.clone(), train), 1);
        let (top, index) = probs.topk_with_indices(self.top_k, 1);
        let weights = top.clone() / top.sum_dim(1);
        let index = index
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default();
        let out = match ep.filter(|g| g.size() > 1) {
            Some(g) => self.exchange_experts(x, weights, &index, train, g),
            None => self.local_experts(x, weights, &index, train),
        };
        leave(out, tp)
    }

    /// Every expert here: for each, the (token, slot) rows routed to it.
    fn local_experts(
        &self,
        x: Tensor<B, 2>,
        weights: Tensor<B, 2>,
        index: &[i64],
        train: bool,
    ) -> Tensor<B, 2> {
        let [n, h] = x.dims();
        let mut routes: Vec<Vec<(i64, i64)>> = vec![Vec::new(); self.experts.len()];
        for (i, &e) in index.iter().enumerate() {
            let token = (i / self.top_k) as i64;
            let slot = (i % self.top_k) as i64;
            if let Some(route) = usize::try_from(e).ok().and_then(|e| routes.get_mut(e)) {
                route.push((token, slot));
            }
        }
        let device = x.device();
        let mut out = Tensor::<B, 2>::zeros([n, h], &device);
        for (expert, route) in self.experts.iter().zip(&routes) {
            if route.is_empty() {
                continue;
            }
            let m = route.len();
            let tokens = ints::<B, 1>(route.iter().map(|r| r.0).collect(), [m], &device);
            let slots = ints::<B, 2>(route.iter().map(|r| r.1).collect(), [m, 1], &device);
            let share = weights.clone().select(0, tokens.clone()).gather(1, slots);
            let y = expert.forward_partial(x.clone().select(0, tokens.clone()), train) * share;
            out = out.select_assign(0, tokens, y, IndexingUpdateOp::Add);
        }
        out
    }

    /// Experts spread over `ep`: dispatch, run the local experts, combine.
    fn exchange_experts(
        &self,
        x: Tensor<B, 2>,
        weights: Tensor<B, 2>,
        index: &[i64],
        train: bool,
        ep: &Group,
    ) -> Tensor<B, 2> {
        let [n, h] = x.dims();
        let device = x.device();
        let local = self.experts.len();
        let total = local * ep.size();
        // (token, slot) rows in expert order, so each rank's rows are contiguous and, on
        // arrival, grouped by sender then expert.
        let mut rows: Vec<usize> = (0..index.len()).collect();
        let expert_of = |i: usize| usize::try_from(index[i]).map_or(0, |e| e.min(total - 1));
        rows.sort_by_key(|&i| expert_of(i));
        let mut send = vec![0usize; ep.size()];
        let mut ids = Vec::with_capacity(rows.len());
        for &i in &rows {
            let e = expert_of(i);
            send[e / local] += 1;
            ids.push((e % local) as i64);
        }
        // Which local expert each arriving row is for.
        let (arrived, recv) = ep.all_to_all_ids(&ids, &send);
        let dispatch = Exchange {
            send,
            recv,
            pad_in: 0,
            pad_out: 1,
        };
        let m = rows.len();
        let order: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
        let tokens: Vec<i64> = rows.iter().map(|&i| (i / self.top_k) as i64).collect();
        let tokens = ints::<B, 1>(tokens, [m], &device);
        let received = all_to_all(x.select(0, tokens.clone()), &dispatch, ep);
        let pad = arrived.len() as i64;
        let mut y = Tensor::<B, 2>::zeros([arrived.len() + 1, h], &device);
        for (j, expert) in self.experts.iter().enumerate() {
            let mine: Vec<i64> = (0..pad)
                .filter(|&r| arrived[r as usize] == j as i64)
                .chain([pad])
                .collect();
            let at = ints::<B, 1>(mine.clone(), [mine.len()], &device);
            let out = expert.forward_partial(received.clone().select(0, at.clone()), train);
            y = y.select_assign(0, at, out, IndexingUpdateOp::Add);
        }
        let back = all_to_all(y, &dispatch.reversed(), ep);
        let share = weights
            .reshape([n * self.top_k, 1])
            .select(0, ints::<B, 1>(order, [m], &device));
        Tensor::<B, 2>::zeros([n, h], &device).select_assign(
            0,
            tokens,
            back * share,
            IndexingUpdateOp::Add,
        )
    }
}

fn ints<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
