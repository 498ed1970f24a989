//! Pipeline parallelism: layers cut into stages (balanced by cost or set by hand, see
//! [`stages`]), and micro-batches run through them by a [`schedule`]: 1F1B (Megatron's:
//! after a warm-up, each stage alternates one forward and one backward, so at most
//! `stages - index` micro-batches are in flight), GPipe (all forwards, then all backwards)
//! as the baseline, or interleaved 1F1B, where each rank holds several chunks of layers
//! (virtual stages) and the bubble shrinks by their number.
//!
//! Activations go downstream and their gradients upstream by point-to-point messages on
//! the pipeline group, after each piece of work as the plan says; a send and a receive
//! of the same step run at once (`send_recv`), as Megatron batches them, so neither
//! neighbour waits on the other. A chunk's backward is `(y · g).sum().backward()` with `g`
//! the received gradient; its input is a fresh leaf requiring grad, whose gradient is what
//! goes upstream. With `training.recompute` a chunk runs without a graph and is rebuilt
//! layer by layer in its backward ([`crate::backprop::Recomputed`]); the last stage takes
//! the loss and its gradient with respect to the logits at forward time, a chunk of rows
//! at a time.

pub mod schedule;
pub mod stages;

use std::collections::HashMap;
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType, Tensor, TensorPrimitive};
use parallel::device::{DeviceBackend, Expect};
use parallel::{Collectives, Communicator};

pub use schedule::PipelineSchedule;
use schedule::{Pass, Shape, Step, Work};
pub use stages::{balance, gather_stages, keep_stage, layer_costs};

use crate::backprop::{backward, leaf, loss_and_grad, mix, Recomputed};
use crate::collective::{Group, ParallelBackend, TrainBackend};
use crate::data::{collate, Batch, Row};
use crate::error::{Error, Result};
use crate::eval::{inputs, EvalResult};
use crate::loss::supervised;
use crate::model::decoder::Stage;
use crate::model::{CausalLm, Inputs};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// One rank's part in a pipeline.
pub struct Pipeline {
    comm: Arc<dyn Communicator>,
    stage: Stage,
    schedule: PipelineSchedule,
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
        schedule: PipelineSchedule,
    ) -> Result<Self> {
        let stage = model
            .sharding
            .stage
            .clone()
            .ok_or_else(|| Error::Training {
                key: "parallel.pp".into(),
                message: "the model is not cut into stages".into(),
            })?;
        let shape = Shape {
            ranks: stage.count,
            chunks: stage.chunks.len(),
            micro: stage.count,
            backward: true,
        };
        schedule::check(schedule, shape).map_err(|message| Error::Training {
            key: "parallel.schedule".into(),
            message,
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

    /// This rank's steps for `micro` micro-batches.
    fn steps(&self, micro: usize, backward: bool) -> Result<Vec<Step>> {
        let shape = Shape {
            ranks: self.stage.count,
            chunks: self.stage.chunks.len(),
            micro,
            backward,
        };
        let mut all = schedule::plan(self.schedule, shape).map_err(|message| Error::Training {
            key: "parallel.schedule".into(),
            message,
        })?;
        Ok(all.swap_remove(self.stage.index))
    }

    /// Forward and backward of `batches` through the pipeline: the summed loss (non-zero on
    /// the last stage only) and this stage's accumulated gradients, with the tied
    /// embedding's gradient summed over the first and last stage.
    /// With `recompute`, each chunk runs without a graph and is rebuilt a layer at a time
    /// in its backward pass; micro-batch `j` draws its dropout from `mix(seed, j)`.
    pub fn forward_backward<B: TrainBackend>(
        &self,
        model: &CausalLm<B>,
        batches: &[Batch],
        denominator: f64,
        (recompute, seed): (bool, u64),
    ) -> Result<(f64, GradientsParams)> {
        let steps = self.steps(batches.len(), true)?;
        let h = model.config.hidden_size;
        let size = |w: Work| {
            [
                model.local_rows(batches[w.micro].batch * batches[w.micro].seq),
                h,
            ]
        };
        let mut loss_sum = 0.0;
        let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
        let mut flight: HashMap<(usize, usize), InFlight<B>> = HashMap::new();
        self.run(&steps, size, &model.device(), |w, received| match w.pass {
            Pass::Forward => {
                let batch = &batches[w.micro];
                let how = (recompute, mix(seed, w.micro as u64));
                let mut f = InFlight::forward(model, w.chunk, batch, received, denominator, how);
                loss_sum += f.loss();
                let out = f.send();
                flight.insert((w.chunk, w.micro), f);
                Ok(out)
            }
            Pass::Backward => {
                let f = flight
                    .remove(&(w.chunk, w.micro))
                    .ok_or_else(|| out_of_plan(&w))?;
                let (grads, dx) = f.backward(received);
                acc.accumulate(model, grads);
                model.check_collectives()?;
                Ok(dx)
            }
        })?;
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
    pub fn evaluate<B: ParallelBackend>(
        &self,
        model: &CausalLm<B>,
        rows: &[Row],
        micro_batch: usize,
    ) -> Result<EvalResult> {
        let h = model.config.hidden_size;
        let device = model.device();
        let batches: Vec<Batch> = rows
            .chunks(micro_batch.max(1))
            .map(|chunk| collate(&chunk.iter().collect::<Vec<_>>()))
            .collect();
        let rows_of = |w: Work| model.local_rows(batches[w.micro].batch * batches[w.micro].seq);
        let mut sums = [0.0f64, 0.0];
        if !batches.is_empty() {
            let steps = self.steps(batches.len(), false)?;
            self.run(
                &steps,
                |w| [rows_of(w), h],
                &device,
                |w, received| {
                    let batch = &batches[w.micro];
                    let out = model.forward_stage(w.chunk, received, &inputs(batch), false);
                    model.check_collectives()?;
                    if !model.ends_in_head(w.chunk) {
                        return Ok(Some(out.cast(FloatDType::F32)));
                    }
                    sums[0] += model
                        .loss_of_logits(out, &batch.targets, 1.0)
                        .into_scalar()
                        .elem::<f64>();
                    sums[1] += supervised(&batch.targets) as f64;
                    Ok(None)
                },
            )?;
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

    /// Run this rank's `steps`: `work` gets the tensor received for it (none on the first
    /// virtual stage's forwards and the last's backwards) and returns what goes on (none
    /// where nothing does); `shape` is the shape of what travels for a piece of work
    /// (hidden states and their gradients, f32), which moves tensor to tensor on the
    /// pipeline group ([`parallel::device::send_recv`]).
    fn run<E: DeviceBackend>(
        &self,
        steps: &[Step],
        shape: impl Fn(Work) -> [usize; 2],
        device: &E::Device,
        mut work: impl FnMut(Work, Option<Tensor<E, 2>>) -> Result<Option<Tensor<E, 2>>>,
    ) -> Result<()> {
        let p = self.stage.count;
        let (prev, next) = ((self.stage.index + p - 1) % p, (self.stage.index + 1) % p);
        let mut received: HashMap<Work, Tensor<E, 2>> = HashMap::new();
        for step in steps {
            let out = match step.work {
                Some(w) => work(w, received.remove(&w))?,
                None => None,
            };
            let (down, up) = if step.send_down {
                (out, None)
            } else {
                (None, out)
            };
            if step.send_down != down.is_some() || step.send_up != up.is_some() {
                return Err(out_of_plan(step));
            }
            for (send, to, recv, from) in [
                (down, next, step.recv_down, prev),
                (up, prev, step.recv_up, next),
            ] {
                let expect = recv.map(|w| {
                    let shape = shape(w);
                    let e = Expect {
                        shape: shape.into(),
                        dtype: FloatDType::F32,
                    };
                    ((w, shape), (e, from))
                });
                let (w, expect) = match expect {
                    Some((w, e)) => (Some(w), Some(e)),
                    None => (None, None),
                };
                let send = send.map(|t| (t.cast(FloatDType::F32).into_primitive().tensor(), to));
                let got =
                    parallel::device::send_recv::<E>(self.comm.as_ref(), send, expect, device)?;
                if let (Some((w, _)), Some(t)) = (w, got) {
                    received.insert(w, Tensor::from_primitive(TensorPrimitive::Float(t)));
                }
            }
        }
        Ok(())
    }
}

/// Work that does not fit the plan (a bug, not a user error).
fn out_of_plan(what: &dyn std::fmt::Debug) -> Error {
    Error::Training {
        key: "parallel.schedule".into(),
        message: format!("{what:?} does not follow the pipeline plan"),
    }
}

/// A micro-batch between its forward and its backward on one stage.
///
/// Its graph starts from its own leaves for the parameters ([`own_leaves`]): graphs of
/// micro-batches in flight together share no node, so one's backward and burn 0.21's
/// cleanup after it cannot touch another's. (Sharing the parameter leaves, pp3 with 2
/// virtual stages came out with a different gradient in about one run of ten: burn's
/// graph cleanup depends on hash-map order, and its fix, burn PR #5645, came after 0.21.)
struct InFlight<'a, B: TrainBackend> {
    /// The stage's parameters as leaves of this micro-batch's graph only.
    model: CausalLm<B>,
    batch: &'a Batch,
    /// Where its layers draw dropout from.
    seed: u64,
    /// The received activations (a leaf requiring grad), not on the first stage; `None`
    /// under recomputation, which keeps them in `recomputed`.
    input: Option<Tensor<B, 2>>,
    /// Hidden states for the next stage, or the loss on the last.
    output: Output<B>,
    /// Under `training.recompute`: the chunk run without a graph, and on the last stage
    /// the head's input (a leaf the loss's graph starts from).
    recomputed: Option<(Recomputed<B>, Option<Tensor<B, 2>>)>,
}

enum Output<B: TrainBackend> {
    /// Hidden states for the next stage (graph mode: the chunk's graph hangs off them).
    Hidden(Tensor<B, 2>),
    /// Sent already, under recomputation: only their shape is needed again.
    Sent([usize; 2]),
    /// On the last stage: the loss (its value), the logits and their gradient, which the
    /// loss was taken for chunk by chunk at forward time (never all the logits in f32).
    Loss {
        value: f64,
        logits: Tensor<B, 2>,
        dlogits: Tensor<B, 2>,
    },
}

impl<'a, B: TrainBackend> InFlight<'a, B> {
    fn forward(
        model: &CausalLm<B>,
        chunk: usize,
        batch: &'a Batch,
        received: Option<Tensor<Inner<B>, 2>>,
        denominator: f64,
        (recompute, seed): (bool, u64),
    ) -> Self {
        let model = own_leaves(model);
        let inputs = Inputs {
            dropout_seed: Some(seed),
            ..inputs(batch)
        };
        let loss = |logits: Tensor<B, 2>| {
            let (value, dlogits) =
                loss_and_grad(&model, &logits, &batch.targets, denominator, None);
            Output::Loss {
                value: value.into_scalar().elem::<f64>(),
                logits,
                dlogits,
            }
        };
        if recompute {
            let (pass, out) = Recomputed::forward(&model, chunk, received, &inputs);
            let (output, head) = if model.ends_in_head(chunk) {
                let x = leaf(out);
                let logits = model.head(x.clone(), &model.context(&inputs, true));
                (loss(logits), Some(x))
            } else {
                (Output::Hidden(Tensor::from_inner(out)), None)
            };
            return Self {
                model,
                batch,
                seed,
                input: None,
                output,
                recomputed: Some((pass, head)),
            };
        }
        let input = received.map(|v| Tensor::<B, 2>::from_inner(v).require_grad());
        let out = model.forward_stage(chunk, input.clone(), &inputs, true);
        let output = if model.ends_in_head(chunk) {
            loss(out)
        } else {
            Output::Hidden(out)
        };
        Self {
            model,
            batch,
            seed,
            input,
            output,
            recomputed: None,
        }
    }

    /// What goes to the next stage (`None` on the last), after which a recomputed chunk
    /// keeps only the shape of its output.
    fn send(&mut self) -> Option<Tensor<Inner<B>, 2>> {
        let Output::Hidden(y) = &self.output else {
            return None;
        };
        let out = y.clone().inner();
        if self.recomputed.is_some() {
            self.output = Output::Sent(y.dims());
        }
        Some(out)
    }

    /// The loss this micro-batch added (0 but on the last stage).
    fn loss(&self) -> f64 {
        match &self.output {
            Output::Loss { value, .. } => *value,
            _ => 0.0,
        }
    }

    /// This stage's parameter gradients and the gradient of its input.
    fn backward(
        self,
        g: Option<Tensor<Inner<B>, 2>>,
    ) -> (GradientsParams, Option<Tensor<Inner<B>, 2>>) {
        let upstream = |dims: [usize; 2], device: &B::Device| {
            Tensor::<B, 2>::from_inner(g.unwrap_or_else(|| Tensor::zeros(dims, device)))
        };
        if let Some((pass, head)) = self.recomputed {
            let inputs = Inputs {
                dropout_seed: Some(self.seed),
                ..inputs(self.batch)
            };
            let ctx = self.model.context(&inputs, true);
            let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
            let g = match (self.output, head) {
                (
                    Output::Loss {
                        logits, dlogits, ..
                    },
                    Some(x),
                ) => backward(&self.model, &mut acc, &x, logits * dlogits),
                (Output::Sent(dims), None) => upstream(dims, &self.model.device()).inner(),
                _ => unreachable!("a recomputed chunk ends in the loss or has sent its output"),
            };
            let received = !pass.embedded();
            let dx = pass.backward(&self.model, &ctx, &inputs, g, &mut acc);
            return (acc.grads(), received.then_some(dx));
        }
        let grads = match self.output {
            Output::Loss {
                logits, dlogits, ..
            } => (logits * dlogits).sum().backward(),
            Output::Hidden(y) => {
                let g = upstream(y.dims(), &y.device());
                (y * g).sum().backward()
            }
            Output::Sent(_) => unreachable!("only a recomputed chunk drops its output"),
        };
        // A stage whose output does not depend on its input still answers with zeros, so
        // the stage before it is not left waiting.
        let dx = self.input.map(|x| {
            x.grad(&grads)
                .unwrap_or_else(|| Tensor::zeros(x.dims(), &x.device()))
        });
        (GradientsParams::from_grads(grads, &self.model), dx)
    }
}

/// `model` with every parameter a new leaf (same values, storage and [`ParamId`]s; those
/// that required grad still do).
fn own_leaves<B: TrainBackend>(model: &CausalLm<B>) -> CausalLm<B> {
    struct Detach;
    impl<B: burn::tensor::backend::AutodiffBackend> ModuleMapper<B> for Detach {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|t| {
                let trainable = t.is_require_grad();
                let t = t.detach();
                if trainable {
                    t.require_grad()
                } else {
                    t
                }
            })
        }
    }
    model.clone().map(&mut Detach)
}
