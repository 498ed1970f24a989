//! A trainer for this rank of any dp×tp×pp×ep layout, in one call: the job file's
//! `[parallel]` section ([`ParallelOptions`]) and [`TrainerBuilder`], which checks the
//! layout against the model and the batch once, then cuts the model into this rank's
//! pipeline stage, its experts and its tensor slices and wires data parallelism (ZeRO-1
//! optionally), expert and tensor parallelism and the pipeline schedule, in the one order
//! that works (torchtitan's `parallelize_llama`).
//!
//! The crate's documentation has an example; `examples/parallel_custom.rs` a whole loop.

use parallel::dp::DataParallel;
use parallel::runtime::Report;
use parallel::{Layout, LayoutError, Mesh, RankContext};
use serde::{Deserialize, Serialize};

use crate::collective::{Group, TrainBackend};
use crate::data::Row;
use crate::error::{Error, Result};
use crate::model::experts::{self, is_expert_path, ExpertParallel};
use crate::model::{CausalLm, ModelConfig};
use crate::options::TrainOptions;
use crate::pipeline::{self, schedule, Pipeline, PipelineSchedule};
use crate::state::Writes;
use crate::train::{Parts, Trainer};

/// Who picks the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The layout as written.
    Manual,
    /// The strategy search picks dp, tp, pp, ep, the micro-batch, ZeRO-1 and virtual
    /// stages for the world the job is launched on; values set other than 1/false pin
    /// that choice.
    Auto,
}

/// How a job is laid out over its ranks (the job file's `[parallel]` section). Every
/// default is declared in [`Default`]; serde fills a missing key from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelOptions {
    /// Data-parallel ranks; by default the world size divided by tp × pp × ep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp: Option<usize>,
    /// Tensor-parallel ranks: attention heads, MLP columns and the vocabulary are split
    /// over them (Megatron's layout). Must divide the ranks per node.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Expert-parallel ranks (Mixtral): experts are spread over them; carved out of data
    /// parallelism as in Megatron (dense weights are replicated over dp × ep).
    pub ep: usize,
    /// Rows per micro-batch; when given it takes precedence over `training.micro_batch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// Pipeline schedule: 1F1B, GPipe, or interleaved 1F1B over `virtual_stages` chunks
    /// of layers per rank.
    pub schedule: PipelineSchedule,
    /// Chunks of layers per pipeline rank under the interleaved schedule (Megatron's
    /// virtual pipeline stages); 2 when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_stages: Option<usize>,
    /// Layers of each pipeline stage, set by hand (`pp` entries summing to the layers, or
    /// `pp × virtual_stages` in pipeline order when interleaved); by default balanced by
    /// cost (the head counts on the last stage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_layers: Option<Vec<usize>>,
    /// Sequence parallelism (Megatron's `--sequence-parallel`, with tp > 1): norms and
    /// residuals run on each tensor-parallel rank's chunk of the tokens.
    pub sequence_parallel: bool,
    /// ZeRO-1: shard AdamW state across data-parallel ranks (gradients reduce-scattered to
    /// their owners, each rank steps the parameters it owns, then they are all-gathered;
    /// experts' state across the dp ranks holding them).
    pub zero1: bool,
    /// MiB of f32 gradients per data-parallel bucket (PyTorch DDP's `bucket_cap_mb`,
    /// default 25): each bucket is one collective.
    pub bucket_mb: f64,
    pub strategy: Strategy,
    /// Hardware profile the search plans for under `strategy = "auto"`: a built-in name
    /// (a100-80g, h100-80g, h200, cpu) or a .toml file; "cpu" on the CPU backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
}

impl Default for ParallelOptions {
    fn default() -> Self {
        Self {
            dp: None,
            tp: 1,
            pp: 1,
            ep: 1,
            micro_batch: None,
            schedule: PipelineSchedule::OneFOneB,
            virtual_stages: None,
            stage_layers: None,
            sequence_parallel: false,
            zero1: false,
            bucket_mb: 25.0,
            strategy: Strategy::Manual,
            hardware: None,
        }
    }
}

/// Chunks of layers per pipeline rank when interleaved and not said.
const DEFAULT_VIRTUAL_STAGES: usize = 2;

fn invalid(message: String) -> Error {
    Error::Options(message)
}

impl ParallelOptions {
    /// Checks that need neither the world size nor the model, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (key, v) in [("tp", self.tp), ("pp", self.pp), ("ep", self.ep)] {
            if v == 0 {
                return Err(format!("parallel.{key}: must be at least 1"));
            }
        }
        if self.dp == Some(0) {
            return Err("parallel.dp: must be at least 1".into());
        }
        if self.micro_batch == Some(0) {
            return Err("parallel.micro_batch: must be at least 1".into());
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return Err(format!(
                "parallel.bucket_mb: {}: must be a positive number of MiB",
                self.bucket_mb
            ));
        }
        if self.strategy == Strategy::Auto && self.stage_layers.is_some() {
            return Err(
                "parallel.stage_layers: set by hand only with strategy = \"manual\" \
                        (the search balances stages itself)"
                    .into(),
            );
        }
        match (self.schedule, self.virtual_stages) {
            (PipelineSchedule::Interleaved, Some(v)) if v < 2 => {
                return Err(format!(
                    "parallel.virtual_stages: {v}: the interleaved schedule needs at least 2 \
                     chunks of layers per rank"
                ))
            }
            (PipelineSchedule::Interleaved, _) if self.pp < 2 => {
                return Err("parallel.schedule: \"interleaved\" needs pp ≥ 2".into())
            }
            (PipelineSchedule::Interleaved, _) | (_, None) => {}
            (other, Some(_)) => {
                return Err(format!(
                    "parallel.virtual_stages: only with schedule = \"interleaved\" (not \
                     \"{}\")",
                    other.name()
                ))
            }
        }
        if let Some(layers) = &self.stage_layers {
            let stages = self.pp * self.chunks();
            if layers.len() != stages || layers.contains(&0) {
                return Err(format!(
                    "parallel.stage_layers: {layers:?} must give {stages} stages (pp={} × {} \
                     virtual) at least one layer each",
                    self.pp,
                    self.chunks()
                ));
            }
        }
        Ok(())
    }

    /// f32 elements per data-parallel gradient bucket (`bucket_mb`).
    pub fn bucket_elems(&self) -> usize {
        (self.bucket_mb * (1024.0 * 1024.0 / 4.0)).round().max(1.0) as usize
    }

    /// Chunks of layers per pipeline rank: `virtual_stages` when interleaved, else 1.
    pub fn chunks(&self) -> usize {
        match self.schedule {
            PipelineSchedule::Interleaved => self.virtual_stages.unwrap_or(DEFAULT_VIRTUAL_STAGES),
            PipelineSchedule::OneFOneB | PipelineSchedule::GPipe => 1,
        }
    }

    /// The layout over `world` ranks, `local_world` of them per node when known.
    pub fn layout(
        &self,
        world: usize,
        local_world: Option<usize>,
    ) -> std::result::Result<Layout, LayoutError> {
        Layout::for_world(self.dp, self.tp, self.pp, self.ep, world, local_world)
    }

    /// This rank's mesh for the layout over the job's world (a collective: every rank
    /// calls it at the same point).
    pub fn mesh(&self, ctx: &RankContext) -> Result<Mesh> {
        let layout = self
            .layout(ctx.world_size, Some(ctx.local_world_size))
            .map_err(parallel::Error::from)?;
        Ok(Mesh::new(layout, ctx.comm.clone())?)
    }

    /// Layers per pipeline stage for `model` (per virtual stage, in pipeline order, when
    /// interleaved): as set by hand, or balanced by cost.
    pub fn stage_sizes(&self, model: &ModelConfig) -> std::result::Result<Vec<usize>, String> {
        let stages = self.pp * self.chunks();
        if stages > model.num_layers {
            return Err(format!(
                "parallel: pp={} × virtual_stages={} = {stages} stages cannot exceed the layers \
                 ({}): every stage needs at least one",
                self.pp,
                self.chunks(),
                model.num_layers
            ));
        }
        match &self.stage_layers {
            Some(layers) => {
                let total: usize = layers.iter().sum();
                if total != model.num_layers {
                    return Err(format!(
                        "parallel.stage_layers: {layers:?} add up to {total} layers, but the \
                         model has {}",
                        model.num_layers
                    ));
                }
                Ok(layers.clone())
            }
            None => Ok(pipeline::balance(&pipeline::layer_costs(model), stages)),
        }
    }

    /// Everything the model and the batch require of `layout` under these options (the one
    /// check the launcher, the strategy search's pick and the builder all make): the
    /// layout fits the model ([`Layout::check_model`]) and the batch
    /// ([`Layout::check_batch`]), the stages are possible, the interleaved schedule gets
    /// whole groups of micro-batches, a capacity factor has experts to cap.
    pub fn check(
        &self,
        layout: &Layout,
        model: &ModelConfig,
        training: &TrainOptions,
    ) -> std::result::Result<(), String> {
        layout
            .check_model(&model.shape())
            .map_err(|e| format!("parallel: {e}"))?;
        if training.moe_capacity_factor.is_some() && model.moe.is_none() {
            return Err(format!(
                "training.moe_capacity_factor: this {} model has no experts",
                model.family.name()
            ));
        }
        if layout.pp > 1 {
            self.stage_sizes(model)?;
        }
        layout
            .check_batch(training.global_batch, training.micro_batch)
            .map_err(|e| format!("training.{e}"))?;
        let micro = training.global_batch / (training.micro_batch * layout.data_ranks());
        if self.chunks() > 1 {
            let shape = schedule::Shape {
                ranks: layout.pp,
                chunks: self.chunks(),
                micro,
                backward: true,
            };
            schedule::check(self.schedule, shape).map_err(|e| {
                format!(
                    "training.global_batch: {} / (micro_batch {} × data ranks {}) = {micro} \
                     micro-batches per step: {e}",
                    training.global_batch,
                    training.micro_batch,
                    layout.data_ranks()
                )
            })?;
        }
        Ok(())
    }
}

/// Assembles a [`Trainer`] for this rank: see the module's documentation.
pub struct TrainerBuilder<B: TrainBackend> {
    model: CausalLm<B>,
    rows: Vec<Row>,
    options: TrainOptions,
    shuffle: bool,
    parallel: Option<(Mesh, ParallelOptions)>,
    report: Option<Report>,
    precision: checkpoint::DType,
}

impl<B: TrainBackend> TrainerBuilder<B> {
    /// `model` loaded whole (with adapters, if any) on every rank, the same on each;
    /// `rows` the whole training set on every rank.
    pub fn new(model: CausalLm<B>, rows: Vec<Row>, options: &TrainOptions) -> Self {
        Self {
            model,
            rows,
            options: options.clone(),
            shuffle: crate::data::DataOptions::default().shuffle,
            parallel: None,
            report: None,
            precision: checkpoint::DType::F32,
        }
    }

    /// Compute in `dtype` (`model.dtype`): `bf16` for mixed precision with f32 master
    /// weights (see [`crate::model::set_precision`]); f32 by default.
    pub fn precision(mut self, dtype: checkpoint::DType) -> Self {
        self.precision = dtype;
        self
    }

    /// Report steps and phases to `report` rather than to the process's reporter
    /// (`parallel::runtime::report()`, the launcher's for a launched worker).
    pub fn reporter(mut self, report: &Report) -> Self {
        self.report = Some(report.clone());
        self
    }

    /// Shuffle the rows every epoch (`data.shuffle`), deterministically from the seed.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Train this rank's part of `mesh`'s layout (built with [`ParallelOptions::mesh`]);
    /// without this call, the trainer holds the whole model on one rank.
    ///
    /// One rank per process, as `launch run` starts them: burn 0.21's autodiff locks every
    /// graph of the process when a backward pass ends, so two ranks in one process can
    /// wait on each other for ever when a collective runs inside the backward pass (tensor,
    /// sequence and expert parallelism's do).
    pub fn parallel(mut self, mesh: &Mesh, options: &ParallelOptions) -> Self {
        self.parallel = Some((mesh.clone(), options.clone()));
        self
    }

    /// Check, cut and wire (a collective when the layout has more than one rank: every
    /// rank calls it at the same point).
    pub fn build(self) -> Result<Trainer<B>> {
        let (mesh, popts) = self
            .parallel
            .unwrap_or_else(|| (Mesh::solo(), ParallelOptions::default()));
        let layout = mesh.layout;
        let asked = popts
            .layout(mesh.world.size(), None)
            .map_err(parallel::Error::from)?;
        if asked != layout {
            return Err(invalid(format!(
                "parallel: the mesh is laid out {layout}, the options ask for {asked}"
            )));
        }
        popts.validate().map_err(invalid)?;
        let mut options = self.options;
        // As in the job file, [parallel]'s micro-batch takes precedence.
        if let Some(m) = popts.micro_batch {
            options.micro_batch = m;
        }
        let mut model = self.model;
        popts
            .check(&layout, &model.config, &options)
            .map_err(invalid)?;
        crate::model::decoder::set_capacity_factor(&mut model, options.moe_capacity_factor);
        // Whole model → this rank's stage → its experts → its tensor slices.
        if layout.pp > 1 {
            let sizes = popts.stage_sizes(&model.config).map_err(invalid)?;
            model = pipeline::keep_stage(model, &sizes, layout.pp, mesh.coords.pp);
        }
        if layout.ep > 1 {
            model = experts::spread(model, Group::new(mesh.ep.clone()))?;
        }
        let mut parts = Parts::default();
        if layout.tp > 1 {
            let (m, tp) = crate::model::shard::shard(
                model,
                Group::new(mesh.tp.clone()),
                popts.sequence_parallel,
            )?;
            model = m;
            parts.tp = Some(tp);
        }
        // After the cuts, which copy weights through the host as f32.
        model = crate::model::set_precision(model, self.precision)?;
        if mesh.data.size() > 1 {
            // Dense weights are replicated over dp × ep; each expert over dp only.
            parts.dp = Some(
                DataParallel::new(mesh.data.clone(), popts.zero1)
                    .with_narrow_group(mesh.dp.clone(), is_expert_path)
                    .with_bucket_elems(popts.bucket_elems()),
            );
        }
        if let Some(ep) = model.sharding.ep.clone() {
            parts.ep = Some(ExpertParallel::new(ep, &model));
        }
        if layout.pp > 1 {
            parts.pipeline = Some(Pipeline::new(mesh.pp.clone(), &model, popts.schedule)?);
        }
        let writes = Writes {
            replica: mesh.coords.dp == 0,
            first_expert_rank: mesh.coords.ep == 0,
            zero1: popts.zero1 && mesh.data.size() > 1,
        };
        let report = self.report.unwrap_or_else(parallel::runtime::report);
        Trainer::assemble(
            model,
            self.rows,
            options,
            self.shuffle,
            mesh,
            parts,
            writes,
            report,
        )
    }
}
