//! `launch eval`: mean token loss of `model.path` (+ an adapter) on `data.eval`.

use std::path::Path;

use serde_json::json;
use trainer::ParallelBackend;

use crate::config::{Device, JobConfig};
use crate::error::Result;
use crate::setup;

/// The numbers `launch eval` prints as its last line.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub tokens: usize,
    pub samples: usize,
}

/// Evaluate on the backend `job.device` names.
pub fn run(cfg: &JobConfig, adapter: Option<&Path>) -> Result<EvalReport> {
    cfg.job.device.ready()?;
    match cfg.job.device {
        Device::Cpu => run_on::<trainer::backend::Cpu>(cfg, adapter, &Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda if cfg.job.fusion => {
            run_on::<trainer::backend::CudaFused>(cfg, adapter, &Default::default())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => run_on::<burn::backend::Cuda>(cfg, adapter, &Default::default()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(crate::error::Error::Config {
            file: "config".into(),
            message: Device::Cuda.check().err().unwrap_or_default(),
        }),
    }
}

pub fn run_on<B: ParallelBackend>(
    cfg: &JobConfig,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<EvalReport> {
    setup::require_dir("model.path", &cfg.model.path)?;
    let eval_path = setup::required_file("data.eval", cfg.data.eval.as_deref(), "eval")?;
    if let Some(a) = adapter {
        setup::require_dir("--adapter", a)?;
    }
    let tokenizer = setup::tokenizer_for(&cfg.model.path, &[&eval_path])?;
    let (rows, audit) = setup::dataset("data.eval", &eval_path, tokenizer.as_ref(), &cfg.data)?;
    eprintln!("{audit}");
    let mut model = trainer::load_hf_model::<B>(&cfg.model.path, false, device)?;
    setup::check_vocab("data.eval", &audit, model.config.vocab_size)?;
    if let Some(dir) = adapter {
        model = trainer::lora::load_adapter(model, dir, false)?.0;
    }
    // In the job's precision, as the evaluation inside training runs.
    let model = trainer::model::set_precision(model, cfg.model.dtype)?;
    let r = trainer::evaluate(&model, &rows, cfg.training.micro_batch)?;
    Ok(EvalReport {
        loss: r.loss,
        tokens: r.tokens,
        samples: audit.samples,
    })
}

/// The single JSON line `launch eval` ends with.
pub fn report_line(r: &EvalReport) -> String {
    json!({"loss": r.loss, "tokens": r.tokens, "samples": r.samples}).to_string()
}
