//! Training and attention semantics against PyTorch/transformers
//! (`tools/golden/make_training_golden.py` → tests/fixtures/training_golden.json):
//! three full-SFT steps with gradient accumulation, `clip_grad_norm_`, `torch.optim.AdamW` and
//! transformers' schedules; and Mistral's sliding-window attention.

use crate::common::*;
use serde_json::Value;
use tidemill::trainer::{
    evaluate, evaluate_trained, load_hf_model, LrSchedule, TrainOptions, Trainer,
};

fn training_golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("training_golden.json"))
        .expect("training_golden.json");
    serde_json::from_str(&text).expect("json")
}

fn num(v: &Value) -> f64 {
    v.as_f64().expect("a number")
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    let want = &training_golden()["mistral_window4"];
    let model =
        load_hf_model::<Cpu>(&model_dir("mistral"), false, &Default::default()).expect("loads");
    assert_eq!(model.config.sliding_window, Some(4));
    let rows = token_rows("eval_tokens.jsonl", false, 64);
    let got = evaluate(&model, &rows, 3).expect("eval");
    assert!(
        rel_diff(got.loss, num(&want["loss"])) < 1e-4,
        "{} vs {}",
        got.loss,
        want["loss"]
    );
    // Packed rows keep the window inside each sample.
    let packed = evaluate(&model, &token_rows("eval_tokens.jsonl", true, 64), 2).expect("eval");
    assert!(rel_diff(packed.loss, got.loss) < 1e-5);
}

fn trajectory(key: &str, schedule: LrSchedule, warmup_steps: u64) {
    let want = &training_golden()[key];
    let device = Default::default();
    let model = load_hf_model::<Train>(&model_dir("llama2"), true, &device).expect("loads");
    let rows = token_rows("train_tokens.jsonl", false, 64);
    let opts = TrainOptions {
        max_steps: 3,
        global_batch: 4,
        micro_batch: 2,
        lr: 1e-2,
        schedule,
        warmup_steps,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        seed: 0,
        ..Default::default()
    };
    let mut trainer = Trainer::builder(model, rows, &opts)
        .shuffle(false)
        .build()
        .expect("trainer");
    for step in want["steps"].as_array().expect("steps") {
        let s = trainer.step().expect("step");
        let n = s.step;
        assert_eq!(
            s.supervised_tokens as u64,
            step["tokens"].as_u64().expect("tokens"),
            "step {n} tokens"
        );
        assert!(
            (s.lr - num(&step["lr"])).abs() < 1e-12,
            "step {n} lr {} vs {}",
            s.lr,
            step["lr"]
        );
        assert!(
            rel_diff(s.loss, num(&step["loss"])) < 1e-5,
            "{key} step {n} loss {} vs torch {}",
            s.loss,
            step["loss"]
        );
        assert!(
            rel_diff(s.grad_norm, num(&step["grad_norm"])) < 1e-4,
            "{key} step {n} grad norm {} vs torch {}",
            s.grad_norm,
            step["grad_norm"]
        );
    }
    let eval = evaluate_trained(
        trainer.model(),
        &token_rows("eval_tokens.jsonl", false, 64),
        4,
    )
    .expect("eval");
    let final_loss = num(&want["final_eval_loss"]);
    assert!(
        rel_diff(eval.loss, final_loss) < 1e-4,
        "{key}: final eval {} vs torch {final_loss}",
        eval.loss
    );
}

#[test]
fn adamw_clipping_linear_schedule_match_torch() {
    trajectory("sft_llama2_trajectory_linear", LrSchedule::Linear, 0);
}

#[test]
fn cosine_warmup_lr_zero_first_step_matches_torch() {
    trajectory("sft_llama2_trajectory", LrSchedule::Cosine, 1);
}
