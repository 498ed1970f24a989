//! Unit tests for `peft`.

use super::*;
use crate::peft_config::tests::PEFT_WRITTEN;
use crate::write_safetensors;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const Q: &str = "base_model.model.model.layers.0.self_attn.q_proj";

fn adapter(r: usize) -> TensorMap {
    let mut m = TensorMap::new();
    // Exactly representable in bf16, so bf16-written fixtures compare equal.
    let a = (0..r * 4).map(|i| i as f32 * 0.125).collect();
    let b = (0..3 * r).map(|i| -(i as f32) * 0.25).collect();
    m.insert(format!("{Q}.lora_A.weight"), HostTensor::new(vec![r, 4], a));
    m.insert(format!("{Q}.lora_B.weight"), HostTensor::new(vec![3, r], b));
    m
}

fn config(r: usize) -> AdapterConfig {
    AdapterConfig::lora(
        r,
        2.0 * r as f64,
        0.05,
        vec!["q_proj".into()],
        false,
        Some("Qwen/Qwen2-0.5B".into()),
    )
}

fn names(dir: &Path) -> Result<Vec<String>, std::io::Error> {
    let mut v = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    v.sort();
    Ok(v)
}

/// Write an adapter dir by hand: `config_json` and `tensors` in bf16.
fn write_raw(dir: &Path, config_json: &str, tensors: &TensorMap) -> TestResult {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(CONFIG), config_json)?;
    write_safetensors(&dir.join(WEIGHTS), tensors, DType::BF16, &BTreeMap::new())?;
    Ok(())
}

#[test]
fn round_trip_into_a_new_directory() -> TestResult {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("export").join("adapter");
    save_peft_adapter(&dir, &config(2), &adapter(2))?;
    assert_eq!(names(&dir)?, [CONFIG, WEIGHTS]);
    assert_eq!(
        names(&root.path().join("export"))?,
        ["adapter"],
        "staging dir left behind"
    );
    let (c, t) = load_peft_adapter(&dir)?;
    assert_eq!(c, config(2));
    assert_eq!(t, adapter(2));
    let json: serde_json::Value = serde_json::from_str(&fs::read_to_string(dir.join(CONFIG))?)?;
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["target_modules"], serde_json::json!(["q_proj"]));
    Ok(())
}

#[test]
fn saving_over_an_existing_directory_keeps_other_files() -> TestResult {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("adapter");
    save_peft_adapter(&dir, &config(2), &adapter(2))?;
    fs::write(dir.join("README.md"), "notes")?;
    save_peft_adapter(&dir, &config(4), &adapter(4))?;
    assert_eq!(names(&dir)?, ["README.md", CONFIG, WEIGHTS]);
    assert_eq!(names(root.path())?, ["adapter"]);
    let (c, t) = load_peft_adapter(&dir)?;
    assert_eq!((c.r, t), (4, adapter(4)));
    Ok(())
}

#[test]
fn loads_peft_written_adapter_with_unknown_fields_and_string_targets() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_raw(dir.path(), PEFT_WRITTEN, &adapter(8))?;
    let (c, t) = load_peft_adapter(dir.path())?;
    assert_eq!(c.target_modules, vec![r".*\.(q_proj|v_proj)$".to_string()]);
    assert_eq!(c.scaling(), 2.0);
    assert_eq!(t, adapter(8));
    Ok(())
}

#[test]
fn bin_only_adapter_asks_for_conversion() -> TestResult {
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join(CONFIG), PEFT_WRITTEN)?;
    fs::write(dir.path().join(WEIGHTS_BIN), b"pickle")?;
    let err = load_peft_adapter(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(err, Error::UnsupportedAdapter { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("adapter_model.bin") && msg.contains("safe_serialization"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn missing_files_are_io_errors_naming_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = load_peft_adapter(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains(CONFIG),
        "{err}"
    );
    fs::write(dir.path().join(CONFIG), PEFT_WRITTEN)?;
    let err = load_peft_adapter(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains(WEIGHTS),
        "{err}"
    );
    Ok(())
}

#[test]
fn unsupported_fields_are_named_on_load() -> TestResult {
    for (field, value) in [
        ("peft_type", r#""IA3""#),
        ("use_dora", "true"),
        ("rank_pattern", r#"{"q_proj": 4}"#),
        ("alpha_pattern", r#"{"q_proj": 4.0}"#),
        ("fan_in_fan_out", "true"),
        ("bias", r#""all""#),
        ("modules_to_save", r#"["lm_head"]"#),
    ] {
        let dir = tempfile::tempdir()?;
        let mut raw: serde_json::Value = serde_json::from_str(PEFT_WRITTEN)?;
        raw[field] = serde_json::from_str(value)?;
        write_raw(dir.path(), &raw.to_string(), &adapter(8))?;
        let err = load_peft_adapter(dir.path()).err().ok_or(field)?;
        assert!(
            matches!(err, Error::UnsupportedAdapter { .. }),
            "{field}: {err:?}"
        );
        let msg = err.to_string();
        let file = dir.path().join(CONFIG).display().to_string();
        assert!(msg.contains(&file) && msg.contains(field), "{msg}");
    }
    Ok(())
}

#[test]
fn rank_mismatch_on_load_names_file_and_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_raw(dir.path(), PEFT_WRITTEN, &adapter(4))?; // config says r = 8
    let err = load_peft_adapter(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(err, Error::InvalidAdapter { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(WEIGHTS) && msg.contains(&format!("`{Q}.lora_A.weight`")),
        "{msg}"
    );
    Ok(())
}

#[test]
fn invalid_adapter_save_leaves_nothing() -> TestResult {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("adapter");
    let err = save_peft_adapter(&dir, &config(2), &adapter(3))
        .err()
        .ok_or("expected an error")?;
    assert!(err.to_string().contains("lora_A.weight"), "{err}");
    let mut bad_key = adapter(2);
    bad_key.insert(
        "model.layers.0.mlp.lora_A.weight".into(),
        HostTensor::new(vec![2, 1], vec![0.0; 2]),
    );
    let err = save_peft_adapter(&dir, &config(2), &bad_key)
        .err()
        .ok_or("expected an error")?;
    assert!(
        err.to_string()
            .contains("`model.layers.0.mlp.lora_A.weight`"),
        "{err}"
    );
    let mut bad_len = adapter(2);
    bad_len.insert(
        format!("{Q}.lora_B.weight"),
        HostTensor {
            shape: vec![3, 2],
            data: vec![0.0],
        },
    );
    assert!(matches!(
        save_peft_adapter(&dir, &config(2), &bad_len),
        Err(Error::DataLength { .. })
    ));
    assert_eq!(names(root.path())?, Vec::<String>::new());
    Ok(())
}
