//! `launch train`'s training body, run by every worker (rank) of a job: audit, train data
//! parallel, evaluate and export (rank 0), reporting through an [`EventSink`].

use std::path::Path;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use parallel::dp::DataParallel;
use parallel::{Collectives, Context, Mesh, ReduceOp, Reporter};
use serde_json::{json, Value};
use trainer::collective::Group;
use trainer::data::Row;
use trainer::model::experts::{is_expert_path, ExpertParallel};
use trainer::pipeline::Pipeline;
use trainer::state::Writes;
use trainer::{AdamWOptions, Schedule, ScheduleKind, StepStats, TrainOptions, Trainer};
use trainer::{Collective, TrainBackend};

use crate::config::{JobConfig, TrainingSection};
use crate::error::{require_exists, Error, Result};
use crate::events::EventLog;
use crate::plan::Chosen;
use crate::saving;
use crate::setup;

pub fn train_options(t: &TrainingSection, shuffle: bool) -> TrainOptions {
    let kind = match t.schedule.as_str() {
        "constant" => ScheduleKind::Constant,
        "cosine" => ScheduleKind::Cosine,
        _ => ScheduleKind::Linear,
    };
    TrainOptions {
        global_batch: t.global_batch,
        micro_batch: t.micro_batch,
        schedule: Schedule {
            kind,
            lr: t.lr,
            warmup_steps: t.warmup_steps,
            total_steps: t.max_steps,
        },
        adamw: AdamWOptions {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
        },
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        seed: t.seed,
        shuffle,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a worker's events go: the event log itself (one process, no launcher) or the
/// agent (launched workers; the coordinator writes the log).
pub trait EventSink {
    fn event(&mut self, kind: &str, fields: Value) -> Result<()>;
    /// A finished step; `seq` is the collective sequence number.
    fn step(&mut self, stats: &StepStats, seq: u64, extra: Value) -> Result<()>;
    fn phase(&mut self, _phase: &str) {}
}

impl EventSink for EventLog {
    fn event(&mut self, kind: &str, fields: Value) -> Result<()> {
        self.emit(kind, fields)
    }
    fn step(&mut self, s: &StepStats, _seq: u64, mut extra: Value) -> Result<()> {
        if let Value::Object(m) = &mut extra {
            m.insert("step".into(), json!(s.step));
            m.insert("loss".into(), json!(s.loss));
            m.insert("step_time".into(), json!(s.seconds));
        }
        self.emit("step", extra)
    }
}

impl EventSink for Reporter {
    fn event(&mut self, kind: &str, fields: Value) -> Result<()> {
        Reporter::event(self, kind, fields);
        Ok(())
    }
    fn step(&mut self, s: &StepStats, seq: u64, extra: Value) -> Result<()> {
        Reporter::step(self, s.step, s.loss, s.seconds, seq, extra);
        Ok(())
    }
    fn phase(&mut self, phase: &str) {
        Reporter::phase(self, phase);
    }
}

/// Paths the job needs, checked before any process starts or anything is written (exit 2
/// naming the key).
pub fn preflight(cfg: &JobConfig) -> Result<()> {
    setup::require_dir("model.path", &cfg.model.path)?;
    setup::required_file("data.train", cfg.data.train.as_deref(), "train")?;
    if let Some(eval) = &cfg.data.eval {
        require_exists("data.eval", eval)?;
    }
    Ok(())
}

/// Create the run directory, drop a previous run's export (it must never pass for this
/// run's) and write the resolved config.
pub fn prepare_run_dir(cfg: &JobConfig) -> Result<()> {
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    let export = run_dir.join("export");
    if export.exists() {
        std::fs::remove_dir_all(&export).map_err(io(&export))?;
    }
    let resolved = toml::to_string(cfg).map_err(|e| Error::Config {
        file: run_dir.join("config.toml"),
        message: e.to_string(),
    })?;
    checkpoint::atomic_write(&run_dir.join("config.toml"), resolved.as_bytes())?;
    Ok(())
}

/// Fields of the job's `start` event; under `strategy = "auto"` the plan carries the
/// search's pick and its predictions.
pub fn start_fields(cfg: &JobConfig, world_size: usize, chosen: Option<&Chosen>) -> Value {
    let mode = if cfg.lora.is_some() { "lora" } else { "full" };
    let mut plan = plan(cfg, world_size);
    if let (Value::Object(m), Some(c)) = (&mut plan, chosen) {
        m.insert("auto".into(), c.event());
    }
    json!({"job": cfg.job.name, "model": cfg.model.path, "mode": mode, "world_size": world_size,
           "nnodes": cfg.launch.nnodes, "nproc_per_node": cfg.launch.nproc_per_node,
           "plan": plan})
}

/// The layout a job runs with, for its `start` event.
fn plan(cfg: &JobConfig, world_size: usize) -> Value {
    let p = &cfg.parallel;
    match p.layout(world_size, None) {
        Ok(l) => json!({"dp": l.dp, "tp": l.tp, "pp": l.pp, "ep": l.ep, "zero1": p.zero1,
                        "sequence_parallel": p.sequence_parallel && l.tp > 1,
                        "schedule": p.schedule, "virtual_stages": p.chunks(),
                        "micro_batch": cfg.training.micro_batch, "strategy": p.strategy}),
        Err(e) => json!({"error": e}),
    }
}

/// Steps whose times are compared with the plan's prediction (the first, which warms up,
/// left out when there are more).
const PLAN_CHECK_STEPS: u64 = 4;

/// The measured step time next to the plan's prediction, once `PLAN_CHECK_STEPS` steps (or
/// all there are) have run: the median of the steps after the first.
fn plan_check(predicted: f64, times: &[f64]) -> Value {
    let mut t: Vec<f64> = times
        .iter()
        .copied()
        .skip(usize::from(times.len() > 1))
        .collect();
    t.sort_by(f64::total_cmp);
    let measured = t.get(t.len() / 2).copied().unwrap_or(f64::NAN);
    json!({"predicted_step_time_s": predicted, "measured_step_time_s": measured,
           "measured_over_predicted": measured / predicted, "steps": times.len()})
}

/// Train in this process alone, writing the run directory directly (no launcher): what
/// library users and tests call.
pub fn run(cfg: &JobConfig) -> Result<()> {
    preflight(cfg)?;
    let (cfg, chosen) = crate::plan::resolve(cfg, Path::new(PARALLEL), 1, 1)?;
    prepare_run_dir(&cfg)?;
    let mut events = EventLog::open(&cfg.run_dir().join("events.jsonl"))?;
    events.emit("start", start_fields(&cfg, 1, chosen.as_ref()))?;
    run_rank(&cfg, chosen.as_ref(), &Context::solo(), &mut events)
}

/// Names the job file's section in errors where the file's path is not at hand.
const PARALLEL: &str = "[parallel]";

/// One rank of a launched job (`launch worker`): rank context from the environment,
/// events through the agent. A failure is also told to the agent, so the coordinator's
/// fault event says why.
pub fn worker(cfg: &JobConfig) -> Result<()> {
    let mut ctx = parallel::init()?;
    let mut reporter = std::mem::replace(&mut ctx.reporter, Reporter::disabled());
    // Under strategy = "auto" every worker runs the launcher's (deterministic) search.
    let result = crate::plan::resolve(
        cfg,
        Path::new(PARALLEL),
        ctx.world_size,
        ctx.local_world_size,
    )
    .and_then(|(cfg, chosen)| run_rank(&cfg, chosen.as_ref(), &ctx, &mut reporter));
    if let Err(e) = &result {
        reporter.error(&crate::error::chain(e));
    }
    reporter.flush(Duration::from_secs(5));
    result
}

fn run_rank(
    cfg: &JobConfig,
    chosen: Option<&Chosen>,
    ctx: &Context,
    events: &mut dyn EventSink,
) -> Result<()> {
    match cfg.job.device.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => run_on::<burn::backend::Cuda>(
            cfg,
            chosen,
            ctx,
            events,
            &burn::backend::cuda::CudaDevice::new(ctx.local_rank),
        ),
        _ => run_on::<setup::Cpu>(cfg, chosen, ctx, events, &Default::default()),
    }
}

/// Train `cfg` as rank `ctx.rank`; `chosen`: the automatic plan, whose predicted step time
/// is logged next to the measured one.
pub fn run_on<B: Collective>(
    cfg: &JobConfig,
    chosen: Option<&Chosen>,
    ctx: &Context,
    events: &mut dyn EventSink,
    device: &B::Device,
) -> Result<()> {
    let started = Instant::now();
    let lead = ctx.rank == 0;
    let run_dir = cfg.run_dir();
    let export = run_dir.join("export");
    let train_path = setup::required_file("data.train", cfg.data.train.as_deref(), "train")?;
    let mut files: Vec<&Path> = vec![&train_path];
    files.extend(cfg.data.eval.as_deref());
    let tokenizer = setup::tokenizer_for(&cfg.model.path, &files)?;
    let (rows, audit) = setup::dataset("data.train", &train_path, tokenizer.as_ref(), &cfg.data)?;
    if lead {
        println!("{audit}");
        events.event("audit", json!({"split": "train", "audit": audit}))?;
    }
    let eval_set = match &cfg.data.eval {
        Some(p) => {
            let (rows, audit) = setup::dataset("data.eval", p, tokenizer.as_ref(), &cfg.data)?;
            if lead {
                println!("{audit}");
                events.event("audit", json!({"split": "eval", "audit": audit}))?;
            }
            Some((rows, audit))
        }
        None => None,
    };

    let config_error = |message| crate::error::Error::Config {
        file: "config".into(),
        message,
    };
    let layout = cfg
        .parallel
        .layout(ctx.world_size, None)
        .map_err(config_error)?;
    let mesh = Mesh::new(layout, ctx.comm.clone())?;
    let (mut model, spec) = setup::model::<Autodiff<B>>(
        &cfg.model.path,
        cfg.lora.as_ref(),
        cfg.training.seed,
        device,
    )?;
    trainer::model::moe::set_capacity_factor(&mut model, cfg.training.moe_capacity_factor);
    // The whole model is built, then cut: each rank keeps only its stage's layers and its
    // slices of them (a checkpoint read slice by slice comes with sharded checkpoints).
    let model = if layout.pp > 1 {
        let sizes = cfg
            .parallel
            .stage_sizes(&model.config)
            .map_err(config_error)?;
        trainer::pipeline::keep_stage(model, &sizes, layout.pp, mesh.coords.pp)
    } else {
        model
    };
    let model = if layout.ep > 1 {
        trainer::model::experts::spread(model, Group::new(mesh.ep.clone()))?
    } else {
        model
    };
    let (model, tensor_parallel) = if layout.tp > 1 {
        let (m, tp) = trainer::model::shard::shard(
            model,
            Group::new(mesh.tp.clone()),
            cfg.parallel.sequence_parallel,
        )?;
        (m, Some(tp))
    } else {
        (model, None)
    };
    setup::check_vocab("data.train", &audit, model.config.vocab_size)?;
    if let Some((_, eval_audit)) = &eval_set {
        setup::check_vocab("data.eval", eval_audit, model.config.vocab_size)?;
    }
    let eval_rows = eval_set.map(|(rows, _)| rows);
    let mut trainer = Trainer::new(model, rows, train_options(&cfg.training, cfg.data.shuffle))?;
    if mesh.data.size() > 1 {
        // Dense weights are replicated over dp × ep; each expert over dp only.
        let dp = DataParallel::new(mesh.data.clone(), cfg.parallel.zero1)
            .with_narrow_group(mesh.dp.clone(), is_expert_path);
        trainer = trainer.with_data_parallel(dp)?;
    }
    if let Some(ep) = trainer.model().sharding.ep.clone() {
        let ep = ExpertParallel::new(ep, trainer.model());
        trainer = trainer.with_expert_parallel(ep, mesh.model.clone());
    }
    if let Some(tp) = tensor_parallel {
        trainer = trainer.with_tensor_parallel(tp, mesh.model.clone());
    }
    if layout.pp > 1 {
        let schedule = cfg.parallel.pipeline_schedule();
        let pipeline = Pipeline::new(mesh.pp.clone(), trainer.model(), schedule)?;
        trainer = trainer.with_pipeline(pipeline, mesh.model.clone());
    }
    let t = &cfg.training;
    let ckpt_root = saving::root(&run_dir);
    if cfg.checkpoint.resume {
        // The lead picks the newest checkpoint that verifies; every rank reads its boxes.
        let mut found = [-1i64];
        if lead {
            if let Some(step) = saving::find_resume(&ckpt_root, events)? {
                found[0] = step as i64;
            }
        }
        ctx.comm.broadcast(&mut found, 0)?;
        if let Ok(step) = u64::try_from(found[0]) {
            let dir = saving::resume(&mut trainer, &ckpt_root, step)?;
            if lead {
                println!("resuming from {} (step {step})", dir.display());
                events.event("resumed", json!({"step": step, "from_checkpoint": dir}))?;
            }
        }
    }
    let writes = Writes {
        replica: mesh.coords.dp == 0,
        first_expert_rank: mesh.coords.ep == 0,
        zero1: cfg.parallel.zero1 && mesh.data.size() > 1,
    };
    let mut saver = saving::Saver::new(
        ckpt_root,
        ctx.rank,
        ctx.world_size,
        writes,
        cfg.checkpoint.clone(),
        if lead {
            checkpoint::sharded::model_files(&cfg.model.path)?
        } else {
            Vec::new()
        },
    );
    let saved_state = json!({"plan": plan(cfg, ctx.world_size),
                             "config": toml::to_string(cfg).unwrap_or_default()});
    events.phase("train");
    let mut last_loss = f64::NAN;
    let mut step_times = Vec::new();
    // Steps this process runs (fewer after a resume): the plan check waits for some.
    let checked_after = PLAN_CHECK_STEPS.min(t.max_steps.saturating_sub(trainer.steps_done()));
    let delay = injected_delay(ctx.rank);
    while trainer.steps_done() < t.max_steps {
        let s = trainer.step()?;
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        last_loss = s.loss;
        if let Some(c) = chosen.filter(|_| lead) {
            step_times.push(s.seconds);
            if step_times.len() as u64 == checked_after {
                events.event(
                    "plan_check",
                    plan_check(c.priced.estimate.step_time_s, &step_times),
                )?;
            }
        }
        let tokens_per_s = s.tokens as f64 / s.seconds.max(1e-9);
        let extra = json!({"lr": s.lr, "tokens_per_s": tokens_per_s, "grad_norm": s.grad_norm,
                           "tokens": s.tokens, "supervised_tokens": s.supervised_tokens,
                           "optimizer_state_elems": trainer.optimizer_state_elems(),
                           "param_elems": trainer.param_elems(), "grad_elems": s.grad_elems});
        events.step(&s, trainer.collective_seq(), extra)?;
        if let Some(rows) = &eval_rows {
            if t.eval_every > 0 && s.step % t.eval_every == 0 && s.step < t.max_steps {
                evaluate(&trainer, rows, t.micro_batch, &mesh, events)?;
            }
        }
        if saver.due(s.step, t.max_steps) {
            saver.save(&trainer, &saved_state, events)?;
        }
    }
    saver.wait(events)?;
    if let Some(rows) = &eval_rows {
        events.phase("eval");
        evaluate(&trainer, rows, t.micro_batch, &mesh, events)?;
    }
    // Every rank takes part in gathering the slices, the first replica's stages send
    // theirs to rank 0, which writes.
    let model = trainer::model::shard::unshard(trainer.into_model())?;
    let model = trainer::model::experts::gather(model)?;
    let model = if layout.pp == 1 {
        Some(model)
    } else if (mesh.coords.tp, mesh.coords.ep, mesh.coords.dp) == (0, 0, 0) {
        let whole = if lead {
            let (m, _) = setup::model::<Autodiff<B>>(
                &cfg.model.path,
                cfg.lora.as_ref(),
                cfg.training.seed,
                device,
            )?;
            Some(m)
        } else {
            None
        };
        trainer::pipeline::gather_stages(&model, mesh.pp.as_ref(), whole)?
    } else {
        None
    };
    let Some(model) = model.filter(|_| lead) else {
        return Ok(());
    };

    events.phase("export");
    let dtype = export_dtype(&cfg.export.dtype);
    if let Some(spec) = &spec {
        let dir = export.join("adapter");
        let base = cfg.model.path.display().to_string();
        trainer::lora::save_adapter(&model, spec, Some(base), &dir)?;
        events.event("export", json!({"format": "peft", "path": dir}))?;
        println!("adapter written to {}", dir.display());
    }
    if spec.is_none() || cfg.export.merged {
        let dir = export.join("model");
        trainer::export::save_hf_model(&model, &cfg.model.path, &dir, dtype)?;
        events.event("export", json!({"format": "hf", "path": dir}))?;
        println!("model written to {}", dir.display());
    }
    events.event(
        "done",
        json!({"steps": t.max_steps, "loss": last_loss, "seconds": started.elapsed().as_secs_f64()}),
    )
}

/// Test-only fault injection: with `TIDEMILL_TEST_DELAY=RANK:SECONDS[,RANK:SECONDS…]` in
/// its environment (`*` for any rank; a rank's own entry wins), a rank sleeps that long
/// after every step: a straggler for the coordinator to find, or steps slow enough for a
/// test to act between them.
fn injected_delay(rank: usize) -> Option<Duration> {
    let spec = std::env::var("TIDEMILL_TEST_DELAY").ok()?;
    let mut any = None;
    for entry in spec.split(',') {
        let (r, secs) = entry.split_once(':')?;
        let secs: f64 = secs
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite() && *s > 0.0)?;
        match r.trim() {
            "*" => any = Some(secs),
            r if r.parse::<usize>().ok() == Some(rank) => {
                return Some(Duration::from_secs_f64(secs))
            }
            _ => {}
        }
    }
    any.map(Duration::from_secs_f64)
}

/// Every data rank evaluates its contiguous share of `rows` (tensor-parallel ranks the same
/// share together); the sums are all-reduced, so the result is the whole set's mean token
/// loss (rank 0 logs it). Under expert parallelism every rank must run as many forward
/// passes as the others: a shorter share is topped up with rows that supervise nothing.
fn evaluate<B: TrainBackend>(
    trainer: &Trainer<B>,
    rows: &[Row],
    micro_batch: usize,
    mesh: &Mesh,
    events: &mut dyn EventSink,
) -> Result<()> {
    let (rank, world) = (mesh.data.rank(), mesh.data.size());
    let share = |r: usize| r * rows.len() / world;
    let mut mine = rows[share(rank)..share(rank + 1)].to_vec();
    if mesh.ep.size() > 1 {
        let longest = (0..world)
            .map(|r| share(r + 1) - share(r))
            .max()
            .unwrap_or(0);
        let blank = rows.first().map(|r| Row {
            targets: vec![trainer::loss::IGNORE; r.targets.len()],
            ..r.clone()
        });
        mine.extend(blank.into_iter().cycle().take(longest - mine.len()));
    }
    let r = trainer.evaluate(&mine, micro_batch)?;
    let mut sums = [r.loss * r.tokens as f64, r.tokens as f64];
    mesh.data.all_reduce(&mut sums, ReduceOp::Sum)?;
    let tokens = sums[1] as usize;
    let loss = if tokens == 0 { 0.0 } else { sums[0] / sums[1] };
    if mesh.world.rank() == 0 {
        tracing::info!(
            step = trainer.steps_done(),
            loss = format!("{loss:.4}"),
            tokens,
            "eval"
        );
        events.event(
            "eval",
            json!({"step": trainer.steps_done(), "loss": loss, "tokens": tokens}),
        )?;
    }
    Ok(())
}

pub fn export_dtype(name: &str) -> checkpoint::DType {
    match name {
        "bf16" => checkpoint::DType::BF16,
        "f16" => checkpoint::DType::F16,
        _ => checkpoint::DType::F32,
    }
}
