//! Packing does not change the loss (no attention across samples, positions restart), and
//! gradient accumulation over micro-batches equals one big batch.

use crate::common::*;
use tidemill::trainer::{
    evaluate, evaluate_trained, load_hf_model, lora, LoraSpec, LrSchedule, StepReport,
    TrainOptions, Trainer,
};

fn packed_equals_unpacked(name: &str) {
    let model =
        load_hf_model::<Cpu>(&model_dir(name), false, &Default::default()).expect("fixture loads");
    let unpacked = token_rows("train_tokens.jsonl", false, 64);
    let packed = token_rows("train_tokens.jsonl", true, 64);
    assert!(packed.len() < unpacked.len(), "packing must merge rows");
    let a = evaluate(&model, &unpacked, 4).expect("unpacked");
    let b = evaluate(&model, &packed, 2).expect("packed");
    assert_eq!(a.tokens, b.tokens);
    assert!(
        rel_diff(b.loss, a.loss) < 1e-5,
        "{name}: packed {} vs unpacked {}",
        b.loss,
        a.loss
    );
}

#[test]
fn packing_llama3_gqa() {
    packed_equals_unpacked("llama3");
}

#[test]
fn packing_mixtral() {
    packed_equals_unpacked("mixtral");
}

/// Three steps; returns their stats and the loss on all training rows before and after.
fn train(
    name: &str,
    micro_batch: usize,
    lora_spec: Option<&LoraSpec>,
) -> (Vec<StepReport>, f64, f64) {
    let device = Default::default();
    let mut model =
        load_hf_model::<Train>(&model_dir(name), lora_spec.is_none(), &device).expect("loads");
    if let Some(spec) = lora_spec {
        model = lora::add_lora(model, spec, 7).expect("lora");
    }
    let rows = token_rows("train_tokens.jsonl", false, 64);
    let opts = TrainOptions {
        max_steps: 3,
        global_batch: 4,
        micro_batch,
        lr: 1e-2,
        schedule: LrSchedule::Constant,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        seed: 3,
        ..Default::default()
    };
    let mut trainer = Trainer::builder(model, rows.clone(), &opts)
        .build()
        .expect("trainer");
    let before = evaluate_trained(trainer.model(), &rows, 4)
        .expect("eval")
        .loss;
    let stats = (0..3).map(|_| trainer.step().expect("step")).collect();
    let after = evaluate_trained(trainer.model(), &rows, 4)
        .expect("eval")
        .loss;
    (stats, before, after)
}

fn accumulation_equals_big_batch(name: &str, spec: Option<&LoraSpec>) {
    let (big, before, after) = train(name, 4, spec);
    let (small, _, after_small) = train(name, 1, spec);
    for (a, b) in big.iter().zip(&small) {
        assert_eq!(a.supervised_tokens, b.supervised_tokens);
        assert!(
            rel_diff(b.loss, a.loss) < 1e-5,
            "{name} step {}: 4×1 {} vs 1×4 {}",
            a.step,
            b.loss,
            a.loss
        );
        assert!(
            rel_diff(b.grad_norm, a.grad_norm) < 1e-4,
            "{name} step {} grad norm",
            a.step
        );
    }
    assert!(
        rel_diff(after_small, after) < 1e-5,
        "{name}: trained models differ: {after_small} vs {after}"
    );
    assert!(
        after < before - 0.05,
        "{name}: training loss falls: {before} -> {after}"
    );
}

#[test]
fn accumulation_full_sft_llama2() {
    accumulation_equals_big_batch("llama2", None);
}

#[test]
fn accumulation_lora_qwen2() {
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    accumulation_equals_big_batch("qwen2", Some(&spec));
}
