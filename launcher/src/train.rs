//! `launch train`: one process, the whole job — audit, train, evaluate, export.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use trainer::data::Row;
use trainer::{AdamWOptions, Schedule, ScheduleKind, TrainOptions, Trainer};

use crate::config::{JobConfig, TrainingSection};
use crate::error::{require_exists, Error, Result};
use crate::events::EventLog;
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

/// Run a training job on the backend `job.device` names.
pub fn run(config: &JobConfig) -> Result<()> {
    match config.job.device.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => run_on::<burn::backend::Cuda>(config, &Default::default()),
        _ => run_on::<setup::Cpu>(config, &Default::default()),
    }
}

pub fn run_on<B: Backend>(cfg: &JobConfig, device: &B::Device) -> Result<()> {
    let started = Instant::now();
    setup::require_dir("model.path", &cfg.model.path)?;
    let train_path = setup::required_file("data.train", cfg.data.train.as_deref(), "train")?;
    if let Some(eval) = &cfg.data.eval {
        require_exists("data.eval", eval)?;
    }
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    // A rerun replaces the run's results: an old export must never pass for this run's.
    let export = run_dir.join("export");
    if export.exists() {
        std::fs::remove_dir_all(&export).map_err(io(&export))?;
    }
    let resolved = toml::to_string(cfg).map_err(|e| Error::Config {
        file: run_dir.join("config.toml"),
        message: e.to_string(),
    })?;
    checkpoint::atomic_write(&run_dir.join("config.toml"), resolved.as_bytes())?;
    let mut events = EventLog::open(&run_dir.join("events.jsonl"))?;
    let mode = if cfg.lora.is_some() { "lora" } else { "full" };
    events.emit("start", json!({"job": cfg.job.name, "model": cfg.model.path, "mode": mode}))?;

    let mut files: Vec<&Path> = vec![&train_path];
    files.extend(cfg.data.eval.as_deref());
    let tokenizer = setup::tokenizer_for(&cfg.model.path, &files)?;
    let (rows, audit) = setup::dataset("data.train", &train_path, tokenizer.as_ref(), &cfg.data)?;
    println!("{audit}");
    events.emit("audit", json!({"split": "train", "audit": audit}))?;
    let eval_set = match &cfg.data.eval {
        Some(p) => {
            let (rows, audit) = setup::dataset("data.eval", p, tokenizer.as_ref(), &cfg.data)?;
            println!("{audit}");
            events.emit("audit", json!({"split": "eval", "audit": audit}))?;
            Some((rows, audit))
        }
        None => None,
    };

    let (model, spec) = setup::model::<Autodiff<B>>(&cfg.model.path, cfg.lora.as_ref(), cfg.training.seed, device)?;
    setup::check_vocab("data.train", &audit, model.config.vocab_size)?;
    if let Some((_, eval_audit)) = &eval_set {
        setup::check_vocab("data.eval", eval_audit, model.config.vocab_size)?;
    }
    let eval_rows = eval_set.map(|(rows, _)| rows);
    let mut trainer = Trainer::new(model, rows, train_options(&cfg.training, cfg.data.shuffle))?;
    let t = &cfg.training;
    let bar = progress_bar(t.max_steps);
    let mut last_loss = f64::NAN;
    while trainer.steps_done() < t.max_steps {
        let s = trainer.step()?;
        last_loss = s.loss;
        let tokens_per_s = s.tokens as f64 / s.seconds.max(1e-9);
        events.emit(
            "step",
            json!({"step": s.step, "loss": s.loss, "lr": s.lr, "tokens_per_s": tokens_per_s,
                   "grad_norm": s.grad_norm, "tokens": s.tokens, "supervised_tokens": s.supervised_tokens}),
        )?;
        match &bar {
            Some(bar) => {
                bar.set_position(s.step);
                bar.set_message(format!("loss {:.4}  {:.0} tok/s", s.loss, tokens_per_s));
            }
            None if s.step == 1 || s.step % 10 == 0 || s.step == t.max_steps => {
                tracing::info!(step = s.step, loss = format!("{:.4}", s.loss), lr = s.lr, tokens_per_s = format!("{tokens_per_s:.0}"), "step");
            }
            None => {}
        }
        if let Some(rows) = &eval_rows {
            if t.eval_every > 0 && s.step % t.eval_every == 0 && s.step < t.max_steps {
                evaluate(&trainer, rows, t.micro_batch, &mut events)?;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    if let Some(rows) = &eval_rows {
        evaluate(&trainer, rows, t.micro_batch, &mut events)?;
    }

    let model = trainer.into_model();
    let dtype = export_dtype(&cfg.export.dtype);
    if let Some(spec) = &spec {
        let dir = export.join("adapter");
        let base = cfg.model.path.display().to_string();
        trainer::lora::save_adapter(&model, spec, Some(base), &dir)?;
        events.emit("export", json!({"format": "peft", "path": dir}))?;
        println!("adapter written to {}", dir.display());
    }
    if spec.is_none() || cfg.export.merged {
        let dir = export.join("model");
        trainer::export::save_hf_model(&model, &cfg.model.path, &dir, dtype)?;
        events.emit("export", json!({"format": "hf", "path": dir}))?;
        println!("model written to {}", dir.display());
    }
    events.emit(
        "done",
        json!({"steps": t.max_steps, "loss": last_loss, "seconds": started.elapsed().as_secs_f64()}),
    )?;
    Ok(())
}

fn evaluate<B: burn::tensor::backend::AutodiffBackend>(
    trainer: &Trainer<B>,
    rows: &[Row],
    micro_batch: usize,
    events: &mut EventLog,
) -> Result<()> {
    let r = trainer::evaluate_trained(trainer.model(), rows, micro_batch)?;
    tracing::info!(step = trainer.steps_done(), loss = format!("{:.4}", r.loss), tokens = r.tokens, "eval");
    events.emit("eval", json!({"step": trainer.steps_done(), "loss": r.loss, "tokens": r.tokens}))
}

pub fn export_dtype(name: &str) -> checkpoint::DType {
    match name {
        "bf16" => checkpoint::DType::BF16,
        "f16" => checkpoint::DType::F16,
        _ => checkpoint::DType::F32,
    }
}

/// A progress bar on a terminal; none when stderr is a pipe or file (logs instead).
fn progress_bar(steps: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(steps);
    let style = ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}
