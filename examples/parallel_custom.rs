//! A hand-written training loop for any dp×tp×pp×ep layout: `ParallelOptions` says how
//! the job is laid out, `mesh` puts this rank in it, and the trainer builder cuts the
//! model into this rank's stage, experts and slices and wires every collective. The
//! trainer reports its steps to the launcher itself. Run once per rank by `launch run`:
//!
//! cargo build --release --example parallel_custom
//! # tp2 × pp2 (the default layout)
//! launch run --nproc-per-node 4 -- target/release/examples/parallel_custom MODEL DATA
//! # ep2 × tp2 on a Mixtral
//! launch run --nproc-per-node 4 -- target/release/examples/parallel_custom MIXTRAL DATA --ep 2 --pp 1
//! # the same job in one process, for comparison
//! target/release/examples/parallel_custom MODEL DATA --tp 1 --pp 1
//!
//! Flags: --tp N, --pp N, --ep N (dp follows from the world), --steps N, --lora. Rank 0
//! prints `step N loss L` after every step and `eval L` at the end.

use std::path::PathBuf;

use anyhow::{bail, Context};
use tidemill::prelude::*;

struct Args {
    model: PathBuf,
    data: PathBuf,
    parallel: ParallelOptions,
    steps: u64,
    lora: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut positional = Vec::new();
    let mut parallel = ParallelOptions {
        tp: 2,
        pp: 2,
        ..Default::default()
    };
    let (mut steps, mut lora) = (5, false);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |flag: &str| -> anyhow::Result<usize> {
            let v = it.next().with_context(|| format!("{flag} needs a value"))?;
            v.parse()
                .with_context(|| format!("{flag} {v}: not a number"))
        };
        match arg.as_str() {
            "--tp" => parallel.tp = number("--tp")?,
            "--pp" => parallel.pp = number("--pp")?,
            "--ep" => parallel.ep = number("--ep")?,
            "--steps" => steps = number("--steps")? as u64,
            "--lora" => lora = true,
            flag if flag.starts_with("--") => bail!("unknown flag {flag}"),
            path => positional.push(PathBuf::from(path)),
        }
    }
    let [model, data] = <[PathBuf; 2]>::try_from(positional)
        .map_err(|_| anyhow::anyhow!("usage: parallel_custom MODEL DATA [flags]"))?;
    Ok(Args {
        model,
        data,
        parallel,
        steps,
        lora,
    })
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let ctx = init().context("reading the launcher's environment")?;
    let mesh = args.parallel.mesh(&ctx)?;

    // Every rank loads the whole model and data (the builder keeps this rank's share).
    let device = Default::default();
    let base = load_hf_model::<CpuTrain>(&args.model, !args.lora, &device)?;
    let model = match args.lora {
        true => lora::apply(base, &LoraSpec::default(), 3)?.0,
        false => base,
    };
    let tokenizer = match needs_tokenizer(&args.data)? {
        true => Some(TextTokenizer::load(&args.model)?),
        false => None,
    };
    let data = DataOptions {
        max_seq_len: 64,
        packing: false,
        ..Default::default()
    };
    let (rows, _) = load_dataset(&args.data, tokenizer.as_ref(), &data)?;

    let options = TrainOptions {
        max_steps: args.steps,
        global_batch: 8,
        lr: 1e-2,
        warmup_steps: 2,
        max_grad_norm: 0.8,
        seed: 3,
        ..Default::default()
    };
    let mut trainer = Trainer::builder(model, rows.clone(), &options)
        .parallel(&mesh, &args.parallel)
        .build()?;
    while trainer.steps_done() < options.max_steps {
        let s = trainer.step()?;
        if ctx.rank == 0 {
            println!("step {} loss {:e}", s.step, s.loss);
        }
    }
    let eval = trainer.evaluate(&rows)?;
    if ctx.rank == 0 {
        println!("eval {:e}", eval.loss);
    }
    Ok(())
}
