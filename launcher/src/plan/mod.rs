//! `launch plan` and `[parallel] strategy = "auto"`: describe the job to the cost model
//! (from a job file or from dimensions on the command line), search, and print or apply
//! the best layout.

mod args;
pub mod profiles;
mod report;

use std::time::Instant;

use parallel::plan::{self, Hardware, Job, LoraTargets, Mode, Precision, Priced, Space};
use serde_json::{json, Value};
use trainer::ModelConfig;

use crate::config::JobConfig;
use crate::error::{Error, Result};
use crate::layout::ParallelSection;

pub use args::PlanArgs;
pub use report::{json_report, table};

/// The cost model's view of a job file: its model, sequence length, batch and mode, in
/// f32 (what tidemill trains in).
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
        precision: Precision::F32,
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
    match (&cfg.parallel.hardware, cfg.job.device.as_str()) {
        (Some(name), _) => profiles::load(name).map_err(|e| Error::Config {
            file: file.to_path_buf(),
            message: format!("parallel.hardware: {e}"),
        }),
        (None, "cpu") => profiles::load("cpu"),
        (None, device) => Err(Error::Config {
            file: file.to_path_buf(),
            message: format!(
                "parallel.hardware: strategy = \"auto\" on {device} needs a hardware profile \
                 (a100-80g, h100-80g, h200, or a .toml file)"
            ),
        }),
    }
}

/// The choices a job file pins under `strategy = "auto"`: dp, micro_batch and
/// virtual_stages when given, tp/pp/ep when not 1, ZeRO-1 when on. The trainer does not
/// recompute activations, so neither may the plan.
pub fn pinned(p: &ParallelSection) -> Space {
    let not_one = |v: usize| (v != 1).then_some(v);
    Space {
        dp: p.dp,
        tp: not_one(p.tp),
        pp: not_one(p.pp),
        ep: not_one(p.ep),
        micro_batch: p.micro_batch,
        virtual_stages: p.virtual_stages,
        zero1: p.zero1.then_some(true),
        recompute: None,
        no_recompute: true,
    }
}

/// The layout `strategy = "auto"` picked, with its prediction.
#[derive(Clone, Debug)]
pub struct Chosen {
    pub priced: Priced,
    pub hardware: String,
    pub considered: usize,
    pub rejected: usize,
    pub search_s: f64,
}

impl Chosen {
    /// The `plan` fields of the job's `start` event.
    pub fn event(&self) -> Value {
        let mut v = report::candidate_json(&self.priced);
        if let Value::Object(m) = &mut v {
            m.insert("strategy".into(), json!("auto"));
            m.insert("hardware".into(), json!(self.hardware));
            m.insert("considered".into(), json!(self.considered));
            m.insert("rejected".into(), json!(self.rejected));
            m.insert("search_s".into(), json!(self.search_s));
        }
        v
    }
}

/// Under `strategy = "auto"`, the job file with the layout the search picks for `world`
/// ranks (`local_world` per node) put in its place, and the pick; otherwise the job file
/// as is. The best candidate the trainer accepts (every check `launch train` makes) wins;
/// the search is deterministic, so every worker arrives at the launcher's pick.
pub fn resolve(
    cfg: &JobConfig,
    file: &std::path::Path,
    world: usize,
    local_world: usize,
) -> Result<(JobConfig, Option<Chosen>)> {
    if cfg.parallel.strategy != "auto" {
        return Ok((cfg.clone(), None));
    }
    let started = Instant::now();
    let model = ModelConfig::from_dir(&cfg.model.path)?;
    let mut hw = job_hardware(cfg, file)?;
    hw.gpus_per_node = local_world.max(1);
    let job = job_of(cfg, &model);
    let found = plan::search(&job, &hw, world, &pinned(&cfg.parallel));
    let mut first_refusal = None;
    for priced in &found.candidates {
        let resolved = apply(cfg, &priced.candidate);
        let checked = resolved
            .parallel
            .layout(world, Some(local_world))
            .and_then(|l| {
                crate::layout::check_job(&resolved.parallel, &l, &model, &resolved.training)
            });
        match checked {
            Ok(()) => {
                let chosen = Chosen {
                    priced: priced.clone(),
                    hardware: hw.name.clone(),
                    considered: found.candidates.len(),
                    rejected: found.rejected.len(),
                    search_s: started.elapsed().as_secs_f64(),
                };
                return Ok((resolved, Some(chosen)));
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
    Err(Error::Config {
        file: file.to_path_buf(),
        message: format!(
            "parallel.strategy = \"auto\": no layout of {world} ranks fits this job on `{}` \
             ({} considered, {} rejected; e.g. {why}); `launch plan` lists every reason",
            hw.name,
            found.candidates.len(),
            found.rejected.len()
        ),
    })
}

/// `cfg` with candidate `c`'s layout written into `[parallel]` (and its micro-batch into
/// `[training]`).
fn apply(cfg: &JobConfig, c: &plan::Candidate) -> JobConfig {
    let mut out = cfg.clone();
    let p = &mut out.parallel;
    p.dp = Some(c.dp);
    p.tp = c.tp;
    p.pp = c.pp;
    p.ep = c.ep;
    p.zero1 = c.zero1;
    p.micro_batch = Some(c.micro_batch);
    if c.virtual_stages > 1 {
        p.schedule = "interleaved".into();
        p.virtual_stages = Some(c.virtual_stages);
    } else {
        // The plan priced 1F1B (GPipe would keep every micro-batch's activations).
        p.schedule = "1f1b".into();
        p.virtual_stages = None;
    }
    p.stage_layers = None;
    out.training.micro_batch = c.micro_batch;
    out
}

/// `launch plan`: the report (table or JSON) to print, or with `--calibrate` the
/// measured profile (written to `--out` when given).
pub fn run(args: &PlanArgs) -> Result<String> {
    if args.calibrate {
        let workers = args.gpus_per_node.unwrap_or(1);
        let hw = profiles::calibrate(workers)?;
        let text = profiles::to_toml(&hw)?;
        if let Some(out) = &args.out {
            checkpoint::atomic_write(out, text.as_bytes())?;
            return Ok(format!("wrote {}", out.display()));
        }
        return Ok(text);
    }
    if !["table", "json"].contains(&args.format.as_str()) {
        return Err(Error::Config {
            file: "--format".into(),
            message: format!("`{}`: expected table or json", args.format),
        });
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
    Ok(match args.format.as_str() {
        "json" => json_report(&found, args.top, &hw.name, search_s).to_string(),
        _ => table(&found, args.top, &hw.name, search_s),
    })
}
