//! The strategy search against published numbers: Megatron-LM's SC'21 Table 1 (GPT 1.7B–1T
//! on A100-80GB), priced at the published layout and searched freely.

use std::time::Instant;

use tidemill::launcher::plan::profiles;
use tidemill::parallel::plan::{search, Job, Mode, ModelShape, Precision, Space};

const TABLE: &str = include_str!("fixtures/megatron_sc21_table1.csv");

struct Row {
    params_b: f64,
    heads: usize,
    hidden: usize,
    layers: usize,
    tp: usize,
    pp: usize,
    gpus: usize,
    batch: usize,
    tflops: f64,
}

fn rows() -> Vec<Row> {
    TABLE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("params_b"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let u = |i: usize| f[i].trim().parse::<usize>().expect("integer column");
            Row {
                params_b: f[0].parse().expect("params"),
                heads: u(1),
                hidden: u(2),
                layers: u(3),
                tp: u(4),
                pp: u(5),
                gpus: u(6),
                batch: u(7),
                tflops: f[8].parse().expect("tflops"),
            }
        })
        .collect()
}

const SEQ: usize = 2048;
const VOCAB: usize = 51200;

/// Megatron's GPT: LayerNorm, biases everywhere, GeLU MLP of 4h, tied embeddings, dropout;
/// mixed precision as in the paper.
fn gpt(r: &Row) -> Job {
    Job {
        model: ModelShape {
            layers: r.layers,
            hidden: r.hidden,
            heads: r.heads,
            kv_heads: r.heads,
            head_dim: r.hidden / r.heads,
            ffn: 4 * r.hidden,
            vocab: VOCAB,
            experts: 0,
            top_k: 0,
            gated_mlp: false,
            tied_embeddings: true,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            norm_bias: true,
            dropout: true,
        },
        seq_len: SEQ,
        global_batch: r.batch,
        mode: Mode::Full,
        precision: Precision::Bf16Mixed,
        sequence_parallel: false,
    }
}

/// The paper's FLOPs per step (with recomputation): 96·B·s·l·h²·(1 + s/6h + V/16lh).
fn paper_flops(r: &Row) -> f64 {
    let (b, s, l, h, v) = (
        r.batch as f64,
        SEQ as f64,
        r.layers as f64,
        r.hidden as f64,
        VOCAB as f64,
    );
    96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
}

#[test]
fn megatron_sc21_table_1_is_predicted_within_15_percent_and_the_search_does_no_worse() {
    let hw = profiles::load("a100-80g").expect("a100 profile");
    println!(
        "{:>7} {:>5} {:>3} {:>3} {:>8} {:>9} {:>6}   {:<44} {:>9}   {:>6}",
        "params",
        "GPUs",
        "t",
        "p",
        "paper",
        "predicted",
        "ratio",
        "search's first choice",
        "predicted",
        "search"
    );
    let mut worst: f64 = 0.0;
    for r in rows() {
        let job = gpt(&r);
        let published = Space {
            tp: Some(r.tp),
            pp: Some(r.pp),
            recompute: Some(true),
            zero1: Some(false),
            ..Space::default()
        };
        let priced = search(&job, &hw, r.gpus, &published);
        let at = priced.best().unwrap_or_else(|| {
            panic!(
                "{}B: the published layout is rejected: {:?}",
                r.params_b,
                &priced.rejected[..priced.rejected.len().min(5)]
            )
        });
        let predicted = paper_flops(&r) / at.estimate.step_time_s / r.gpus as f64 / 1e12;
        let ratio = predicted / r.tflops;
        worst = worst.max((ratio - 1.0).abs());
        let started = Instant::now();
        let free = search(&job, &hw, r.gpus, &Space::default());
        let took = started.elapsed().as_secs_f64();
        let best = free.best().expect("some layout fits");
        let best_tflops = paper_flops(&r) / best.estimate.step_time_s / r.gpus as f64 / 1e12;
        println!(
            "{:>6.1}B {:>5} {:>3} {:>3} {:>8.0} {:>9.1} {:>6.3}   {:<44} {:>9.1}   {:>5.3}s",
            r.params_b,
            r.gpus,
            r.tp,
            r.pp,
            r.tflops,
            predicted,
            ratio,
            best.candidate.to_string(),
            best_tflops,
            took
        );
        println!("        published layout priced best at {}", at.candidate);
        assert!(
            (ratio - 1.0).abs() <= 0.15,
            "{}B: predicted {predicted:.1} TFLOP/s/GPU vs published {}",
            r.params_b,
            r.tflops
        );
        assert!(
            best.estimate.step_time_s <= at.estimate.step_time_s * (1.0 + 1e-12),
            "{}B: the search's first choice {} is slower than the published layout",
            r.params_b,
            best.candidate
        );
        assert!(best.estimate.memory.total() <= hw.usable_bytes());
    }
    println!("worst |predicted/published − 1| = {worst:.3}");
}
