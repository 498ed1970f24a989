//! `launch train`'s training body, run by every worker (rank) of a job: load, build the
//! trainer for the decided layout, train, evaluate and export. Events go to the
//! process's reporter (`parallel::runtime`): the agent and the coordinator's event log
//! for a launched worker, the event log directly for a job run in this process alone.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use parallel::runtime::{Report, Reporter, Sink, StepReport};
use parallel::RankContext;
use trainer::data::Row;
use trainer::{LoraSpec, TrainBackend, Trainer};

use crate::config::{Device, JobConfig};
use crate::error::{Error, Result};
use crate::events::{Event, EventLog, ExportFormat, Split};
use crate::plan::Decided;
use crate::saving::{self, Saver};
use crate::setup;
use crate::tidal::worker::Tide;
use crate::tidal::{Verdict, WindowWork};

/// Train in this process alone, writing the run directory directly (no launcher): what
/// library users and tests call.
pub fn run(cfg: &JobConfig) -> Result<()> {
    crate::preflight::check(cfg)?;
    let decided = crate::plan::decide(cfg, Path::new(PARALLEL), 1, 1)?;
    let mut cfg = cfg.clone();
    decided.apply(&mut cfg);
    crate::job::prepare_run_dir(&cfg)?;
    let mut events = EventLog::open(&cfg.run_dir().join("events.jsonl"))?;
    events.emit(
        Event::Start(crate::job::start(&cfg, 1, Some(&decided))),
        None,
        None,
    )?;
    // The trainer's reports go straight into the log, as the coordinator would write them;
    // the first failure to write it fails the run.
    let failed = Arc::new(Mutex::new(None::<String>));
    let seen = failed.clone();
    let sink: Sink = Box::new(move |line| {
        let msg = crate::events::parse_report(line).map_err(|e| {
            std::io::Error::other(format!("a report the event log cannot read ({e}): {line}"))
        });
        let written = msg.and_then(|msg| match crate::coordinator::logged(msg) {
            Some((rank, event)) => events
                .emit(event, Some(rank), Some(0))
                .map_err(std::io::Error::other),
            None => Ok(()),
        });
        if let Err(e) = &written {
            if let Ok(mut f) = seen.lock() {
                f.get_or_insert_with(|| e.to_string());
            }
        }
        written
    });
    let mut reporter = Reporter::start(0, sink);
    let mut ctx = RankContext::solo();
    ctx.collective_timeout = cfg.launch.collective_timeout();
    let result =
        data_plane(&cfg, &mut ctx).and_then(|()| run_rank(&cfg, &decided, None, &ctx, &reporter));
    reporter.flush(Duration::from_secs(10));
    result?;
    match failed.lock().ok().and_then(|mut f| f.take()) {
        Some(e) => Err(Error::Launch(format!("writing the event log: {e}"))),
        None => Ok(()),
    }
}

/// Names the job file's section in errors where the file's path is not at hand.
const PARALLEL: &str = "[parallel]";

/// One rank of a launched job (`launch worker`): rank context from the environment, the
/// layout the coordinator decided, events through the agent. A failure is also told to
/// the agent, so the coordinator's fault event says why.
///
/// In a tidal window (`window`), a rank that stops for the window's end or a preemption
/// returns [`Error::Yielded`] (exit status 75), which is not a failure.
pub fn worker(cfg: &JobConfig, decided: &Decided, window: Option<WindowWork>) -> Result<()> {
    let mut ctx = parallel::init()?;
    // Dropped before `ctx` and its groups: on a failure (or a panic) it marks the process
    // failed first, so that no NCCL group is destroyed (that waits for peers which may be
    // stuck in a collective this rank will never join).
    let failing = parallel::nccl::FailGuard::new();
    let mut cfg = cfg.clone();
    decided.apply(&mut cfg);
    let result = data_plane(&cfg, &mut ctx)
        .and_then(|()| run_rank(&cfg, decided, window, &ctx, &ctx.reporter));
    match &result {
        Ok(()) | Err(Error::Yielded(_)) => failing.ended_well(),
        Err(e) => ctx.reporter.error(&crate::error::chain(e)),
    }
    ctx.reporter.flush(Duration::from_secs(5));
    result
}

/// NCCL on this rank's group where `launch.data_plane` says so (the device is checked
/// first, so that a host without the GPU path gets that error rather than NCCL's).
fn data_plane(cfg: &JobConfig, ctx: &mut RankContext) -> Result<()> {
    if cfg.launch.data_plane.nccl(cfg.job.device, ctx.world_size) {
        cfg.job.device.ready()?;
        // A host without NCCL is an input error (exit 2, not retried); NCCL failing to
        // connect the ranks is a failure like a TCP one.
        parallel::nccl::library::check().map_err(|e| Error::Config {
            file: "this host".into(),
            message: format!(
                "launch.data_plane: {e} (data_plane = \"tcp\" moves tensors through host \
                 memory instead)"
            ),
        })?;
        ctx.use_nccl()?;
    }
    Ok(())
}

/// This rank's training, reported to `report`.
fn run_rank(
    cfg: &JobConfig,
    decided: &Decided,
    window: Option<WindowWork>,
    ctx: &RankContext,
    report: &Report,
) -> Result<()> {
    let job = Job {
        cfg,
        decided,
        window,
        ctx,
        report,
    };
    cfg.job.device.ready()?;
    match cfg.job.device {
        Device::Cpu => run_on::<trainer::backend::Cpu>(&job, &Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda if cfg.job.fusion => run_on::<trainer::backend::CudaFused>(
            &job,
            &burn::backend::cuda::CudaDevice::new(ctx.local_rank),
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda => run_on::<burn::backend::Cuda>(
            &job,
            &burn::backend::cuda::CudaDevice::new(ctx.local_rank),
        ),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(Error::Config {
            file: "config".into(),
            message: Device::Cuda.check().err().unwrap_or_default(),
        }),
    }
}

/// What one rank of a job runs with.
struct Job<'a> {
    cfg: &'a JobConfig,
    decided: &'a Decided,
    /// The tidal window this rank trains in, if any.
    window: Option<WindowWork>,
    ctx: &'a RankContext,
    report: &'a Report,
}

/// Train `cfg` as rank `ctx.rank`: build → loop → export.
fn run_on<B: trainer::ParallelBackend>(job: &Job<'_>, device: &B::Device) -> Result<()> {
    let (cfg, ctx, report) = (job.cfg, job.ctx, job.report);
    let started = Instant::now();
    let (train, eval) = load_data(cfg, ctx.rank == 0, report)?;
    let (model, spec) = setup::model::<Autodiff<B>>(cfg, device)?;
    let mesh = cfg.parallel.mesh(ctx)?;
    // Dropped before `mesh`: a failure marks the process failed before any NCCL group is
    // dropped. The trainer itself drops earlier (inside the closure), which is safe only
    // because every NCCL communicator it holds is also held here: its groups are the
    // mesh's, and the splits it makes of them (kv-head copies, the tied-embedding pair)
    // are cached in the group they were split from. A split the trainer made of its own
    // would need the guard moved into the closure.
    let failing = parallel::nccl::FailGuard::new();
    let result = (|| -> Result<()> {
        let mut trainer = Trainer::builder(model, train, &cfg.training)
            .shuffle(cfg.data.shuffle)
            .precision(cfg.model.dtype)
            .parallel(&mesh, &cfg.parallel)
            .reporter(report)
            .build()?;
        if cfg.checkpoint.resume {
            resume(&mut trainer, &saving::root(&cfg.run_dir()))?;
        }
        let last = train_loop(cfg, job, &mut trainer, eval.as_deref())?;
        if let Some(rows) = &eval {
            evaluate(&trainer, rows)?;
        }
        let lead = ctx.rank == 0;
        export(cfg, trainer, spec, device)?;
        if lead {
            report.event(&Event::Done {
                steps: Some(cfg.training.max_steps),
                loss: last.map(|s| s.loss),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    })();
    if matches!(result, Ok(()) | Err(Error::Yielded(_))) {
        failing.ended_well();
    }
    result
}

/// The training and evaluation rows (audits printed and reported by rank 0).
fn load_data(cfg: &JobConfig, lead: bool, report: &Report) -> Result<(Vec<Row>, Option<Vec<Row>>)> {
    let train_path = setup::required_file("data.train", cfg.data.train.as_deref(), "train")?;
    let mut files: Vec<&Path> = vec![&train_path];
    files.extend(cfg.data.eval.as_deref());
    let tokenizer = setup::tokenizer_for(&cfg.model.path, &files)?;
    let vocab = trainer::ModelConfig::from_dir(&cfg.model.path)?.vocab_size;
    let load = |key, path: &Path, split| -> Result<Vec<Row>> {
        let (rows, audit) = setup::dataset(key, path, tokenizer.as_ref(), &cfg.data)?;
        setup::check_vocab(key, &audit, vocab)?;
        if lead {
            println!("{audit}");
            report.event(&Event::Audit { split, audit });
        }
        Ok(rows)
    };
    let train = load("data.train", &train_path, Split::Train)?;
    let eval = match &cfg.data.eval {
        Some(p) => Some(load("data.eval", p, Split::Eval)?),
        None => None,
    };
    Ok((train, eval))
}

/// Go on from the newest checkpoint that verifies, if any: rank 0 picks it, every rank
/// reads its part.
fn resume<B: TrainBackend>(trainer: &mut Trainer<B>, root: &Path) -> Result<()> {
    use parallel::Collectives;
    let world = trainer.mesh().world.clone();
    let mut found = [-1i64];
    if world.rank() == 0 {
        if let Some(step) = saving::find_resume(root, trainer.report())? {
            found[0] = step as i64;
        }
    }
    world.broadcast(&mut found, 0)?;
    if let Ok(step) = u64::try_from(found[0]) {
        let dir = saving::resume(trainer, root, step)?;
        if world.rank() == 0 {
            println!("resuming from {} (step {step})", dir.display());
            trainer.report().event(&Event::Resumed {
                step,
                from_checkpoint: dir,
            });
        }
    }
    Ok(())
}

/// Steps until `training.max_steps`, evaluating and checkpointing as configured; the last
/// step's report (none if the run had nothing left to do).
///
/// In a tidal window, before every step the ranks agree whether another step still fits
/// (`crate::tidal::worker`); when it does not they take the final checkpoint if that fits,
/// and return [`Error::Yielded`].
fn train_loop<B: TrainBackend>(
    cfg: &JobConfig,
    job: &Job<'_>,
    trainer: &mut Trainer<B>,
    eval: Option<&[Row]>,
) -> Result<Option<StepReport>> {
    let decided = job.decided;
    let t = &cfg.training;
    let rank = trainer.mesh().world.rank();
    let world = trainer.mesh().world.size();
    let mut saver = Saver::new(
        saving::root(&cfg.run_dir()),
        rank,
        world,
        trainer.report().clone(),
        cfg.checkpoint.clone(),
        if rank == 0 {
            checkpoint::sharded::model_files(&cfg.model.path)?
        } else {
            Vec::new()
        },
    );
    let saved_state = serde_json::json!({"plan": decided.event(world), "config": cfg.to_toml()?});
    let predicted = decided.auto.as_ref().filter(|_| rank == 0);
    let mut check = PlanCheck::new(t.max_steps.saturating_sub(trainer.steps_done()));
    let delay = crate::hooks::step_delay(rank);
    let mut tide = Tide::new(job.window, trainer.steps_done());
    let mut last = None;
    while trainer.steps_done() < t.max_steps {
        if let Some(tide) = &mut tide {
            let done = trainer.steps_done();
            let verdict = tide.boundary(&*trainer.mesh().world, done, saver.in_flight())?;
            if verdict != Verdict::Continue {
                return Err(yield_now(trainer, tide, &mut saver, &saved_state, verdict));
            }
        }
        let s = trainer.step()?;
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        if let Some(auto) = predicted {
            check.record(auto.candidate.step_time_s, s.step_time, trainer.report());
        }
        if let Some(rows) = eval {
            if t.eval_every > 0 && s.step % t.eval_every == 0 && s.step < t.max_steps {
                evaluate(trainer, rows)?;
            }
        }
        if saver.due(s.step, t.max_steps) {
            // Never start a checkpoint that cannot commit before the window's deadline.
            if let Some(tide) = &mut tide {
                if !tide.save_fits(&*trainer.mesh().world, saver.in_flight())? {
                    return Err(yield_now(
                        trainer,
                        tide,
                        &mut saver,
                        &saved_state,
                        Verdict::Stop,
                    ));
                }
            }
            saver.save(trainer, &saved_state)?;
            if let Some(tide) = &mut tide {
                tide.saving(s.step);
                tide.pause();
            }
        }
        if let (Some(tide), Some((_, took))) = (&mut tide, saver.finished()) {
            tide.saved(took);
        }
        last = Some(s);
    }
    saver.wait()?;
    Ok(last)
}

/// The window ends (or a preemption came) before the next step: save the steps taken if
/// `verdict` says a checkpoint still commits in time, else keep the last one; rank 0
/// reports which. The error to stop this rank with.
fn yield_now<B: TrainBackend>(
    trainer: &Trainer<B>,
    tide: &mut Tide,
    saver: &mut Saver,
    saved_state: &serde_json::Value,
    verdict: Verdict,
) -> Error {
    let step = trainer.steps_done();
    let mut save = || -> Result<()> {
        // A save already under way for this step commits in the wait below.
        if verdict == Verdict::Checkpoint && tide.unsaved(step) > 0 {
            saver.save(trainer, saved_state)?;
            tide.saving(step);
        }
        saver.wait()?;
        Ok(())
    };
    if let Err(e) = save() {
        return e;
    }
    let lost_steps = tide.unsaved(step);
    if trainer.mesh().world.rank() == 0 {
        trainer.report().event(&Event::Yield {
            step,
            checkpointed: tide.all_saved(step),
            lost_steps,
            at: crate::tidal::now(),
        });
    }
    Error::Yielded(format!(
        "stopped before step {} for the window's end ({lost_steps} steps since the last checkpoint)",
        step + 1
    ))
}

/// The automatic plan's predicted step time next to the measured one, once
/// [`PlanCheck::STEPS`] steps (or all there are) have run: the median of the steps after
/// the first, which warms up.
struct PlanCheck {
    after: usize,
    times: Vec<f64>,
}

impl PlanCheck {
    const STEPS: u64 = 4;

    /// For a run with `remaining` steps left (fewer after a resume).
    fn new(remaining: u64) -> Self {
        Self {
            after: Self::STEPS.min(remaining) as usize,
            times: Vec::new(),
        }
    }

    fn record(&mut self, predicted: f64, seconds: f64, report: &Report) {
        self.times.push(seconds);
        if self.times.len() != self.after {
            return;
        }
        let mut t: Vec<f64> = self
            .times
            .iter()
            .copied()
            .skip(usize::from(self.times.len() > 1))
            .collect();
        t.sort_by(f64::total_cmp);
        let measured = t.get(t.len() / 2).copied().unwrap_or(seconds);
        report.event(&Event::PlanCheck {
            predicted_step_time_s: predicted,
            measured_step_time_s: measured,
            measured_over_predicted: measured / predicted,
            steps: self.times.len(),
        });
    }
}

/// Evaluate on `rows` (every rank takes part); rank 0 logs the result.
fn evaluate<B: TrainBackend>(trainer: &Trainer<B>, rows: &[Row]) -> Result<()> {
    let r = trainer.evaluate(rows)?;
    if trainer.mesh().world.rank() == 0 {
        let step = trainer.steps_done();
        tracing::info!(step, loss = format!("{:.4}", r.loss), r.tokens, "eval");
        trainer.report().event(&Event::Eval {
            step,
            loss: r.loss,
            tokens: r.tokens,
        });
    }
    Ok(())
}

/// Rank 0 writes the result: the adapter (LoRA) and/or the merged model (full SFT, or
/// `export.merged`). Every rank takes part in gathering the slices.
fn export<B: trainer::ParallelBackend>(
    cfg: &JobConfig,
    trainer: Trainer<Autodiff<B>>,
    spec: Option<LoraSpec>,
    device: &B::Device,
) -> Result<()> {
    let whole = || Ok(setup::model::<Autodiff<B>>(cfg, device)?.0);
    let report = trainer.report().clone();
    let Some(model) = trainer.into_whole_model(whole)? else {
        return Ok(());
    };
    let export = cfg.run_dir().join("export");
    if let Some(spec) = &spec {
        let dir = export.join("adapter");
        let base = cfg.model.path.display().to_string();
        trainer::lora::save_adapter(&model, spec, Some(base), &dir)?;
        println!("adapter written to {}", dir.display());
        report.event(&Event::Export {
            format: ExportFormat::Peft,
            path: dir,
        });
    }
    if spec.is_none() || cfg.export.merged {
        let dir = export.join("model");
        // Under bf16 the base the adapters trained on was kept rounded to bf16: the merged
        // model takes the base as loaded and the trained adapters.
        let model = if spec.is_some() && cfg.model.dtype != checkpoint::DType::F32 {
            let adapters = parallel::dp::values_where(&model, |path| path.contains(".lora."));
            parallel::dp::replace_by_path(whole()?, adapters)
        } else {
            model
        };
        trainer::export::save_hf_model(&model, &cfg.model.path, &dir, cfg.export.dtype)?;
        println!("model written to {}", dir.display());
        report.event(&Event::Export {
            format: ExportFormat::Hf,
            path: dir,
        });
    }
    Ok(())
}
