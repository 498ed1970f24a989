//! tidemill's outputs load unchanged in peft / transformers and give tidemill's numbers.
//!
//! tools/golden/roundtrip.sh trained the jobs in tests/fixtures/roundtrip/*.toml with
//! tidemill, committed the adapters / HF export, and recorded the eval loss that
//! `peft.PeftModel.from_pretrained` (or `AutoModelForCausalLM.from_pretrained`) computes on
//! them. Here we train the same jobs again and check: tidemill's eval loss equals peft's
//! (1e-4), the fresh result equals the committed one, and tidemill loads the committed files
//! to the same loss.

use std::path::Path;

use crate::common::*;
use serde_json::Value;
use tidemill::launcher::JobConfig;
use tidemill::trainer::{evaluate, load_hf_model, lora};

fn roundtrip_golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("roundtrip/golden.json")).expect("golden");
    serde_json::from_str(&text).expect("json")
}

/// Train the job into a temp run dir; return the run dir and the final eval loss it logged.
fn train(job: &str) -> (tempfile::TempDir, f64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let set = format!("job.run_dir=\"{}\"", tmp.path().display());
    let path = fixtures().join(format!("roundtrip/{job}.toml"));
    let config = JobConfig::load(&path, &[set]).expect("job config");
    tidemill::launcher::run(&config).expect("training runs");
    let events = std::fs::read_to_string(tmp.path().join("events.jsonl")).expect("events");
    let loss = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "eval")
        .last()
        .and_then(|e| e["loss"].as_f64())
        .expect("an eval event");
    (tmp, loss)
}

fn adapter_loss(base: &str, adapter: &Path) -> f64 {
    let model = load_hf_model::<Cpu>(&model_dir(base), false, &Default::default()).expect("base");
    let (model, _) = lora::load_adapter(model, adapter, false).expect("adapter loads");
    evaluate(&model, &token_rows("eval_tokens.jsonl", false, 64), 4)
        .expect("eval")
        .loss
}

fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let a = tidemill::checkpoint::read_safetensors(a).expect("a");
    let b = tidemill::checkpoint::read_safetensors(b).expect("b");
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| {
            t.data
                .iter()
                .zip(&b[k].data)
                .map(|(x, y)| f64::from((x - y).abs()))
        })
        .fold(0.0, f64::max)
}

fn lora_roundtrip(name: &str) {
    let job = format!("lora_{name}");
    let peft_loss = roundtrip_golden()[&job]["loss"]
        .as_f64()
        .expect("golden loss");
    let (run, ours) = train(&job);
    assert!(
        rel_diff(ours, peft_loss) < 1e-4,
        "{job}: tidemill {ours} vs peft {peft_loss}"
    );
    let committed = fixtures().join("roundtrip").join(&job);
    let fresh = run.path().join("export/adapter");
    let diff = max_abs_diff(
        &committed.join("adapter_model.safetensors"),
        &fresh.join("adapter_model.safetensors"),
    );
    assert!(
        diff < 1e-4,
        "{job}: retrained adapter differs from the committed one by {diff}"
    );
    let config = |dir: &Path| -> Value {
        let text =
            std::fs::read_to_string(dir.join("adapter_config.json")).expect("adapter_config.json");
        let mut v: Value = serde_json::from_str(&text).expect("json");
        v["base_model_name_or_path"] = Value::Null;
        v
    };
    assert_eq!(
        config(&fresh),
        config(&committed),
        "{job}: adapter_config.json changed"
    );
    let loaded = adapter_loss(name, &committed);
    assert!(
        rel_diff(loaded, peft_loss) < 1e-4,
        "{job}: committed adapter {loaded} vs peft {peft_loss}"
    );
}

#[test]
fn lora_llama2_loads_in_peft() {
    lora_roundtrip("llama2");
}

#[test]
fn rslora_qwen2_with_biases_loads_in_peft() {
    lora_roundtrip("qwen2");
}

#[test]
fn full_sft_export_loads_in_transformers() {
    let hf_loss = roundtrip_golden()["sft_llama2"]["loss"]
        .as_f64()
        .expect("golden loss");
    let (run, ours) = train("sft_llama2");
    assert!(
        rel_diff(ours, hf_loss) < 1e-4,
        "tidemill {ours} vs transformers {hf_loss}"
    );
    let committed = fixtures().join("roundtrip/sft_llama2");
    let diff = max_abs_diff(
        &committed.join("model.safetensors"),
        &run.path().join("export/model/model.safetensors"),
    );
    // Adam moves a weight whose gradient is at rounding level by a whole ±lr step, so a
    // different summation order (SIMD, threads) may flip a few such steps: allow one (lr 1e-3).
    assert!(
        diff < 1e-3,
        "retrained model differs from the committed one by {diff}"
    );
    let model = load_hf_model::<Cpu>(&committed, false, &Default::default()).expect("export loads");
    let loaded = evaluate(&model, &token_rows("eval_tokens.jsonl", false, 64), 4)
        .expect("eval")
        .loss;
    assert!(
        rel_diff(loaded, hf_loss) < 1e-4,
        "committed export {loaded} vs transformers {hf_loss}"
    );
}

#[test]
fn mixtral_expert_lora_with_rslora_loads_in_peft() {
    // peft (transformers 5) fuses w1/w3 adapters; tidemill writes rsLoRA as the equivalent
    // plain alpha so the fused branch keeps the alpha/sqrt(r) scale.
    lora_roundtrip("mixtral");
    let config =
        std::fs::read_to_string(fixtures().join("roundtrip/lora_mixtral/adapter_config.json"))
            .expect("config");
    let config: Value = serde_json::from_str(&config).expect("json");
    assert_eq!(config["use_rslora"], false);
    assert!(
        (config["lora_alpha"].as_f64().expect("alpha") - 16.0).abs() < 1e-9,
        "8·sqrt(4) = 16: {config}"
    );
}

#[test]
fn mixtral_w1_without_w2_and_w3_is_refused() {
    let model =
        load_hf_model::<Cpu>(&model_dir("mixtral"), false, &Default::default()).expect("base");
    let spec = tidemill::trainer::LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["w1".into(), "q_proj".into()],
        ..Default::default()
    };
    let err = lora::add_lora(model, &spec, 0)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("w1, w2 and w3"), "{err}");
}
