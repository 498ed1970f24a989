//! `[parallel]`: the dp×tp×pp×ep layout of a job, resolved against the world size and
//! checked against the model before any process starts.

use serde::{Deserialize, Serialize};

use parallel::Layout;
use trainer::ModelConfig;

use crate::config::TrainingSection;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Data-parallel ranks; by default the world size divided by tp × pp × ep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<usize>,
    /// Tensor-parallel ranks: attention heads, MLP columns and the vocabulary are split
    /// over them (Megatron's layout). Must divide the ranks per node.
    #[serde(default = "one")]
    pub tp: usize,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: usize,
    /// Expert-parallel ranks (Mixtral): experts are spread over them; carved out of data
    /// parallelism as in Megatron (dense weights are replicated over dp × ep).
    #[serde(default = "one")]
    pub ep: usize,
    /// Rows per micro-batch; when given it takes precedence over `training.micro_batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// Pipeline schedule: "1f1b" (default), "gpipe", or "interleaved" (1F1B over
    /// `virtual_stages` chunks of layers per rank).
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Chunks of layers per pipeline rank under the interleaved schedule (Megatron's
    /// virtual pipeline stages); 2 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_stages: Option<usize>,
    /// Layers of each pipeline stage, set by hand (`pp` entries summing to the layers, or
    /// `pp × virtual_stages` in pipeline order when interleaved); by default balanced by
    /// cost (the head counts on the last stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_layers: Option<Vec<usize>>,
    /// Sequence parallelism (Megatron's `--sequence-parallel`, with tp > 1): norms and
    /// residuals run on each tensor-parallel rank's chunk of the tokens, entering the
    /// tensor-parallel regions by all-gather and leaving by reduce-scatter.
    #[serde(default)]
    pub sequence_parallel: bool,
    /// ZeRO-1: shard AdamW state across data-parallel ranks (each rank steps and then
    /// broadcasts the parameters it owns; experts' state across the dp ranks holding them).
    #[serde(default)]
    pub zero1: bool,
    /// "manual" (default): the layout above. "auto": the strategy search picks dp, tp, pp,
    /// ep, the micro-batch, ZeRO-1 and virtual stages for the world it is launched on
    /// (`launch plan` shows its reasoning); values set above other than 1/false pin
    /// that choice.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Hardware profile the search plans for under `strategy = "auto"`: a built-in name
    /// (a100-80g, h100-80g, h200, cpu) or a .toml file; default "cpu" on the CPU backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            dp: None,
            tp: 1,
            pp: 1,
            ep: 1,
            micro_batch: None,
            schedule: default_schedule(),
            virtual_stages: None,
            stage_layers: None,
            sequence_parallel: false,
            zero1: false,
            strategy: default_strategy(),
            hardware: None,
        }
    }
}

fn default_strategy() -> String {
    "manual".into()
}

fn one() -> usize {
    1
}

fn default_schedule() -> String {
    "1f1b".into()
}

impl ParallelSection {
    /// Checks that need neither the world size nor the model.
    pub fn validate(&self) -> Result<(), String> {
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
        match self.strategy.as_str() {
            "manual" => {}
            "auto" if self.stage_layers.is_some() => {
                return Err(
                    "parallel.stage_layers: set by hand only with strategy = \"manual\" \
                            (the search balances stages itself)"
                        .into(),
                )
            }
            "auto" => {}
            other => {
                return Err(format!(
                    "parallel.strategy: `{other}`: expected \"manual\" or \"auto\""
                ))
            }
        }
        if !["1f1b", "gpipe", "interleaved"].contains(&self.schedule.as_str()) {
            return Err(format!(
                "parallel.schedule: `{}`: expected \"1f1b\", \"gpipe\" or \"interleaved\"",
                self.schedule
            ));
        }
        match (self.schedule.as_str(), self.virtual_stages) {
            ("interleaved", Some(v)) if v < 2 => {
                return Err(format!(
                    "parallel.virtual_stages: {v}: the interleaved schedule needs at least 2 \
                     chunks of layers per rank"
                ))
            }
            ("interleaved", _) if self.pp < 2 => {
                return Err("parallel.schedule: \"interleaved\" needs pp ≥ 2".into())
            }
            ("interleaved", _) | (_, None) => {}
            (other, Some(_)) => {
                return Err(format!(
                    "parallel.virtual_stages: only with schedule = \"interleaved\" (not \
                     \"{other}\")"
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

    /// Chunks of layers per pipeline rank: `virtual_stages` when interleaved, else 1.
    pub fn chunks(&self) -> usize {
        match self.schedule.as_str() {
            "interleaved" => self.virtual_stages.unwrap_or(2),
            _ => 1,
        }
    }

    /// Layers per pipeline stage for `model` (per virtual stage, in pipeline order, when
    /// interleaved): as set by hand, or balanced by cost.
    pub fn stage_sizes(&self, model: &ModelConfig) -> Result<Vec<usize>, String> {
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
            None => Ok(trainer::pipeline::balance(
                &trainer::pipeline::layer_costs(model),
                stages,
            )),
        }
    }

    pub fn pipeline_schedule(&self) -> trainer::pipeline::Schedule {
        match self.schedule.as_str() {
            "gpipe" => trainer::pipeline::Schedule::GPipe,
            "interleaved" => trainer::pipeline::Schedule::Interleaved,
            _ => trainer::pipeline::Schedule::OneFOneB,
        }
    }

    /// The layout over `world` ranks, `local_world` of them per node when known.
    pub fn layout(&self, world: usize, local_world: Option<usize>) -> Result<Layout, String> {
        let model_ranks = self.tp * self.pp * self.ep;
        let dp = match self.dp {
            Some(dp) => dp,
            None if world.is_multiple_of(model_ranks) => world / model_ranks,
            None => {
                return Err(format!(
                    "parallel: tp×pp×ep = {}×{}×{} = {model_ranks} must divide the {world} ranks \
                     of the job",
                    self.tp, self.pp, self.ep
                ))
            }
        };
        let layout = Layout {
            dp,
            tp: self.tp,
            pp: self.pp,
            ep: self.ep,
        };
        layout
            .check(world, local_world)
            .map_err(|e| format!("parallel: {e}"))?;
        Ok(layout)
    }
}

/// What the model requires of a layout (heads, experts and layers divisible), and what the
/// batch requires (every data rank an equal share of whole micro-batches).
pub fn check_job(
    p: &ParallelSection,
    layout: &Layout,
    model: &ModelConfig,
    training: &TrainingSection,
) -> Result<(), String> {
    trainer::model::shard::check_layout(model, layout).map_err(|e| format!("parallel: {e}"))?;
    if training.moe_capacity_factor.is_some() && model.moe.is_none() {
        return Err(format!(
            "training.moe_capacity_factor: this {} model has no experts",
            model.family.name()
        ));
    }
    if layout.pp > 1 {
        p.stage_sizes(model)?;
    }
    let per_step = training.micro_batch * layout.data_ranks();
    let micro = training.global_batch / per_step.max(1);
    if p.chunks() > 1 && training.global_batch.is_multiple_of(per_step) {
        let shape = trainer::pipeline::schedule::Shape {
            ranks: layout.pp,
            chunks: p.chunks(),
            micro,
            backward: true,
        };
        trainer::pipeline::schedule::check(p.pipeline_schedule(), shape).map_err(|e| {
            format!(
                "training.global_batch: {} / (micro_batch {} × data ranks {}) = {micro} \
                 micro-batches per step: {e}",
                training.global_batch,
                training.micro_batch,
                layout.data_ranks()
            )
        })?;
    }
    if !training.global_batch.is_multiple_of(per_step) {
        return Err(format!(
            "training.global_batch: {} must be a multiple of micro_batch {} × data-parallel \
             ranks {} (dp×ep; every data rank takes an equal share)",
            training.global_batch,
            training.micro_batch,
            layout.data_ranks()
        ));
    }
    Ok(())
}
