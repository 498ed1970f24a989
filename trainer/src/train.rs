//! One rank's training loop: micro-batches, gradient accumulation over a global batch
//! (shared out over the data ranks), the layout's collectives, clipping, AdamW and the
//! learning-rate schedule. [`crate::TrainerBuilder`] assembles a `Trainer` for any
//! dp×tp×pp×ep layout; the trainer reports its phase and every step to the process's
//! reporter itself (see `parallel::runtime`).

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use parallel::dp::{params_by_path, DataParallel, ParamInfo};
use parallel::runtime::{Phase, Report, StepReport};
use parallel::{Collectives, Mesh, ReduceOp};

use crate::backprop::mix;
use crate::collective::TrainBackend;
use crate::data::{collate, Batch, Epochs, Row};
use crate::error::{Error, Result};
use crate::eval::{check_vocab, evaluate_trained, EvalResult};
use crate::loss::{supervised, IGNORE};
use crate::model::{CausalLm, ExpertParallel, TensorParallel};
use crate::optim::{clip_to, grad_sq_tensor};
use crate::options::TrainOptions;
use crate::pipeline::Pipeline;
use crate::state::Writes;

type Optim<B> = OptimizerAdaptor<AdamW, CausalLm<B>, B>;

/// The parallel pieces a layout adds to training (each `None` when its axis is 1).
#[derive(Default)]
pub(crate) struct Parts {
    pub dp: Option<DataParallel>,
    pub tp: Option<TensorParallel>,
    pub ep: Option<ExpertParallel>,
    pub pipeline: Option<Pipeline>,
}

/// A model (this rank's part of it), its optimizer and a position in the data stream.
pub struct Trainer<B: TrainBackend> {
    /// Present between steps (taken only while the optimizer steps).
    model: Option<CausalLm<B>>,
    optim: Optim<B>,
    rows: Vec<Row>,
    opts: TrainOptions,
    shuffle: bool,
    step: u64,
    epochs: Epochs,
    mesh: Mesh,
    parts: Parts,
    writes: Writes,
    /// Why the trainer cannot go on (a collective failed after the optimizer step, so the
    /// replicas may differ); every later step returns it.
    broken: Option<String>,
    /// Where its steps and phases go.
    report: Report,
    /// The most device memory seen held after a step.
    peak_mem: Option<u64>,
}

impl<B: TrainBackend> Trainer<B> {
    /// Assemble a trainer: see [`crate::TrainerBuilder`].
    pub fn builder(
        model: CausalLm<B>,
        rows: Vec<Row>,
        options: &TrainOptions,
    ) -> crate::TrainerBuilder<B> {
        crate::TrainerBuilder::new(model, rows, options)
    }

    /// The builder's last step: `model` already cut for this rank of `mesh`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        model: CausalLm<B>,
        rows: Vec<Row>,
        opts: TrainOptions,
        shuffle: bool,
        mesh: Mesh,
        parts: Parts,
        writes: Writes,
        report: Report,
    ) -> Result<Self> {
        opts.validate()?;
        if rows.is_empty() {
            return Err(Error::Training {
                key: "data.train".into(),
                message: "the dataset has no rows".into(),
            });
        }
        check_vocab(&rows, model.config.vocab_size)?;
        B::seed(&model.device(), opts.seed);
        let epochs = Epochs::new(rows.len(), opts.seed, shuffle);
        Ok(Self {
            model: Some(model),
            optim: opts.optimizer(),
            rows,
            opts,
            shuffle,
            step: 0,
            epochs,
            mesh,
            parts,
            writes,
            broken: None,
            report,
            peak_mem: None,
        })
    }

    /// Where this trainer reports its steps and phases (and its caller may send events).
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// This rank's place in the layout and its groups.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// Elements of the trainable parameters this rank keeps optimizer state for (AdamW
    /// holds two moments of each): the whole trainable model, or this rank's share under
    /// ZeRO-1. 0 before the first step.
    pub fn optimizer_state_elems(&self) -> usize {
        let held = self.optim.to_record();
        params_by_path(self.model())
            .iter()
            .filter(|p| held.contains_key(&p.id))
            .map(ParamInfo::numel)
            .sum()
    }

    /// Elements of the parameters this rank holds, trainable or not.
    pub fn param_elems(&self) -> usize {
        params_by_path(self.model())
            .iter()
            .map(ParamInfo::numel)
            .sum()
    }

    /// Collectives issued so far on the data-parallel group (0 without one).
    pub fn collective_seq(&self) -> u64 {
        self.parts.dp.as_ref().map_or(0, |dp| dp.comm().seq())
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

    /// What this rank writes of a checkpoint (each box of the model and optimizer state
    /// goes to disk from one rank only), copied to the host.
    pub fn snapshot(&self) -> crate::state::Snapshot {
        crate::state::snapshot(self.model(), &self.optim, self.writes)
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
        let owned = self.parts.dp.as_ref().and_then(|dp| dp.owned(self.model()));
        let restored = crate::state::restore(self.model(), &self.optim, ckpt, owned.as_ref())?;
        let model = self.model.take().expect("model is present between steps");
        let optim = std::mem::replace(&mut self.optim, self.opts.optimizer());
        let (model, optim) = restored.apply(model, optim);
        self.model = Some(model);
        self.optim = optim;
        self.step = step;
        self.epochs = Epochs::resume(
            self.rows.len(),
            self.opts.seed,
            self.shuffle,
            epoch,
            offset as usize,
        );
        Ok(())
    }

    /// One optimizer step over one global batch, reported to the process's reporter.
    pub fn step(&mut self) -> Result<StepReport> {
        if let Some(why) = &self.broken {
            return Err(Error::Broken(why.clone()));
        }
        self.report.set_phase(Phase::Train);
        let start = Instant::now();
        // Random draws (LoRA dropout) depend on the step only, so a resumed run draws what
        // an uninterrupted one would.
        B::seed(&self.model().device(), self.step_seed());
        let picked = self.next_rows(self.opts.global_batch);
        // Every data rank draws the same global batch and keeps its contiguous share of it.
        let (rank, ranks) = (self.mesh.data.rank(), self.mesh.data.size());
        let share = picked.len() / ranks;
        let batches: Vec<Batch> = picked[rank * share..(rank + 1) * share]
            .chunks(self.opts.micro_batch)
            .map(|ids| collate(&ids.iter().map(|&i| &self.rows[i]).collect::<Vec<_>>()))
            .collect();
        let denominator: usize = picked
            .iter()
            .map(|&i| supervised(&self.rows[i].targets))
            .sum();
        let tokens: usize = picked.iter().map(|&i| self.rows[i].tokens.len()).sum();
        let (loss, grad_norm, grads, grad_elems) =
            self.forward_backward(self.model(), &batches, denominator.max(1) as f64)?;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            return Err(Error::NonFinite {
                step: self.step + 1,
                loss,
                grad_norm,
            });
        }
        let lr = self.opts.lr_at(self.step);
        self.apply(lr, grads)?;
        self.step += 1;
        let step_time = start.elapsed().as_secs_f64();
        let report = StepReport {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens,
            supervised_tokens: denominator,
            step_time,
            tokens_per_s: tokens as f64 / step_time.max(1e-9),
            grad_elems,
            param_elems: self.param_elems(),
            optimizer_state_elems: self.optimizer_state_elems(),
            peak_mem_bytes: self.peak_memory(),
            compute_dtype: Some(format!("{:?}", self.model().compute).to_lowercase()),
        };
        self.report.step(&report, self.collective_seq());
        Ok(report)
    }

    /// The optimizer step (of this rank's share under ZeRO-1, whose new values are then
    /// all-gathered). A failed all-gather leaves the trainer unusable, its model in place.
    fn apply(&mut self, lr: f64, mut grads: GradientsParams) -> Result<()> {
        let model = self.model.take().expect("model is present between steps");
        if let Some(dp) = &self.parts.dp {
            dp.keep_owned_grads(&model, &mut grads);
        }
        let model = self.optim.step(lr, model, grads);
        let (model, synced) = match &self.parts.dp {
            Some(dp) => dp.sync_owned_params(model),
            None => (model, Ok(())),
        };
        self.model = Some(model);
        synced.map_err(|e| {
            let why = format!(
                "step {}: ZeRO-1's parameter all-gather failed: {e}",
                self.step + 1
            );
            self.broken = Some(why);
            e.into()
        })
    }

    /// Forward and backward over this rank's micro-batches, gradients completed across the
    /// groups, clipped: `(global loss, global gradient norm before clipping, gradients,
    /// gradient elements of the replica)` (under ZeRO-1 the gradients are this rank's
    /// share; the count is what an all-reduce would have left, as the step reports it).
    /// The loss and the norm come to the host together, the step's one wait for the device
    /// (beside what the collectives of a layout need).
    fn forward_backward(
        &self,
        model: &CausalLm<B>,
        batches: &[Batch],
        denominator: f64,
    ) -> Result<(f64, f64, GradientsParams, usize)> {
        // This rank's draws for the step (its micro-batches' dropout).
        let seed = mix(mix(self.opts.seed, self.step), self.mesh.data.rank() as u64);
        let (loss, mut grads) = match &self.parts.pipeline {
            Some(p) => {
                let how = (self.opts.recompute, seed);
                let (loss, grads) = p.forward_backward(model, batches, denominator, how)?;
                (Loss::<B>::Host(loss), grads)
            }
            None => {
                let (loss, grads) =
                    accumulate(model, batches, denominator, self.opts.recompute, seed)?;
                (Loss::Device(loss), grads)
            }
        };
        if let Some(tp) = &self.parts.tp {
            tp.complete_grads(model, &mut grads)?;
        }
        let grad_elems = match &self.parts.dp {
            Some(dp) => dp.reduce_grads(model, &mut grads)?,
            None => params_by_path(model)
                .iter()
                .filter(|p| parallel::dp::has_grad::<B>(&grads, p))
                .map(ParamInfo::numel)
                .sum(),
        };
        // Reduce-scattered (ZeRO-1), a gradient is held by its owner alone: each is counted
        // where it is held (once per tensor-parallel slice and tied pair), summed over every
        // rank; else each replica holds them all and the sum is over one replica.
        let scattered = self.parts.dp.as_ref().is_some_and(|dp| dp.scatters());
        let p = &self.parts;
        let counted = |id: &_| {
            p.tp.as_ref().is_none_or(|tp| tp.counts_in_norm(id))
                && (scattered || p.ep.as_ref().is_none_or(|ep| ep.counts_in_norm(id)))
                && p.pipeline.as_ref().is_none_or(|p| p.counts_in_norm(id))
        };
        let sq = grad_sq_tensor::<B, _>(model, &grads, counted);
        let (mut loss_sum, mut sq) = loss.read_with(sq, &model.device());
        if let Some(p) = &self.parts.pipeline {
            // Only the last stage computed the loss.
            let mut sum = [loss_sum];
            p.comm().all_reduce(&mut sum, ReduceOp::Sum)?;
            loss_sum = sum[0];
        }
        if let Some(dp) = &self.parts.dp {
            let mut sum = [loss_sum];
            dp.comm().all_reduce(&mut sum, ReduceOp::Sum)?;
            loss_sum = sum[0];
        }
        // Summed over the ranks that together hold one whole replica of the model (or, its
        // gradients scattered, over all of them).
        let holders = if scattered {
            &self.mesh.world
        } else {
            &self.mesh.model
        };
        if holders.size() > 1 {
            let mut s = [sq];
            holders.all_reduce(&mut s, ReduceOp::Sum)?;
            sq = s[0];
        }
        let grad_norm = sq.sqrt();
        if grad_norm.is_finite() {
            clip_to(model, &mut grads, grad_norm, self.opts.clip());
        }
        Ok((loss_sum, grad_norm, grads, grad_elems))
    }

    /// What this step's random draws start from: a resumed run draws what an
    /// uninterrupted one would.
    fn step_seed(&self) -> u64 {
        self.opts.seed.wrapping_add(self.step)
    }

    /// The most device memory held after any step so far (see
    /// [`crate::ParallelBackend::memory_reserved`]).
    fn peak_memory(&mut self) -> Option<u64> {
        let now = B::memory_reserved(&self.model().device());
        self.peak_mem = self.peak_mem.max(now);
        self.peak_mem
    }

    /// Mean token loss of `rows` under the current weights, over the whole job: every data
    /// rank evaluates its contiguous share (tensor- and pipeline-parallel ranks the same
    /// share together) and the sums are all-reduced, so every rank gets the result for all
    /// of `rows`. Every rank must call it. Under expert parallelism every rank must run as
    /// many forward passes as the others: a shorter share is topped up with rows that
    /// supervise nothing.
    ///
    /// An evaluation between steps is part of training (a hang there is a hang, and it
    /// counts against the hang limit like a step); one after the last step is the `Eval`
    /// phase, which the coordinator does not watch for hangs.
    pub fn evaluate(&self, rows: &[Row]) -> Result<EvalResult> {
        if self.step >= self.opts.max_steps {
            self.report.set_phase(Phase::Eval);
        }
        self.evaluate_shared(rows)
    }

    fn evaluate_shared(&self, rows: &[Row]) -> Result<EvalResult> {
        let (rank, world) = (self.mesh.data.rank(), self.mesh.data.size());
        let share = |r: usize| r * rows.len() / world;
        let mut mine = rows[share(rank)..share(rank + 1)].to_vec();
        if self.mesh.ep.size() > 1 {
            let longest = (0..world)
                .map(|r| share(r + 1) - share(r))
                .max()
                .unwrap_or(0);
            let blank = rows.first().map(|r| Row {
                targets: vec![IGNORE; r.targets.len()],
                ..r.clone()
            });
            mine.extend(blank.into_iter().cycle().take(longest - mine.len()));
        }
        let micro_batch = self.opts.micro_batch;
        let r = match &self.parts.pipeline {
            Some(p) => {
                check_vocab(&mine, self.model().config.vocab_size)?;
                p.evaluate(&self.model().valid(), &mine, micro_batch)?
            }
            None => evaluate_trained(self.model(), &mine, micro_batch)?,
        };
        let mut sums = [r.loss * r.tokens as f64, r.tokens as f64];
        self.mesh.data.all_reduce(&mut sums, ReduceOp::Sum)?;
        let tokens = sums[1] as usize;
        Ok(EvalResult {
            loss: if tokens == 0 { 0.0 } else { sums[0] / sums[1] },
            tokens,
        })
    }

    /// The whole trained model on rank 0 of the job, for export (`None` elsewhere). Every
    /// rank must call it: tensor slices and experts are gathered over their groups, and
    /// under pipeline parallelism the first replica's stages send their layers to rank 0,
    /// which puts them into `whole()` (a model with every layer, e.g. loaded again).
    pub fn into_whole_model(
        self,
        whole: impl FnOnce() -> Result<CausalLm<B>>,
    ) -> Result<Option<CausalLm<B>>> {
        self.report.set_phase(Phase::Export);
        let mesh = self.mesh.clone();
        let lead = mesh.world.rank() == 0;
        let model = crate::model::shard::unshard(self.into_model())?;
        let model = crate::model::experts::gather(model)?;
        if mesh.layout.pp == 1 {
            return Ok(lead.then_some(model));
        }
        let c = mesh.coords;
        if (c.tp, c.ep, c.dp) != (0, 0, 0) {
            return Ok(None);
        }
        let whole = if lead { Some(whole()?) } else { None };
        crate::pipeline::gather_stages(&model, mesh.pp.as_ref(), whole)
    }
}

/// Forward and backward of each micro-batch in turn (see [`crate::backprop`]), gradients
/// summed; the loss summed on the device. Micro-batch `j` draws its dropout from
/// `mix(seed, j)`.
fn accumulate<B: TrainBackend>(
    model: &CausalLm<B>,
    batches: &[Batch],
    denominator: f64,
    recompute: bool,
    seed: u64,
) -> Result<(Tensor<B::InnerBackend, 1>, GradientsParams)> {
    let mut accumulated = GradientsAccumulator::<CausalLm<B>>::new();
    let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    for (j, batch) in batches.iter().enumerate() {
        let micro_seed = mix(seed, j as u64);
        let (loss, grads) =
            crate::backprop::micro_batch(model, batch, denominator, recompute, micro_seed);
        model.check_collectives()?;
        accumulated.accumulate(model, grads);
        loss_sum = Some(match loss_sum {
            Some(sum) => sum + loss,
            None => loss,
        });
    }
    let loss_sum = loss_sum.unwrap_or_else(|| Tensor::zeros([1], &model.device()));
    Ok((loss_sum, accumulated.grads()))
}

/// A step's loss: read already (a pipeline's), or still on the device.
enum Loss<B: AutodiffBackend> {
    Host(f64),
    Device(Tensor<B::InnerBackend, 1>),
}

impl<B: AutodiffBackend> Loss<B> {
    /// The loss and the squared gradient norm (0 without one), in one read of the device.
    fn read_with(self, sq: Option<Tensor<B::InnerBackend, 1>>, device: &B::Device) -> (f64, f64) {
        let zero = || Tensor::<B::InnerBackend, 1>::zeros([1], device);
        let (host, loss) = match self {
            Loss::Host(v) => (Some(v), zero()),
            Loss::Device(t) => (None, t),
        };
        let both = Tensor::cat(
            vec![
                loss.cast(burn::tensor::FloatDType::F32),
                sq.unwrap_or_else(zero).cast(burn::tensor::FloatDType::F32),
            ],
            0,
        );
        let values: Vec<f64> = both
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap_or_default();
        let at = |i: usize| values.get(i).copied().unwrap_or(f64::NAN);
        (host.unwrap_or_else(|| at(0)), at(1))
    }
}
