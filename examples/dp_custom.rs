//! Your own training binary, data parallel: run it once per rank with `launch run`, which
//! sets RANK/WORLD_SIZE/... like torchrun; `init()` turns them into the rank's context
//! with the data-plane group, and the trainer built over its mesh shards every global
//! batch across the ranks and all-reduces gradients. It reports its steps to the launcher
//! itself.
//!
//! cargo build --release --example dp_custom
//! cargo run --release --bin launch -- run --nproc-per-node 2 -- \
//!     target/release/examples/dp_custom assets/quickstart/model assets/quickstart/data/train.jsonl 10
//!
//! Rank 0 prints one line per step: `step N loss L`; every rank's progress goes to
//! `runs/dp_custom/events.jsonl`.

use std::path::PathBuf;

use anyhow::Context;
use tidemill::prelude::*;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "assets/quickstart/model".into()),
    );
    let train = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "assets/quickstart/data/train.jsonl".into()),
    );
    let steps: u64 = args
        .next()
        .map_or(Ok(10), |s| s.parse())
        .context("steps must be a number")?;

    let ctx = init().context("reading the launcher's environment")?;
    // Every rank data parallel (the default options: dp = the world).
    let parallel = ParallelOptions::default();
    let mesh = parallel.mesh(&ctx)?;
    // Same seed on every rank: identical base weights and adapters everywhere.
    let base = load_hf_model::<CpuTrain>(&model_dir, false, &Default::default())
        .context("loading the model")?;
    let (model, _) = lora::apply(base, &LoraSpec::default(), 0)?;
    let tokenizer = TextTokenizer::load(&model_dir)?;
    let data = DataOptions {
        max_seq_len: 256,
        ..Default::default()
    };
    let (rows, _) = load_dataset(&train, Some(&tokenizer), &data)?;
    let eval_rows = rows.clone();
    let options = TrainOptions {
        max_steps: steps,
        lr: 2e-3,
        schedule: LrSchedule::Cosine,
        warmup_steps: 2,
        seed: 0,
        ..Default::default()
    };
    let mut trainer = Trainer::builder(model, rows, &options)
        .parallel(&mesh, &parallel)
        .build()?;
    while trainer.steps_done() < steps {
        let s = trainer.step()?;
        if ctx.rank == 0 {
            println!("step {} loss {:.6}", s.step, s.loss);
        }
    }
    // An event of your own goes into the job's events.jsonl as a `user` event.
    let eval = trainer.evaluate(&eval_rows)?;
    ctx.reporter
        .event(&serde_json::json!({"event": "finished", "steps": steps, "loss": eval.loss}));
    Ok(())
}
