//! Mean token loss of tiny Llama 2 / Llama 3.1 / Qwen2 / Mixtral models equals
//! transformers' (golden values from tools/golden/make_fixtures.py) within 1e-4 relative.

use crate::common::*;
use tidemill::trainer::{evaluate, load_hf_model};

fn check(name: &str) {
    let golden = golden();
    let want = &golden[name];
    let model =
        load_hf_model::<Cpu>(&model_dir(name), false, &Default::default()).expect("fixture loads");
    let rows = token_rows("eval_tokens.jsonl", false, 64);
    let got = evaluate(&model, &rows, 3).expect("evaluates");
    let loss = want["loss"].as_f64().expect("golden loss");
    println!(
        "{name}: tidemill {} transformers {loss} rel {:e}",
        got.loss,
        rel_diff(got.loss, loss)
    );
    assert_eq!(
        got.tokens as u64,
        want["tokens"].as_u64().expect("golden tokens"),
        "{name}: supervised tokens"
    );
    assert!(
        rel_diff(got.loss, loss) < 1e-4,
        "{name}: tidemill {} vs transformers {loss} (rel {:e})",
        got.loss,
        rel_diff(got.loss, loss)
    );
}

#[test]
fn llama2_old_style_config_f32() {
    check("llama2");
}

#[test]
fn llama3_gqa_rope_scaling_tied_bf16_sharded() {
    check("llama3");
}

#[test]
fn qwen2_biases_f16() {
    check("qwen2");
}

#[test]
fn mixtral_top2_of_4_experts() {
    check("mixtral");
}
