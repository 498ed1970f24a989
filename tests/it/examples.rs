//! `examples/parallel_custom.rs`: a hand-written loop for any layout, run once per rank by
//! `launch run`, takes one process's steps (losses within 1e-5) — tp2×pp2 on a Llama, and
//! ep2×tp2 on a Mixtral.

use std::process::{Command, Output};

use crate::common::jobs::assert_same;
use crate::common::*;

/// `step N loss L` lines of rank 0, then its `eval L`.
fn losses(out: &Output) -> Vec<f64> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let value = l
                .strip_prefix("step ")
                .and_then(|l| l.split(" loss ").nth(1))
                .or_else(|| l.strip_prefix("eval "))?;
            value.parse().ok()
        })
        .collect()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The example on `model` in one process and as 4 ranks with `flags`.
fn same_as_one_process(model: &str, flags: &[&str]) {
    let exe = example("parallel_custom");
    let data = fixtures().join("data/train_tokens.jsonl");
    let args = [
        model_dir(model).display().to_string(),
        data.display().to_string(),
    ];
    let solo = Command::new(&exe)
        .args(&args)
        .args(["--tp", "1", "--pp", "1"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("example runs");
    let one = losses(&ok(solo, "one process"));
    assert_eq!(one.len(), 6, "5 steps and the evaluation: {one:?}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let out = launch_cmd()
        .args(["run", "--nproc-per-node", "4", "--run-dir"])
        .arg(&run)
        .arg("--")
        .arg(&exe)
        .args(&args)
        .args(flags)
        .output()
        .expect("launch run");
    let what = format!("{model} {flags:?} under launch run");
    assert_same(&one, &losses(&ok(out, &what)), &what);
    // The trainer reported every step of every rank without a line of reporting code.
    let steps = run_events(&run)
        .iter()
        .filter(|e| e["event"] == "step")
        .count();
    assert_eq!(steps, 4 * 5, "{what}: step events");
}

#[test]
fn parallel_custom_takes_one_process_steps_in_tp2_pp2() {
    same_as_one_process("llama2", &[]);
}

#[test]
fn parallel_custom_takes_one_process_steps_in_ep2_tp2_on_mixtral() {
    same_as_one_process("mixtral", &["--ep", "2", "--pp", "1"]);
}
