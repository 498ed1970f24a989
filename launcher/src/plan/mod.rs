//! `launch plan` and `[parallel] strategy = "auto"`: describe the job to the cost model
//! (from a job file or from dimensions on the command line), search, and print or apply
//! the best layout.

mod args;
pub mod profiles;
mod report;

use std::time::Instant;

use parallel::plan::{self, Hardware, Job, LoraTargets, Mode, Precision, Space};
use trainer::ModelConfig;

use crate::config::{Device, JobConfig};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use trainer::{ParallelOptions, PipelineSchedule, Strategy};

pub use args::{Format, PlanArgs};
pub use report::{json_report, table, AutoPick, CandidateReport, PlanEvent};

/// The cost model's view of a job file: its model, sequence length, batch, mode and
/// precision (`model.dtype`).
pub fn job_of(cfg: &JobConfig, model: &ModelConfig) -> Job {
    let shape = model.shape();
    let mode = match &cfg.lora {
        None => Mode::Full,
        Some(l) => Mode::Lora {
            rank: l.r,
            targets: lora_targets(&l.targets, shape.experts > 0),
        },
    };
    Job {
        model: shape,
        seq_len: cfg.data.max_seq_len,
        global_batch: cfg.training.global_batch,
        mode,
        precision: match cfg.model.dtype {
            checkpoint::DType::BF16 => Precision::Bf16Mixed,
            checkpoint::DType::F32 | checkpoint::DType::F16 => Precision::F32,
        },
        sequence_parallel: cfg.parallel.sequence_parallel,
        scatter_gather_sends: cfg.parallel.sequence_parallel,
    }
}

/// PEFT target names as projection kinds: dense MLPs' gate/up/down_proj, experts'
/// w1/w3/w2 (the other kind's names adapt nothing).
pub fn lora_targets(names: &[String], moe: bool) -> LoraTargets {
    let has = |n: &str| names.iter().any(|t| t == n);
    let (gate, up, down) = if moe {
        ("w1", "w3", "w2")
    } else {
        ("gate_proj", "up_proj", "down_proj")
    };
    LoraTargets {
        q: has("q_proj"),
        k: has("k_proj"),
        v: has("v_proj"),
        o: has("o_proj"),
        gate: has(gate),
        up: has(up),
        down: has(down),
        head: has("lm_head"),
    }
}

/// The hardware profile a job file plans for: `parallel.hardware`, else "cpu" for the CPU
/// backend; GPU jobs must name theirs.
pub fn job_hardware(cfg: &JobConfig, file: &std::path::Path) -> Result<Hardware> {
    match (&cfg.parallel.hardware, cfg.job.device) {
        (Some(name), _) => profiles::load(name).map_err(|e| Error::Config {
            file: file.to_path_buf(),
            message: format!("parallel.hardware: {e}"),
        }),
        (None, Device::Cpu) => profiles::load("cpu"),
        (None, Device::Cuda) => Err(Error::Config {
            file: file.to_path_buf(),
            message: "parallel.hardware: strategy = \"auto\" on cuda needs a hardware profile \
                      (a100-80g, h100-80g, h200, or a .toml file)"
                .into(),
        }),
    }
}

/// The choices a job file pins under `strategy = "auto"`: dp, micro_batch and
/// virtual_stages when given, tp/pp/ep when not 1, ZeRO-1 when on, and activation
/// recomputation as `training.recompute` says.
pub fn pinned(p: &ParallelOptions, recompute: bool) -> Space {
    let not_one = |v: usize| (v != 1).then_some(v);
    Space {
        dp: p.dp,
        tp: not_one(p.tp),
        pp: not_one(p.pp),
        ep: not_one(p.ep),
        micro_batch: p.micro_batch,
        virtual_stages: p.virtual_stages,
        zero1: p.zero1.then_some(true),
        recompute: Some(recompute),
    }
}

/// The layout a generation of a job runs with, decided once (by `launch train` on node 0,
/// or by the coordinator re-planning after a node is lost) and handed to every worker:
/// `[parallel]` with every choice made (the strategy `manual`, dp and the micro-batch
/// set), and under `strategy = "auto"` the search's pick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub parallel: ParallelOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<AutoPick>,
}

impl Decided {
    /// `cfg` with this layout in place.
    pub fn apply(&self, cfg: &mut JobConfig) {
        cfg.parallel = self.parallel.clone();
        if let Some(m) = self.parallel.micro_batch {
            cfg.training.micro_batch = m;
        }
    }

    /// The layout as the event log shows it, for a world of `world` ranks.
    pub fn event(&self, world: usize) -> PlanEvent {
        let p = &self.parallel;
        let layout = p.layout(world, None).ok();
        PlanEvent {
            dp: layout.map_or(p.dp.unwrap_or(1), |l| l.dp),
            tp: p.tp,
            pp: p.pp,
            ep: p.ep,
            zero1: p.zero1,
            sequence_parallel: p.sequence_parallel && p.tp > 1,
            schedule: p.schedule,
            virtual_stages: p.chunks(),
            micro_batch: p.micro_batch.unwrap_or(1),
            strategy: if self.auto.is_some() {
                Strategy::Auto
            } else {
                Strategy::Manual
            },
            auto: self.auto.clone(),
        }
    }
}

/// Decide the layout of `cfg` for `world` ranks (`local_world` per node): under
/// `strategy = "auto"` the best candidate of the search that passes every check `launch
/// train` makes; otherwise the job file's own. Errors name `file`.
pub fn decide(
    cfg: &JobConfig,
    file: &std::path::Path,
    world: usize,
    local_world: usize,
) -> Result<Decided> {
    let model = ModelConfig::from_dir(&cfg.model.path)?;
    if cfg.parallel.strategy == Strategy::Manual {
        let mut parallel = cfg.parallel.clone();
        check(cfg, &parallel, &model, world, local_world).map_err(config_error(file))?;
        parallel.dp = parallel.layout(world, Some(local_world)).ok().map(|l| l.dp);
        parallel.micro_batch = Some(cfg.training.micro_batch);
        return Ok(Decided {
            parallel,
            auto: None,
        });
    }
    let started = Instant::now();
    let mut hw = job_hardware(cfg, file)?;
    hw.gpus_per_node = local_world.max(1);
    let found = plan::search(
        &job_of(cfg, &model),
        &hw,
        world,
        &pinned(&cfg.parallel, cfg.training.recompute),
    );
    let mut first_refusal = None;
    for priced in &found.candidates {
        let parallel = apply(&cfg.parallel, &priced.candidate);
        match check(cfg, &parallel, &model, world, local_world) {
            Ok(()) => {
                let auto = AutoPick {
                    candidate: CandidateReport::of(priced),
                    hardware: hw.name.clone(),
                    considered: found.candidates.len(),
                    rejected: found.rejected.len(),
                    search_s: started.elapsed().as_secs_f64(),
                };
                return Ok(Decided {
                    parallel,
                    auto: Some(auto),
                });
            }
            Err(e) => {
                first_refusal.get_or_insert(format!("{}: {e}", priced.candidate));
            }
        }
    }
    let why = first_refusal
        .or_else(|| {
            found
                .rejected
                .first()
                .map(|r| format!("{}: {}", r.layout, r.reason))
        })
        .unwrap_or_default();
    Err(config_error(file)(format!(
        "parallel.strategy = \"auto\": no layout of {world} ranks fits this job on `{}` \
         ({} considered, {} rejected; e.g. {why}); `launch plan` lists every reason",
        hw.name,
        found.candidates.len(),
        found.rejected.len()
    )))
}

fn config_error(file: &std::path::Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Config {
        file: file.to_path_buf(),
        message,
    }
}

/// Every check a layout must pass before any process starts: it uses the world (tensor-
/// parallel groups inside nodes) and fits the model, the batch and the schedule.
fn check(
    cfg: &JobConfig,
    parallel: &ParallelOptions,
    model: &ModelConfig,
    world: usize,
    local_world: usize,
) -> std::result::Result<(), String> {
    let layout = parallel
        .layout(world, Some(local_world))
        .map_err(|e| format!("parallel: {e}"))?;
    let mut training = cfg.training.clone();
    if let Some(m) = parallel.micro_batch {
        training.micro_batch = m;
    }
    parallel.check(&layout, model, &training)
}

/// `[parallel]` with candidate `c`'s choices written in.
fn apply(p: &ParallelOptions, c: &plan::Candidate) -> ParallelOptions {
    let interleaved = c.virtual_stages > 1;
    ParallelOptions {
        dp: Some(c.dp),
        tp: c.tp,
        pp: c.pp,
        ep: c.ep,
        zero1: c.zero1,
        micro_batch: Some(c.micro_batch),
        // The plan priced 1F1B (GPipe would keep every micro-batch's activations).
        schedule: if interleaved {
            PipelineSchedule::Interleaved
        } else {
            PipelineSchedule::OneFOneB
        },
        virtual_stages: interleaved.then_some(c.virtual_stages),
        stage_layers: None,
        strategy: Strategy::Manual,
        ..p.clone()
    }
}

/// `launch plan`: the report (table or JSON) to print, or with `--calibrate` the
/// measured profile (written to `--out` when given).
pub fn run(args: &PlanArgs) -> Result<String> {
    if args.calibrate {
        let hw = match args.device {
            crate::config::Device::Cpu => profiles::calibrate(args.gpus_per_node.unwrap_or(1))?,
            crate::config::Device::Cuda => profiles::calibrate_cuda()?,
        };
        let text = profiles::to_toml(&hw)?;
        if let Some(out) = &args.out {
            checkpoint::atomic_write(out, text.as_bytes())?;
            return Ok(format!("wrote {}", out.display()));
        }
        return Ok(text);
    }
    let (job, cfg) = args.job()?;
    let mut hw = match (&args.hardware, &cfg) {
        (Some(name), _) => profiles::load(name)?,
        (None, Some(c)) => job_hardware(c, args.config.as_deref().unwrap_or("job".as_ref()))?,
        (None, None) => profiles::load("h100-80g")?,
    };
    let nnodes = args
        .nnodes
        .or(cfg.as_ref().map(|c| c.launch.nnodes))
        .unwrap_or(1);
    if let Some(g) = args
        .gpus_per_node
        .or(cfg.as_ref().map(|c| c.launch.nproc_per_node))
    {
        hw.gpus_per_node = g;
    }
    let world = nnodes.saturating_mul(hw.gpus_per_node);
    if world == 0 || world > plan::MAX_WORLD {
        return Err(Error::Config {
            file: "--nnodes/--gpus-per-node".into(),
            message: format!(
                "{nnodes} nodes × {} devices: the search takes 1 to {} devices",
                hw.gpus_per_node,
                plan::MAX_WORLD
            ),
        });
    }
    let space = args.space(cfg.as_ref())?;
    let started = Instant::now();
    let found = plan::search(&job, &hw, world, &space);
    let search_s = started.elapsed().as_secs_f64();
    Ok(match args.format {
        Format::Json => json_report(&found, args.top, &hw.name, search_s).to_string(),
        Format::Table => table(&found, args.top, &hw.name, search_s),
    })
}
