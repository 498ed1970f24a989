//! The training loop: micro-batches, gradient accumulation over a global batch, clipping,
//! AdamW, schedule; data parallel across processes with [`Trainer::with_data_parallel`].

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use std::sync::Arc;

use burn::tensor::ElementConversion;
use parallel::dp::DataParallel;
use parallel::{Collectives, Communicator, ReduceOp};

use crate::collective::{Collective, TrainBackend};
use crate::data::{collate, Batch, Epochs, Row};
use crate::error::{Error, Result};
use crate::loss::supervised;
use crate::model::{CausalLm, ExpertParallel, Inputs, TensorParallel};
use crate::optim::{clip_to, grad_sq_sum, AdamWOptions, Schedule};
use crate::pipeline::Pipeline;

/// How to train: batch sizes, optimizer, schedule, clipping, seed.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// Rows (packed or single samples) per optimizer step.
    pub global_batch: usize,
    /// Rows per forward/backward pass; `global_batch / micro_batch` passes are accumulated.
    pub micro_batch: usize,
    pub schedule: Schedule,
    pub adamw: AdamWOptions,
    /// Global L2 norm above which gradients are scaled down; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    /// Seeds data order and dropout.
    pub seed: u64,
    /// Shuffle rows each epoch (deterministically from `seed`).
    pub shuffle: bool,
}

impl TrainOptions {
    pub fn validate(&self, rows: usize) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(Error::Training {
                key: key.into(),
                message,
            })
        };
        if self.micro_batch == 0 {
            return bad("micro_batch", "must be at least 1".into());
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.micro_batch) {
            return bad(
                "global_batch",
                format!(
                    "{} must be a positive multiple of micro_batch {}",
                    self.global_batch, self.micro_batch
                ),
            );
        }
        if rows == 0 {
            return bad("data.train", "the dataset has no rows".into());
        }
        if !(self.schedule.lr.is_finite() && self.schedule.lr > 0.0) {
            return bad(
                "lr",
                format!("{} must be a positive number", self.schedule.lr),
            );
        }
        // Written so that NaN is refused too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if self.max_grad_norm.is_some_and(|m| !(m > 0.0)) {
            return bad("max_grad_norm", "must be positive".into());
        }
        self.adamw.validate()
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// 1-based number of the step just taken.
    pub step: u64,
    /// Mean cross-entropy over the supervised tokens of the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (padding excluded) and supervised.
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// Gradient elements this rank computed (its shard of the model's trainable part).
    pub grad_elems: usize,
    pub seconds: f64,
}

/// A model, its optimizer and a position in the data stream.
pub struct Trainer<B: TrainBackend> {
    model: Option<CausalLm<B>>,
    optim: OptimizerAdaptor<AdamW, CausalLm<B>, B>,
    rows: Vec<Row>,
    opts: TrainOptions,
    step: u64,
    epochs: Epochs,
    dp: Option<DataParallel>,
    tp: Option<TensorParallel>,
    ep: Option<ExpertParallel>,
    pipeline: Option<Pipeline>,
    /// The ranks holding one whole replica of the model, over which the squared gradient
    /// norm is summed (`None`: this rank holds all of it).
    replica: Option<Arc<dyn Communicator>>,
}

impl<B: TrainBackend> Trainer<B> {
    pub fn new(model: CausalLm<B>, rows: Vec<Row>, opts: TrainOptions) -> Result<Self> {
        opts.validate(rows.len())?;
        check_vocab(&rows, model.config.vocab_size)?;
        B::seed(&model.device(), opts.seed);
        let epochs = Epochs::new(rows.len(), opts.seed, opts.shuffle);
        Ok(Self {
            model: Some(model),
            optim: opts.adamw.build(),
            rows,
            opts,
            step: 0,
            epochs,
            dp: None,
            tp: None,
            ep: None,
            pipeline: None,
            replica: None,
        })
    }

    /// Train data parallel over `dp`'s group: each rank takes an equal, contiguous share of
    /// every global batch (by global row index), gradients are summed across ranks, so the
    /// group takes the same steps as one process with the same `global_batch`.
    /// `global_batch` must be a multiple of `micro_batch × ranks`.
    pub fn with_data_parallel(mut self, dp: DataParallel) -> Result<Self> {
        let per_rank = self.opts.micro_batch * dp.size();
        if !self.opts.global_batch.is_multiple_of(per_rank) {
            return Err(Error::Training {
                key: "global_batch".into(),
                message: format!(
                    "{} must be a multiple of micro_batch {} × data-parallel ranks {}",
                    self.opts.global_batch,
                    self.opts.micro_batch,
                    dp.size()
                ),
            });
        }
        self.dp = Some(dp);
        Ok(self)
    }

    /// Train a model cut by [`crate::model::shard::shard`]: gradients of parameters held
    /// partly or in copies are completed over the tensor-parallel group, and the global
    /// gradient norm is summed over `replica`, the ranks that together hold one whole model.
    pub fn with_tensor_parallel(
        mut self,
        tp: TensorParallel,
        replica: Arc<dyn Communicator>,
    ) -> Self {
        self.tp = Some(tp);
        self.replica = Some(replica);
        self
    }

    /// Train a model whose experts are spread by [`crate::model::experts::spread`] (the data
    /// parallelism must reduce expert gradients over dp only: see
    /// [`DataParallel::with_narrow_group`]); `replica` as for
    /// [`Trainer::with_tensor_parallel`].
    pub fn with_expert_parallel(
        mut self,
        ep: ExpertParallel,
        replica: Arc<dyn Communicator>,
    ) -> Self {
        self.ep = Some(ep);
        self.replica = Some(replica);
        self
    }

    /// Train one stage of a pipeline (a model cut by [`crate::pipeline::keep_stage`]);
    /// `replica` as for [`Trainer::with_tensor_parallel`].
    pub fn with_pipeline(mut self, pipeline: Pipeline, replica: Arc<dyn Communicator>) -> Self {
        self.pipeline = Some(pipeline);
        self.replica = Some(replica);
        self
    }

    /// Mean token loss of `rows` under the current weights (every stage of a pipeline
    /// takes part; the result is the same on all of them).
    pub fn evaluate(&self, rows: &[Row], micro_batch: usize) -> Result<EvalResult> {
        match &self.pipeline {
            Some(p) => {
                check_vocab(rows, self.model().config.vocab_size)?;
                p.evaluate(&self.model().valid(), rows, micro_batch)
            }
            None => evaluate_trained(self.model(), rows, micro_batch),
        }
    }

    /// Elements of the trainable parameters this rank keeps optimizer state for (AdamW
    /// holds two moments of each): the whole trainable model, or this rank's share under
    /// ZeRO-1. 0 before the first step.
    pub fn optimizer_state_elems(&self) -> usize {
        use burn::optim::Optimizer as _;
        let held = self.optim.to_record();
        parallel::dp::params_by_path(self.model())
            .iter()
            .filter(|p| held.contains_key(&p.id))
            .map(parallel::dp::ParamInfo::numel)
            .sum()
    }

    /// Elements of the parameters this rank holds, trainable or not.
    pub fn param_elems(&self) -> usize {
        parallel::dp::params_by_path(self.model())
            .iter()
            .map(parallel::dp::ParamInfo::numel)
            .sum()
    }

    /// Collectives issued so far on the data-parallel group (0 without one).
    pub fn collective_seq(&self) -> u64 {
        self.dp.as_ref().map_or(0, |dp| dp.comm().seq())
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    pub fn model(&self) -> &CausalLm<B> {
        // Only `step` takes the model out, and it always puts it back.
        self.model.as_ref().expect("model is present between steps")
    }

    pub fn into_model(mut self) -> CausalLm<B> {
        self.model.take().expect("model is present between steps")
    }

    /// The next `n` rows of the (shuffled, repeating) data stream; a batch runs on into the
    /// next epoch rather than coming up short.
    fn next_rows(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.extend(self.epochs.next_batch(n - out.len()).1);
        }
        out
    }

    /// The position to save with a checkpoint: step, data position (epoch, rows handed out
    /// in it, global sample index) and seed.
    pub fn position(&self) -> serde_json::Value {
        let (epoch, offset) = self.epochs.position();
        serde_json::json!({"step": self.step, "epoch": epoch, "offset": offset,
                           "samples_seen": self.step * self.opts.global_batch as u64,
                           "seed": self.opts.seed,
                           "rng": "the backend is seeded with seed + step before every step"})
    }

    /// What this rank writes of a checkpoint, copied to the host.
    pub fn snapshot(&self, writes: crate::state::Writes) -> crate::state::Snapshot {
        crate::state::snapshot(self.model(), &self.optim, writes)
    }

    /// Go on from `ckpt` (saved by this job at any layout): this rank's parameters and
    /// AdamW state, the step and the data position.
    pub fn restore(&mut self, ckpt: &checkpoint::sharded::Checkpoint) -> Result<()> {
        let state = &ckpt.manifest.state;
        let field = |k: &str| {
            state[k].as_u64().ok_or_else(|| Error::Training {
                key: "checkpoint".into(),
                message: format!("{}: the manifest's state has no `{k}`", ckpt.dir.display()),
            })
        };
        let (step, epoch, offset) = (field("step")?, field("epoch")?, field("offset")?);
        // Everything is read and checked before the model is touched: a bad checkpoint
        // leaves the trainer as it was.
        let owned = self.dp.as_ref().and_then(|dp| dp.owned(self.model()));
        let restored = crate::state::restore(self.model(), &self.optim, ckpt, owned.as_ref())?;
        let model = self.model.take().expect("model is present between steps");
        let optim = std::mem::replace(&mut self.optim, self.opts.adamw.build());
        let (model, optim) = restored.apply(model, optim);
        self.model = Some(model);
        self.optim = optim;
        self.step = step;
        self.epochs = Epochs::resume(
            self.rows.len(),
            self.opts.seed,
            self.opts.shuffle,
            epoch,
            offset as usize,
        );
        Ok(())
    }

    /// One optimizer step over one global batch.
    pub fn step(&mut self) -> Result<StepStats> {
        let start = Instant::now();
        // Random draws (LoRA dropout) depend on the step only, so a resumed run draws what
        // an uninterrupted one would.
        let device = self.model().device();
        B::seed(&device, self.opts.seed.wrapping_add(self.step));
        let picked = self.next_rows(self.opts.global_batch);
        // Every rank draws the same global batch and keeps its contiguous share of it.
        let (rank, ranks) = self.dp.as_ref().map_or((0, 1), |dp| (dp.rank(), dp.size()));
        let share = picked.len() / ranks;
        let mine = &picked[rank * share..(rank + 1) * share];
        let batches: Vec<Batch> = mine
            .chunks(self.opts.micro_batch)
            .map(|ids| collate(&ids.iter().map(|&i| &self.rows[i]).collect::<Vec<_>>()))
            .collect();
        let denominator: usize = picked
            .iter()
            .map(|&i| supervised(&self.rows[i].targets))
            .sum();
        let tokens: usize = picked.iter().map(|&i| self.rows[i].tokens.len()).sum();
        let model = self.model.take().expect("model is present between steps");
        let (loss_sum, grad_norm, grads) =
            match self.forward_backward(&model, &batches, denominator.max(1) as f64) {
                Ok(v) => v,
                Err(e) => {
                    // Leave the model and optimizer as they were before this step.
                    self.model = Some(model);
                    return Err(e);
                }
            };
        if !(loss_sum.is_finite() && grad_norm.is_finite()) {
            self.model = Some(model);
            return Err(Error::NonFiniteLoss {
                step: self.step + 1,
                loss: if loss_sum.is_finite() {
                    grad_norm
                } else {
                    loss_sum
                },
            });
        }
        let lr = self.opts.schedule.lr_at(self.step);
        self.step += 1;
        let mut grads = grads;
        let grad_elems = parallel::dp::params_by_path(&model)
            .iter()
            .filter(|p| parallel::dp::has_grad::<B>(&grads, p))
            .map(parallel::dp::ParamInfo::numel)
            .sum();
        let model = match &self.dp {
            Some(dp) => {
                dp.keep_owned_grads(&model, &mut grads);
                dp.sync_owned_params(self.optim.step(lr, model, grads))?
            }
            None => self.optim.step(lr, model, grads),
        };
        self.model = Some(model);
        Ok(StepStats {
            step: self.step,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens,
            supervised_tokens: denominator,
            grad_elems,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

impl<B: TrainBackend> Trainer<B> {
    /// Forward and backward over this rank's micro-batches, gradients completed across the
    /// groups, clipped: `(global loss, global gradient norm before clipping, gradients)`.
    fn forward_backward(
        &self,
        model: &CausalLm<B>,
        batches: &[Batch],
        denominator: f64,
    ) -> Result<(f64, f64, GradientsParams)> {
        let (mut loss_sum, mut grads) = match &self.pipeline {
            Some(p) => {
                let (loss, grads) = p.forward_backward(model, batches, denominator)?;
                // Only the last stage computed the loss.
                let mut sum = [loss];
                p.comm().all_reduce(&mut sum, ReduceOp::Sum)?;
                (sum[0], grads)
            }
            None => self.accumulate(model, batches, denominator)?,
        };
        if let Some(tp) = &self.tp {
            tp.complete_grads(model, &mut grads)?;
        }
        if let Some(dp) = &self.dp {
            dp.all_reduce_grads(model, &mut grads)?;
            let mut sum = [loss_sum];
            dp.comm().all_reduce(&mut sum, ReduceOp::Sum)?;
            loss_sum = sum[0];
        }
        let counted = |id: &_| {
            self.tp.as_ref().is_none_or(|tp| tp.counts_in_norm(id))
                && self.ep.as_ref().is_none_or(|ep| ep.counts_in_norm(id))
                && self.pipeline.as_ref().is_none_or(|p| p.counts_in_norm(id))
        };
        let mut sq = [grad_sq_sum(model, &grads, counted)];
        if let Some(replica) = &self.replica {
            replica.all_reduce(&mut sq, ReduceOp::Sum)?;
        }
        let grad_norm = sq[0].sqrt();
        if grad_norm.is_finite() {
            clip_to(model, &mut grads, grad_norm, self.opts.max_grad_norm);
        }
        Ok((loss_sum, grad_norm, grads))
    }

    /// Forward and backward of each micro-batch in turn, gradients summed.
    fn accumulate(
        &self,
        model: &CausalLm<B>,
        batches: &[Batch],
        denominator: f64,
    ) -> Result<(f64, GradientsParams)> {
        let mut accumulated = GradientsAccumulator::<CausalLm<B>>::new();
        let mut loss_sum = 0.0;
        for batch in batches {
            let loss = model.loss(&inputs(batch), &batch.targets, denominator, true);
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), model);
            model.check_collectives()?;
            accumulated.accumulate(model, grads);
        }
        Ok((loss_sum, accumulated.grads()))
    }
}

/// Host-side view of a batch for [`CausalLm::forward`].
pub fn inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        batch: batch.batch,
        seq: batch.seq,
        tokens: &batch.tokens,
        positions: &batch.positions,
        segments: &batch.segments,
    }
}

/// Every token and target id must be inside the vocabulary.
pub fn check_vocab(rows: &[Row], vocab: usize) -> Result<()> {
    for (r, row) in rows.iter().enumerate() {
        let bad_token = row
            .tokens
            .iter()
            .find(|&&t| t as usize >= vocab)
            .map(|&t| i64::from(t));
        let bad_target = row
            .targets
            .iter()
            .find(|&&t| t != crate::loss::IGNORE && (t < 0 || t as usize >= vocab));
        if let Some(id) = bad_token.or(bad_target.copied()) {
            return Err(Error::Training {
                key: "data".into(),
                message: format!(
                    "row {r}: token id {id} is outside the model's vocabulary of {vocab}"
                ),
            });
        }
    }
    Ok(())
}

/// Mean token loss of a model over a set of rows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub tokens: usize,
}

/// Mean cross-entropy over all supervised tokens of `rows`, `micro_batch` rows at a time.
pub fn evaluate<B: Collective>(
    model: &CausalLm<B>,
    rows: &[Row],
    micro_batch: usize,
) -> Result<EvalResult> {
    check_vocab(rows, model.config.vocab_size)?;
    let mut sum = 0.0;
    let mut tokens = 0;
    for chunk in rows.chunks(micro_batch.max(1)) {
        let batch = collate(&chunk.iter().collect::<Vec<_>>());
        sum += model
            .loss(&inputs(&batch), &batch.targets, 1.0, false)
            .into_scalar()
            .elem::<f64>();
        tokens += supervised(&batch.targets);
        model.check_collectives()?;
    }
    Ok(EvalResult {
        loss: if tokens == 0 {
            0.0
        } else {
            sum / tokens as f64
        },
        tokens,
    })
}

/// [`evaluate`] on the inner (non-autodiff) backend of a training model.
pub fn evaluate_trained<B: TrainBackend>(
    model: &CausalLm<B>,
    rows: &[Row],
    micro_batch: usize,
) -> Result<EvalResult> {
    evaluate(&model.valid(), rows, micro_batch)
}
