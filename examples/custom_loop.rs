//! A hand-written training loop on the library API: load an HF model, add LoRA, build the
//! dataset, train, save a PEFT adapter.
//!
//! cargo run --release --example custom_loop -- assets/quickstart/model assets/quickstart/data/train.jsonl /tmp/adapter

use std::path::PathBuf;

use anyhow::Context;
use tidemill::prelude::*;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let model_dir = args
        .next()
        .unwrap_or_else(|| "assets/quickstart/model".into());
    let train = args
        .next()
        .unwrap_or_else(|| "assets/quickstart/data/train.jsonl".into());
    let out = args
        .next()
        .unwrap_or_else(|| "runs/custom_loop/adapter".into());
    let device = Default::default();

    // Frozen base + fresh adapters on every attention and MLP projection.
    let base =
        load_hf_model::<CpuTrain>(&model_dir, false, &device).context("loading the model")?;
    let spec = LoraSpec {
        dropout: 0.05,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let (model, spec) = lora::apply(base, &spec, 0)?;

    // Chat data rendered with the model's template; loss on assistant tokens only.
    let tokenizer = TextTokenizer::load(&model_dir)?;
    let opts = DataOptions {
        max_seq_len: 256,
        ..Default::default()
    };
    let (rows, audit) = load_dataset(&train, Some(&tokenizer), &opts)?;
    println!("{audit}");

    let options = TrainOptions {
        max_steps: 30,
        micro_batch: 4,
        lr: 2e-3,
        schedule: LrSchedule::Cosine,
        warmup_steps: 3,
        seed: 0,
        ..Default::default()
    };
    let mut trainer = Trainer::builder(model, rows, &options).build()?;
    while trainer.steps_done() < options.max_steps {
        let s = trainer.step()?;
        println!(
            "step {:>3}  loss {:.4}  lr {:.2e}  grad-norm {:.3}",
            s.step, s.loss, s.lr, s.grad_norm
        );
    }
    lora::save_adapter(
        trainer.model(),
        &spec,
        Some(model_dir.display().to_string()),
        &out,
    )?;
    println!("adapter written to {}", out.display());
    Ok(())
}
