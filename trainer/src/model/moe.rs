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
use burn::tensor::{backend::Backend, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::decoder::ForwardContext;
use super::linear::Linear;
use super::mlp::Mlp;
use crate::collective::{all_to_all, enter, leave, Exchange, Group, ParallelBackend};

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
    /// Expert capacity as a multiple of an even share (Megatron's
    /// `--moe-expert-capacity-factor`, drop policy "probs"): each expert takes at most
    /// `ceil(factor · tokens · top_k / experts)` of a micro-batch's (token, slot) rows, those
    /// with the highest routing probability; the rest are dropped (the token keeps its
    /// residual). `None`: no dropping.
    pub capacity_factor: Option<f64>,
}

impl<B: ParallelBackend> Moe<B> {
    /// `x: [n, h]` → `[n, h]`. Under tensor parallelism every expert is split like a dense
    /// MLP; the router sees the same input on every rank of the group (so routes
    /// identically) and the weighted partial outputs are summed once at the end. Experts
    /// have no biases (Mixtral).
    ///
    /// `x` is f32; the router and the experts run in the compute dtype, the routing
    /// softmax and the combination in f32 (transformers' Mixtral under autocast).
    pub fn forward(&self, x: Tensor<B, 2>, ctx: &ForwardContext<B>) -> Tensor<B, 2> {
        let (train, tp, ep) = (ctx.train, ctx.tp.as_ref(), ctx.ep.as_ref());
        let x = enter(x, tp);
        let logits = self.gate.forward(x.clone().cast(ctx.compute), train);
        let probs = softmax(logits.cast(FloatDType::F32), 1);
        let (top, index) = probs.topk_with_indices(self.top_k, 1);
        let weights = top.clone() / top.clone().sum_dim(1);
        let mut index = index
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default();
        if let Some(factor) = self.capacity_factor {
            let probs = top.into_data().convert::<f32>().to_vec::<f32>();
            drop_over_capacity(
                &mut index,
                &probs.unwrap_or_default(),
                factor,
                self.num_experts(),
            );
        }
        let out = match ep.filter(|g| g.size() > 1) {
            Some(g) => self.exchange_experts(x, weights, &index, ctx, g),
            None => self.local_experts(x, weights, &index, ctx),
        };
        leave(out, tp)
    }

    /// Experts of the whole layer (this rank holds `experts.len()` of them).
    pub fn num_experts(&self) -> usize {
        self.gate.weight.dims()[1]
    }

    /// Every expert here: for each, the (token, slot) rows routed to it.
    fn local_experts(
        &self,
        x: Tensor<B, 2>,
        weights: Tensor<B, 2>,
        index: &[i64],
        ctx: &ForwardContext<B>,
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
            let rows = x.clone().select(0, tokens.clone()).cast(ctx.compute);
            let y = expert
                .forward_partial(rows, ctx.train)
                .cast(FloatDType::F32)
                * share;
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
        ctx: &ForwardContext<B>,
        ep: &Group,
    ) -> Tensor<B, 2> {
        let [n, h] = x.dims();
        let device = x.device();
        let local = self.experts.len();
        let total = local * ep.size();
        // (token, slot) rows in expert order, so each rank's rows are contiguous and, on
        // arrival, grouped by sender then expert.
        let expert_of = |i: usize| usize::try_from(index[i]).map_or(0, |e| e.min(total - 1));
        // Rows dropped for capacity (expert -1) go nowhere.
        let mut rows: Vec<usize> = (0..index.len()).filter(|&i| index[i] >= 0).collect();
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
            let count = mine.len();
            let at = ints::<B, 1>(mine, [count], &device);
            let rows = received.clone().select(0, at.clone()).cast(ctx.compute);
            let out = expert
                .forward_partial(rows, ctx.train)
                .cast(FloatDType::F32);
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

/// Mark the (token, slot) rows beyond each expert's capacity as dropped (expert -1): per
/// expert, keep the `ceil(factor · tokens · top_k / experts)` rows of highest probability
/// (the earlier row on a tie). `index` and `probs` are `[tokens, top_k]`, row-major.
pub fn drop_over_capacity(index: &mut [i64], probs: &[f32], factor: f64, experts: usize) {
    let capacity = (factor * index.len() as f64 / experts.max(1) as f64).ceil() as usize;
    let mut rows: Vec<usize> = (0..index.len()).collect();
    rows.sort_by(|&a, &b| {
        let p = |i: usize| probs.get(i).copied().unwrap_or(0.0);
        (index[a], p(b), a)
            .partial_cmp(&(index[b], p(a), b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut kept = (-1, 0);
    for i in rows {
        let expert = index[i];
        kept = if kept.0 == expert {
            (expert, kept.1 + 1)
        } else {
            (expert, 1)
        };
        if kept.1 > capacity {
            index[i] = -1;
        }
    }
}

fn ints<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use super::drop_over_capacity;

    #[test]
    fn each_expert_keeps_its_most_probable_rows_up_to_capacity() {
        // 4 tokens × top-2 over 2 experts: 8 rows, an even share is 4 rows per expert.
        let index = vec![0, 1, 0, 1, 0, 1, 0, 1];
        let probs = [0.9, 0.1, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2];
        let mut same = index.clone();
        drop_over_capacity(&mut same, &probs, 1.0, 2);
        assert_eq!(same, index, "at capacity nothing is dropped");
        let mut half = index.clone();
        drop_over_capacity(&mut half, &probs, 0.5, 2);
        // Expert 0 keeps 0.9 and 0.8; expert 1 keeps 0.4 and 0.3.
        assert_eq!(half, vec![0, -1, -1, 1, -1, 1, 0, -1]);
        // Ties go to the earlier row; an uneven load drops only the overloaded expert's.
        let mut skewed = vec![0, 1, 0, 1, 0, 0, 0, 1];
        drop_over_capacity(&mut skewed, &[0.5; 8], 1.0, 2);
        assert_eq!(skewed, vec![0, 1, 0, 1, 0, 0, -1, 1]);
    }
}
