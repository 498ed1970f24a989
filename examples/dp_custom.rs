//! Your own training binary, data parallel: run it once per rank with `launch run`, which
//! sets RANK/WORLD_SIZE/... like torchrun; `parallel::init()` turns them into a context
//! with the data-plane group, and `Trainer::with_data_parallel` shards every global batch
//! across the ranks and all-reduces gradients.
//!
//! cargo build --release --example dp_custom
//! cargo run --release --bin launch -- run --nproc-per-node 2 -- \
//!     target/release/examples/dp_custom assets/quickstart/model assets/quickstart/data/train.jsonl 10
//!
//! Rank 0 prints one line per step: `step N loss L`; every rank reports its progress to
//! `runs/dp_custom/events.jsonl`.

use std::path::PathBuf;

use anyhow::Context;
use burn::backend::{Autodiff, Flex};
use tidemill::parallel::dp::DataParallel;
use tidemill::trainer::data::{self, DataOptions, TextTokenizer};
use tidemill::trainer::{
    load_hf_model, lora, AdamWOptions, LoraSpec, Schedule, ScheduleKind, TrainOptions, Trainer,
};

type B = Autodiff<Flex>;

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

    let mut ctx = tidemill::parallel::init().context("reading the launcher's environment")?;
    let device = Default::default();
    // Same seed on every rank: identical base weights and adapters everywhere.
    let base = load_hf_model::<B>(&model_dir, false, &device).context("loading the model")?;
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
        use_rslora: false,
    };
    let model = lora::add_lora(base, &spec, 0)?;
    let tokenizer = TextTokenizer::load(&model_dir)?;
    let opts = DataOptions {
        max_seq_len: 256,
        packing: true,
        train_on_prompt: false,
        allow_empty_samples: false,
    };
    let (rows, _) = data::load_dataset(&train, Some(&tokenizer), &opts)?;
    let options = TrainOptions {
        global_batch: 8,
        micro_batch: 1,
        schedule: Schedule {
            kind: ScheduleKind::Cosine,
            lr: 2e-3,
            warmup_steps: 2,
            total_steps: steps,
        },
        adamw: AdamWOptions::default(),
        max_grad_norm: Some(1.0),
        seed: 0,
        shuffle: true,
    };
    let mut trainer = Trainer::new(model, rows, options)?
        .with_data_parallel(DataParallel::new(ctx.comm.clone(), false))?;
    ctx.reporter.phase("train");
    for _ in 0..steps {
        let s = trainer.step()?;
        ctx.reporter.step(
            s.step,
            s.loss,
            s.seconds,
            trainer.collective_seq(),
            serde_json::json!({"lr": s.lr}),
        );
        if ctx.rank == 0 {
            println!("step {} loss {:.6}", s.step, s.loss);
        }
    }
    Ok(())
}
