//! Pipeline parallelism: layers cut into stages (balanced by cost or set by hand), and
//! micro-batches run through them with 1F1B (Megatron's schedule: after a warm-up, each
//! stage alternates one forward and one backward, so at most `stages - index` micro-batches
//! are in flight) or GPipe (all forwards, then all backwards) as the baseline.
//!
//! Activations go downstream and their gradients upstream by point-to-point messages on
//! the pipeline group; in the steady state of 1F1B a send and the next receive run at once
//! (`send_recv`), as Megatron batches them, so neither neighbour waits on the other.
//! A stage's backward is `(y · g).sum().backward()` with `g` the received gradient; its
//! input is a fresh leaf requiring grad, whose gradient is what goes upstream.

use std::collections::VecDeque;
use std::sync::Arc;

use burn::module::ParamId;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use parallel::{Collectives, Communicator};

use crate::collective::{Collective, Group, TrainBackend};
use crate::data::{collate, Batch, Row};
use crate::error::{Error, Result};
use crate::loss::supervised;
use crate::model::decoder::Stage;
use crate::model::linear::to_host;
use crate::model::{CausalLm, ModelConfig};
use crate::train::{inputs, EvalResult};

/// Order of forwards and backwards on each stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    OneFOneB,
    GPipe,
}

/// Relative forward cost of each layer (multiply-adds per token of its active
/// parameters), with the head's added to the last layer: what [`balance`] evens out.
pub fn layer_costs(c: &ModelConfig) -> Vec<f64> {
    let (h, d) = (c.hidden_size as f64, c.head_dim as f64);
    let attn = h * d * (2 * c.num_heads + 2 * c.num_kv_heads) as f64;
    let ffn = match &c.moe {
        None => 3.0 * h * c.intermediate_size as f64,
        Some(m) => h * m.num_experts as f64 + m.top_k as f64 * 3.0 * h * c.intermediate_size as f64,
    };
    let mut costs = vec![attn + ffn; c.num_layers];
    if let Some(last) = costs.last_mut() {
        *last += h * c.vocab_size as f64;
    }
    costs
}

/// Layers per stage: contiguous, at least one each, minimising the costliest stage.
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

/// Keep stage `index`'s layers (and the embedding, norm and head where they belong) of a
/// whole model; `sizes` are the layers per stage.
pub fn keep_stage<B: burn::tensor::backend::Backend>(
    mut model: CausalLm<B>,
    sizes: &[usize],
    index: usize,
) -> CausalLm<B> {
    let first_layer: usize = sizes[..index].iter().sum();
    let stage = Stage {
        index,
        count: sizes.len(),
        first_layer,
    };
    model.layers = model
        .layers
        .into_iter()
        .skip(first_layer)
        .take(sizes[index])
        .collect();
    let tied = model.config.tie_word_embeddings;
    if !(stage.is_first() || (stage.is_last() && tied)) {
        model.embed_tokens = None;
    }
    if !stage.is_last() {
        model.norm = None;
        model.lm_head = None;
    }
    model.sharding.stage = Some(stage);
    model
}

/// One rank's part in a pipeline.
pub struct Pipeline {
    comm: Arc<dyn Communicator>,
    stage: Stage,
    schedule: Schedule,
    /// First and last stage, which both hold the tied embedding.
    tied: Option<Group>,
    embed: Option<ParamId>,
}

impl Pipeline {
    /// `comm` is the pipeline group (stage `i` is its rank `i`); `model` this rank's stage.
    /// Every member calls this at the same point (it may split `comm`).
    pub fn new<B: burn::tensor::backend::Backend>(
        comm: Arc<dyn Communicator>,
        model: &CausalLm<B>,
        schedule: Schedule,
    ) -> Result<Self> {
        let stage = model.sharding.stage.ok_or_else(|| Error::Training {
            key: "parallel.pp".into(),
            message: "the model is not cut into stages".into(),
        })?;
        // (Not `lm_head.is_none()`: no stage but the last holds a head.)
        let tied_model = model.config.tie_word_embeddings && stage.count > 1;
        let tied = if tied_model && (stage.is_first() || stage.is_last()) {
            Some(Group::new(comm.split(&[0, stage.count - 1])?))
        } else {
            None
        };
        Ok(Self {
            comm,
            stage,
            schedule,
            tied,
            embed: model.embed_tokens.as_ref().map(|p| p.id),
        })
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The last stage's copy of a tied embedding is not counted again in the norm.
    pub fn counts_in_norm(&self, id: &ParamId) -> bool {
        !(self.tied.is_some() && !self.stage.is_first() && Some(*id) == self.embed)
    }

    /// Forward and backward of `batches` through the pipeline: the summed loss (non-zero on
    /// the last stage only) and this stage's accumulated gradients, with the tied
    /// embedding's gradient summed over the first and last stage.
    pub fn forward_backward<B: TrainBackend>(
        &self,
        model: &CausalLm<B>,
        batches: &[Batch],
        denominator: f64,
    ) -> Result<(f64, GradientsParams)> {
        let m = batches.len();
        let (prev, next) = self.neighbours();
        let warmup = match self.schedule {
            Schedule::GPipe => m,
            Schedule::OneFOneB => (self.stage.count - self.stage.index - 1).min(m),
        };
        let h = model.config.hidden_size;
        let size = |i: usize| model.local_rows(batches[i].batch * batches[i].seq) * h;
        let mut loss_sum = 0.0;
        let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
        let mut flight: VecDeque<InFlight<B>> = VecDeque::new();
        let run_backward =
            |f: InFlight<B>, g: Option<Vec<f32>>, acc: &mut GradientsAccumulator<CausalLm<B>>| {
                let (grads, dx) = f.backward(model, g);
                acc.accumulate(model, grads);
                model.check_collectives().map(|()| dx)
            };
        for i in 0..warmup {
            let x = self.receive(prev, size(i))?;
            let f = InFlight::forward(model, &batches[i], x, denominator, &mut loss_sum);
            if let Some(n) = next {
                self.comm.send(&f.hidden_values(), n)?;
            }
            flight.push_back(f);
        }
        let steady = m - warmup;
        let mut x_next = if steady > 0 {
            self.receive(prev, size(warmup))?
        } else {
            None
        };
        for j in 0..steady {
            let i = warmup + j;
            let f = InFlight::forward(
                model,
                &batches[i],
                x_next.take(),
                denominator,
                &mut loss_sum,
            );
            let g = match next {
                Some(n) => {
                    let mut g = vec![0f32; size(j)];
                    self.comm.send_recv(&f.hidden_values(), n, &mut g, n)?;
                    Some(g)
                }
                None => None,
            };
            flight.push_back(f);
            let oldest = flight.pop_front().expect("a micro-batch in flight");
            let dx = run_backward(oldest, g, &mut acc)?;
            match (prev, dx) {
                (Some(p), Some(dx)) if j + 1 < steady => {
                    let mut x = vec![0f32; size(i + 1)];
                    self.comm.send_recv(&dx, p, &mut x, p)?;
                    x_next = Some(x);
                }
                (Some(p), Some(dx)) => self.comm.send(&dx, p)?,
                _ => {}
            }
        }
        for j in steady..m {
            let g = self.receive(next, size(j))?;
            let oldest = flight.pop_front().expect("a micro-batch in flight");
            if let (Some(p), Some(dx)) = (prev, run_backward(oldest, g, &mut acc)?) {
                self.comm.send(&dx, p)?;
            }
        }
        let mut grads = acc.grads();
        if let (Some(tied), Some(id)) = (&self.tied, self.embed) {
            let params: Vec<_> = parallel::dp::params_by_path(model)
                .into_iter()
                .filter(|p| p.id == id && p.trainable)
                .collect();
            parallel::dp::all_reduce_params(
                tied.comm().as_ref(),
                model,
                &params,
                &mut grads,
                usize::MAX,
            )?;
        }
        Ok((loss_sum, grads))
    }

    /// Mean token loss of `rows` (forward only, stage by stage), on every stage.
    pub fn evaluate<B: Collective>(
        &self,
        model: &CausalLm<B>,
        rows: &[Row],
        micro_batch: usize,
    ) -> Result<EvalResult> {
        let (prev, next) = self.neighbours();
        let h = model.config.hidden_size;
        let device = model.device();
        let mut sums = [0.0f64, 0.0];
        for chunk in rows.chunks(micro_batch.max(1)) {
            let batch = collate(&chunk.iter().collect::<Vec<_>>());
            let n = model.local_rows(batch.batch * batch.seq);
            let x = self
                .receive(prev, n * h)?
                .map(|v| Tensor::<B, 2>::from_data(TensorData::new(v, [n, h]), &device));
            let out = model.forward_stage(x, &inputs(&batch), false);
            match next {
                Some(p) => self.comm.send(&values(out), p)?,
                None => {
                    sums[0] += model
                        .loss_of_logits(out, &batch.targets, 1.0)
                        .into_scalar()
                        .elem::<f64>();
                    sums[1] += supervised(&batch.targets) as f64;
                }
            }
            model.check_collectives()?;
        }
        self.comm.all_reduce(&mut sums, parallel::ReduceOp::Sum)?;
        Ok(EvalResult {
            loss: if sums[1] == 0.0 {
                0.0
            } else {
                sums[0] / sums[1]
            },
            tokens: sums[1] as usize,
        })
    }

    fn neighbours(&self) -> (Option<usize>, Option<usize>) {
        let i = self.stage.index;
        let prev = i.checked_sub(1);
        let next = (!self.stage.is_last()).then_some(i + 1);
        (prev, next)
    }

    fn receive(&self, from: Option<usize>, len: usize) -> Result<Option<Vec<f32>>> {
        let Some(p) = from else { return Ok(None) };
        let mut buf = vec![0f32; len];
        self.comm.recv(&mut buf, p)?;
        Ok(Some(buf))
    }
}

/// Rank 0 of the pipeline group gets every stage's parameters (a collective): put into
/// `whole`, a model with every layer, which it returns; the other stages send theirs and
/// return `None`. Used to export a model trained in stages.
pub fn gather_stages<B: burn::tensor::backend::Backend>(
    stage: &CausalLm<B>,
    comm: &dyn Communicator,
    whole: Option<CausalLm<B>>,
) -> Result<Option<CausalLm<B>>> {
    let first = stage.first_layer();
    // Paths name layers by their index in this stage; make them global.
    let global = |path: String| -> String {
        let renamed = path.strip_prefix("layers.").and_then(|rest| {
            let (i, tail) = rest.split_once('.')?;
            Some(format!(
                "layers.{}.{tail}",
                i.parse::<usize>().ok()? + first
            ))
        });
        renamed.unwrap_or(path)
    };
    let mine: Vec<(String, Vec<f32>)> = parallel::dp::values_by_path(stage)
        .into_iter()
        .map(|(path, v)| (global(path), v))
        .collect();
    if comm.rank() != 0 {
        let bytes = serde_json::to_vec(&mine).map_err(|e| Error::Training {
            key: "export".into(),
            message: e.to_string(),
        })?;
        comm.send(&[bytes.len() as i64], 0)?;
        comm.send_bytes(&bytes, 0)?;
        return Ok(None);
    }
    let mut values: std::collections::BTreeMap<String, Vec<f32>> = mine.into_iter().collect();
    for r in 1..comm.size() {
        let mut len = [0i64];
        comm.recv(&mut len, r)?;
        let mut bytes = vec![0u8; usize::try_from(len[0]).unwrap_or(0)];
        comm.recv_bytes(&mut bytes, r)?;
        let theirs: Vec<(String, Vec<f32>)> =
            serde_json::from_slice(&bytes).map_err(|e| Error::Training {
                key: "export".into(),
                message: format!("stage {r}'s parameters: {e}"),
            })?;
        values.extend(theirs);
    }
    Ok(whole.map(|w| parallel::dp::replace_by_path(w, values)))
}

/// A micro-batch between its forward and its backward on one stage.
struct InFlight<B: TrainBackend> {
    /// The received activations (a leaf requiring grad), not on the first stage.
    input: Option<Tensor<B, 2>>,
    /// Hidden states for the next stage, or the loss on the last.
    output: Output<B>,
}

enum Output<B: TrainBackend> {
    Hidden(Tensor<B, 2>),
    Loss(Tensor<B, 1>),
}

impl<B: TrainBackend> InFlight<B> {
    fn forward(
        model: &CausalLm<B>,
        batch: &Batch,
        received: Option<Vec<f32>>,
        denominator: f64,
        loss_sum: &mut f64,
    ) -> Self {
        let n = model.local_rows(batch.batch * batch.seq);
        let h = model.config.hidden_size;
        let input = received.map(|v| {
            Tensor::<B, 2>::from_data(TensorData::new(v, [n, h]), &model.device()).require_grad()
        });
        let out = model.forward_stage(input.clone(), &inputs(batch), true);
        let output = if model.has_head() {
            let loss = model.loss_of_logits(out, &batch.targets, denominator);
            *loss_sum += loss.clone().into_scalar().elem::<f64>();
            Output::Loss(loss)
        } else {
            Output::Hidden(out)
        };
        Self { input, output }
    }

    fn hidden_values(&self) -> Vec<f32> {
        match &self.output {
            Output::Hidden(y) => values(y.clone()),
            Output::Loss(_) => Vec::new(),
        }
    }

    /// This stage's parameter gradients and the gradient of its input.
    fn backward(
        self,
        model: &CausalLm<B>,
        g: Option<Vec<f32>>,
    ) -> (GradientsParams, Option<Vec<f32>>) {
        let grads = match self.output {
            Output::Loss(loss) => loss.backward(),
            Output::Hidden(y) => {
                let dims = y.dims();
                let g = g.unwrap_or_else(|| vec![0.0; dims[0] * dims[1]]);
                let g = Tensor::<B, 2>::from_data(TensorData::new(g, dims), &y.device());
                (y * g).sum().backward()
            }
        };
        // A stage whose output does not depend on its input still answers with zeros, so
        // the stage before it is not left waiting.
        let dx = self.input.map(|x| {
            let numel = x.dims().iter().product();
            x.grad(&grads)
                .map(values)
                .unwrap_or_else(|| vec![0.0; numel])
        });
        (GradientsParams::from_grads(grads, model), dx)
    }
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    to_host(t).data
}

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
