//! Unit tests for `peft_config`.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// An `adapter_config.json` as peft 0.17 writes it, with `target_modules`
/// given as a regex string.
pub(crate) const PEFT_WRITTEN: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "Qwen/Qwen2-0.5B",
  "bias": "none",
  "corda_config": null,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "runtime_config": {"ephemeral_gpu_offload": false},
  "target_modules": ".*\\.(q_proj|v_proj)$",
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false
}"#;

fn with(field: &str, value: &str) -> Result<Value, serde_json::Error> {
    let mut v: Value = serde_json::from_str(PEFT_WRITTEN)?;
    if let Some(map) = v.as_object_mut() {
        map.insert(field.to_string(), serde_json::from_str(value)?);
    }
    Ok(v)
}

#[test]
fn accepts_peft_written_config_with_unknown_fields_and_string_targets() -> TestResult {
    let raw: Value = serde_json::from_str(PEFT_WRITTEN)?;
    check_raw(&raw, Path::new("a/adapter_config.json"))?;
    let c: AdapterConfig = serde_json::from_str(PEFT_WRITTEN)?;
    c.check_supported(Path::new("a/adapter_config.json"))?;
    assert_eq!(c.target_modules, vec![r".*\.(q_proj|v_proj)$".to_string()]);
    assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 16.0, 0.05));
    assert_eq!(
        c.base_model_name_or_path.as_deref(),
        Some("Qwen/Qwen2-0.5B")
    );
    assert_eq!(c.task_type.as_deref(), Some("CAUSAL_LM"));
    assert!(c.init_lora_weights && c.inference_mode && !c.use_rslora);
    Ok(())
}

#[test]
fn minimal_config_takes_peft_defaults() -> TestResult {
    let c: AdapterConfig = serde_json::from_str(
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
            "rank_pattern": null, "init_lora_weights": "gaussian"}"#,
    )?;
    assert_eq!(c.bias, "none");
    assert!(c.inference_mode && c.init_lora_weights && !c.fan_in_fan_out);
    assert!(c.rank_pattern.is_empty() && c.alpha_pattern.is_empty());
    assert_eq!(c.lora_dropout, 0.0);
    Ok(())
}

#[test]
fn base_weight_changing_init_is_refused_by_the_typed_parse_too() {
    let r = serde_json::from_str::<AdapterConfig>(
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [], "init_lora_weights": "pissa"}"#,
    );
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("pissa"), "{msg}");
}

#[test]
fn lora_constructor_round_trips_through_json() -> TestResult {
    let c = AdapterConfig::lora(
        16,
        32.0,
        0.1,
        vec!["q_proj".into(), "v_proj".into()],
        true,
        None,
    );
    let back: AdapterConfig = serde_json::from_str(&serde_json::to_string(&c)?)?;
    assert_eq!(back, c);
    assert_eq!(c.peft_type, "LORA");
    Ok(())
}

#[test]
fn scaling_plain_and_rslora() {
    let plain = AdapterConfig::lora(16, 32.0, 0.0, vec![], false, None);
    assert_eq!(plain.scaling(), 2.0);
    let rs = AdapterConfig::lora(16, 32.0, 0.0, vec![], true, None);
    assert_eq!(rs.scaling(), 8.0);
}

#[test]
fn raw_checks_name_the_file_and_field() -> TestResult {
    let file = Path::new("out/adapter/adapter_config.json");
    for (field, value) in [
        ("peft_type", r#""IA3""#),
        ("use_dora", "true"),
        ("lora_bias", "true"),
        ("layer_replication", "[[0, 4]]"),
        ("target_parameters", r#"["experts.gate_up_proj"]"#),
        ("trainable_token_indices", "[1, 2]"),
        ("alora_invocation_tokens", "[5]"),
        ("init_lora_weights", r#""pissa""#),
    ] {
        let err = check_raw(&with(field, value)?, file).err().ok_or(field)?;
        assert!(matches!(err, Error::UnsupportedAdapter { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("out/adapter/adapter_config.json") && msg.contains(field),
            "{msg}"
        );
    }
    Ok(())
}

#[test]
fn typed_checks_name_the_file_and_field() -> TestResult {
    let file = Path::new("x/adapter_config.json");
    let base = AdapterConfig::lora(8, 16.0, 0.0, vec!["q_proj".into()], false, None);
    let cases: Vec<(&str, AdapterConfig)> = vec![
        (
            "peft_type",
            AdapterConfig {
                peft_type: "LOHA".into(),
                ..base.clone()
            },
        ),
        (
            "r",
            AdapterConfig {
                r: 0,
                ..base.clone()
            },
        ),
        (
            "rank_pattern",
            AdapterConfig {
                rank_pattern: [("q_proj".into(), 4)].into(),
                ..base.clone()
            },
        ),
        (
            "alpha_pattern",
            AdapterConfig {
                alpha_pattern: [("q_proj".into(), 4.0)].into(),
                ..base.clone()
            },
        ),
        (
            "fan_in_fan_out",
            AdapterConfig {
                fan_in_fan_out: true,
                ..base.clone()
            },
        ),
        (
            "bias",
            AdapterConfig {
                bias: "lora_only".into(),
                ..base.clone()
            },
        ),
        (
            "modules_to_save",
            AdapterConfig {
                modules_to_save: Some(vec!["lm_head".into()]),
                ..base.clone()
            },
        ),
    ];
    for (field, config) in cases {
        let err = config.check_supported(file).err().ok_or(field)?;
        let msg = err.to_string();
        assert!(
            msg.contains("x/adapter_config.json") && msg.contains(field),
            "{msg}"
        );
    }
    let empty_modules = AdapterConfig {
        modules_to_save: Some(vec![]),
        ..base
    };
    empty_modules.check_supported(file)?;
    Ok(())
}
