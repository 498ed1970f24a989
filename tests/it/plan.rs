//! The strategy search against published numbers: Megatron-LM's SC'21 Table 1 (GPT 1.7B–1T
//! on A100-80GB), priced at the published layout and searched freely; and `strategy =
//! "auto"` on the CPU test world: it picks a layout that trains, never one the model says
//! will not fit, and logs the measured step time next to the prediction.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::*;
use serde_json::Value;

use tidemill::launcher::plan::profiles;
use tidemill::parallel::plan::{search, Job, Mode, ModelShape, Precision, Space};

const TABLE: &str = include_str!("../fixtures/megatron_sc21_table1.csv");

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

/// Megatron's GPT in mixed precision, as in the paper.
fn gpt(r: &Row) -> Job {
    Job {
        model: ModelShape::gpt(r.layers, r.hidden, r.heads, VOCAB),
        seq_len: SEQ,
        global_batch: r.batch,
        mode: Mode::Full,
        precision: Precision::Bf16Mixed,
        sequence_parallel: false,
        // The paper's scatter/gather optimisation of pipeline sends.
        scatter_gather_sends: true,
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
        assert!(best.estimate.memory.total() <= hw.memory_bytes());
    }
    println!("worst |predicted/published − 1| = {worst:.3}");
}

/// A full-SFT job on the llama3 fixture with `strategy = "auto"` and hardware profile
/// `hardware` (the CPU profile with `memory_gib` of memory, nothing reserved).
fn auto_job(dir: &Path, memory_gib: f64) -> PathBuf {
    let cpu = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hardware/cpu.toml"),
    )
    .expect("cpu profile");
    let profile = cpu
        .replace("memory_gib = 4.0", &format!("memory_gib = {memory_gib}"))
        .replace("reserved_gib = 0.25", "reserved_gib = 0.0");
    assert_ne!(profile, cpu, "the cpu profile's memory lines moved");
    let hw = dir.join("small.toml");
    std::fs::write(&hw, profile).expect("profile");
    let data = fixtures().join("data");
    let body = format!(
        "[job]\nname = \"auto\"\nrun_dir = \"{run}\"\n[model]\npath = \"{model}\"\n[data]\n\
         train = \"{train}\"\nmax_seq_len = 64\npacking = false\n[training]\nmax_steps = 4\n\
         global_batch = 8\nmicro_batch = 1\nlr = 1e-2\nseed = 3\n[parallel]\n\
         strategy = \"auto\"\nhardware = \"{hw}\"\n",
        run = dir.join("run").display(),
        model = model_dir("llama3").display(),
        train = data.join("train_tokens.jsonl").display(),
        hw = hw.display(),
    );
    let path = dir.join("auto.toml");
    std::fs::write(&path, body).expect("job");
    path
}

fn train(job: &Path, nproc: usize, sets: &[&str]) -> (std::process::Output, Vec<Value>) {
    let run = job.parent().expect("dir").join("run");
    let _ = std::fs::remove_dir_all(&run);
    let out = launch_train(job, nproc, sets);
    (out, run_events(&run))
}

fn losses(events: &[Value]) -> Vec<f64> {
    events
        .iter()
        .filter(|e| e["event"] == "step" && e["rank"] == 0)
        .map(|e| e["loss"].as_f64().expect("loss"))
        .collect()
}

#[test]
fn strategy_auto_trains_the_layout_it_picks_and_never_one_that_does_not_fit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Plenty of memory: the search may pick any layout; 0.5 MiB: data parallelism (the
    // whole model on each rank) does not fit, a tensor-parallel layout does.
    for (memory_gib, sharded) in [(4.0, false), (0.0005, true)] {
        let job = auto_job(tmp.path(), memory_gib);
        let (one, reference) = train(&job, 1, &["parallel.strategy=\"manual\""]);
        assert!(one.status.success(), "{}", stderr(&one));
        let (out, events) = train(&job, 4, &[]);
        assert!(out.status.success(), "{memory_gib} GiB: {}", stderr(&out));
        let start = events
            .iter()
            .find(|e| e["event"] == "start")
            .expect("start");
        let auto = &start["plan"]["auto"];
        let n = |k: &str| auto[k].as_u64().expect(k) as usize;
        println!("{memory_gib} GiB per rank: picked {auto}");
        assert_eq!(n("dp") * n("tp") * n("pp") * n("ep"), 4, "{auto}");
        assert_eq!(start["plan"]["tp"], auto["tp"]);
        assert_eq!(start["plan"]["dp"], auto["dp"]);
        assert!(
            auto["mem_gb_per_gpu"].as_f64().expect("mem") <= memory_gib,
            "{auto}"
        );
        assert!(auto["step_time_s"].as_f64().expect("time") > 0.0);
        if sharded {
            assert!(
                n("tp") * n("pp") > 1,
                "dp=4 does not fit in {memory_gib} GiB: {auto}"
            );
        }
        let steps: Vec<&Value> = events.iter().filter(|e| e["event"] == "step").collect();
        assert_eq!(steps.len(), 4 * 4, "every rank finishes every step");
        let (a, b) = (losses(&reference), losses(&events));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                rel_diff(*y, *x) < 1e-4,
                "{auto}: losses {b:?} vs one process {a:?}"
            );
        }
        let check = events
            .iter()
            .find(|e| e["event"] == "plan_check")
            .expect("a plan_check event");
        println!(
            "  predicted {:.4} s/step, measured {:.4} s/step",
            check["predicted_step_time_s"], check["measured_step_time_s"]
        );
        assert_eq!(check["predicted_step_time_s"], auto["step_time_s"]);
        assert!(check["measured_step_time_s"].as_f64().expect("measured") > 0.0);
    }
    // Too little memory for any layout: refused before anything starts, naming the reason.
    let job = auto_job(tmp.path(), 0.0001);
    let (out, events) = train(&job, 4, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("parallel.strategy") && err.contains("does not fit"),
        "{err}"
    );
    assert!(events.is_empty(), "nothing started");
}

#[test]
fn launch_plan_prints_candidates_best_first_and_every_rejection_as_json() {
    let out = plan_for(
        LLAMA3_8B,
        &[
            "--seq-len",
            "4096",
            "--global-batch",
            "64",
            "--nnodes",
            "2",
            "--hardware",
            "h100-80g",
            "--top",
            "5",
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    let c = v["candidates"].as_array().expect("candidates");
    assert_eq!(c.len(), 5);
    for key in [
        "dp",
        "tp",
        "pp",
        "ep",
        "micro_batch",
        "recompute",
        "zero1",
        "virtual_stages",
        "step_time_s",
        "tflops_per_gpu",
        "mfu",
        "mem_gb_per_gpu",
    ] {
        assert!(!c[0][key].is_null(), "{key} in {}", c[0]);
    }
    let times: Vec<f64> = c
        .iter()
        .map(|c| c["step_time_s"].as_f64().expect("t"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let rejected = v["rejected"].as_array().expect("rejected");
    assert!(rejected.iter().any(|r| r["reason"]
        .as_str()
        .expect("reason")
        .contains("does not fit")));
    assert!(rejected.iter().all(|r| r["layout"].is_string()));
    // One layout priced: every candidate has it.
    let out = plan_for(
        &[
            "--layers", "32", "--hidden", "4096", "--heads", "32", "--vocab", "32000",
        ],
        &[
            "--seq-len",
            "2048",
            "--global-batch",
            "64",
            "--nnodes",
            "2",
            "--tp",
            "8",
            "--pp",
            "2",
            "--format",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    for c in v["candidates"].as_array().expect("candidates") {
        assert_eq!((c["tp"].as_u64(), c["pp"].as_u64()), (Some(8), Some(2)));
    }
    // A calibrated profile of this machine is a profile `--hardware` takes.
    let tmp = tempfile::tempdir().expect("tempdir");
    let profile = tmp.path().join("here.toml");
    let out = launch(&[
        "plan",
        "--calibrate",
        "--gpus-per-node",
        "2",
        "--out",
        profile.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&profile).expect("profile written");
    assert!(
        text.contains("peak_tflops") && text.contains("memory_bandwidth_gbs"),
        "{text}"
    );
    let out = plan_tiny(&[
        "--gpus-per-node",
        "2",
        "--hardware",
        profile.to_str().expect("utf-8"),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["hardware"], "calibrated-cpu");
    assert!(!v["candidates"].as_array().expect("candidates").is_empty());
    // Bad input names the flag.
    let out = launch(&["plan", "--layers", "32"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--hidden"), "{}", stderr(&out));
    let out = plan_tiny(&["--hardware", "b200"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--hardware"), "{}", stderr(&out));
}

/// Llama-3 8B's dimensions as `launch plan` flags.
const LLAMA3_8B: &[&str] = &[
    "--layers",
    "32",
    "--hidden",
    "4096",
    "--heads",
    "32",
    "--kv-heads",
    "8",
    "--ffn",
    "14336",
    "--vocab",
    "128256",
];

/// `launch plan` for the model given by `model` flags, with `more` flags.
fn plan_for(model: &[&str], more: &[&str]) -> std::process::Output {
    let mut args = vec!["plan"];
    args.extend_from_slice(model);
    args.extend_from_slice(more);
    launch(&args)
}

/// `launch plan` for a two-layer model of width 64, with `more` flags.
fn plan_tiny(more: &[&str]) -> std::process::Output {
    let tiny = [
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--vocab",
        "512",
        "--seq-len",
        "64",
        "--global-batch",
        "8",
    ];
    plan_for(&tiny, more)
}
