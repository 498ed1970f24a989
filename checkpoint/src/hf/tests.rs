//! Unit tests for `hf`.

use super::*;
use crate::write_safetensors;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn tensor(n: usize, seed: f32) -> HostTensor {
    HostTensor::new(vec![n], (0..n).map(|i| seed + i as f32 * 0.5).collect())
}

/// f32 sizes 16, 8, 40, 12 bytes.
fn four() -> TensorMap {
    let mut m = TensorMap::new();
    m.insert("a".into(), tensor(4, 1.0));
    m.insert("b".into(), tensor(2, 2.0));
    m.insert("c".into(), tensor(10, 3.0));
    m.insert("d".into(), tensor(3, 4.0));
    m
}

fn names(dir: &Path) -> Result<Vec<String>, std::io::Error> {
    let mut v = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    v.sort();
    Ok(v)
}

fn expect_mismatch(dir: &Path, file: &str, key: &str) {
    match load_hf_weights(dir) {
        Err(e @ Error::IndexMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(file), "{msg}");
            assert!(msg.contains(&format!("`{key}`")), "{msg}");
        }
        other => panic!("expected IndexMismatch, got {other:?}"),
    }
}

#[test]
fn shard_plan_matches_huggingface_hub() {
    // huggingface_hub's test: sizes [6, 10, 30, 2, 2], max 10 ->
    // [layer_1], [layer_3], [layer_2], [layer_4, layer_5]. Here in f32 (x4 bytes).
    let ts: Vec<HostTensor> = [6, 10, 30, 2, 2].iter().map(|&n| tensor(n, 0.0)).collect();
    let keys = ["layer_1", "layer_2", "layer_3", "layer_4", "layer_5"];
    let entries: Vec<(&str, u64)> = keys
        .iter()
        .copied()
        .zip(ts.iter().map(|t| t.data.len() as u64 * 4))
        .collect();
    let (got, total) = plan_shards(&entries, 40);
    assert_eq!(
        got,
        vec![
            vec!["layer_1"],
            vec!["layer_3"],
            vec!["layer_2"],
            vec!["layer_4", "layer_5"]
        ]
    );
    assert_eq!(total, 200);
}

#[test]
fn shard_plans_cover_every_key_once_and_respect_the_limit() {
    let mut state = 12345u64;
    for _ in 0..200 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let count = (state >> 59) as usize + 1;
        let max = (state >> 40) % 64;
        let ts: Vec<HostTensor> = (0..count)
            .map(|i| tensor(((state >> ((i * 3) % 60)) % 12) as usize, 0.0))
            .collect();
        let keys: Vec<String> = (0..count).map(|i| format!("k{i:02}")).collect();
        let entries: Vec<(&str, u64)> = keys
            .iter()
            .map(String::as_str)
            .zip(ts.iter().map(|t| t.data.len() as u64 * 2))
            .collect();
        let bytes: BTreeMap<&str, u64> = entries.iter().copied().collect();
        let (shards, total) = plan_shards(&entries, max);
        let mut seen: Vec<&str> = shards.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, keys.iter().map(String::as_str).collect::<Vec<_>>());
        for shard in &shards {
            let size: u64 = shard.iter().map(|k| bytes[k]).sum();
            assert!(size <= max || shard.len() == 1, "shard {size} > {max}");
        }
        assert_eq!(
            total,
            ts.iter().map(|t| t.data.len() as u64 * 2).sum::<u64>()
        );
    }
}

#[test]
fn sharded_round_trip_writes_index_like_transformers() -> TestResult {
    let dir = tempfile::tempdir()?;
    save_hf_weights(dir.path(), &four(), DType::F32, 20)?;
    assert_eq!(
        names(dir.path())?,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json",
        ]
    );
    let index = fs::read_to_string(dir.path().join(INDEX))?;
    let expected = r#"{
  "metadata": {
    "total_size": 76
  },
  "weight_map": {
    "a": "model-00001-of-00003.safetensors",
    "b": "model-00003-of-00003.safetensors",
    "c": "model-00002-of-00003.safetensors",
    "d": "model-00003-of-00003.safetensors"
  }
}
"#;
    assert_eq!(index, expected);

    let loaded = load_hf_weights(dir.path())?;
    assert_eq!(loaded.tensors, four());
    assert!(loaded.dtypes.values().all(|&d| d == DType::F32));
    assert_eq!(
        loaded.files["d"],
        dir.path().join("model-00003-of-00003.safetensors")
    );
    Ok(())
}

#[test]
fn generated_sharded_round_trips() -> TestResult {
    let mut state = 99u64;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for _ in 0..8 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let dir = tempfile::tempdir()?;
            let mut m = TensorMap::new();
            for i in 0..((state >> 60) as usize + 1) {
                let rows = ((state >> (i * 4)) % 4) as usize;
                let data = (0..rows * 3).map(|j| (j as f32 - 4.0) * 0.25).collect();
                m.insert(
                    format!("model.layers.{i}.w"),
                    HostTensor::new(vec![rows, 3], data),
                );
            }
            save_hf_weights(dir.path(), &m, dtype, (state >> 32) % 48)?;
            assert_eq!(load_hf_weights(dir.path())?.tensors, m);
        }
    }
    Ok(())
}

#[test]
fn relayout_removes_stale_weight_files_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join("config.json"), "{}")?;
    fs::write(dir.path().join("model-notes.safetensors.txt"), "keep")?;
    save_hf_weights(dir.path(), &four(), DType::BF16, 10)?;
    assert!(dir.path().join(INDEX).exists());
    save_hf_weights(dir.path(), &four(), DType::BF16, 1 << 20)?;
    assert_eq!(
        names(dir.path())?,
        [
            "config.json",
            "model-notes.safetensors.txt",
            "model.safetensors"
        ]
    );
    save_hf_weights(dir.path(), &four(), DType::F32, 20)?;
    assert!(!dir.path().join(SINGLE).exists());
    assert_eq!(load_hf_weights(dir.path())?.tensors, four());
    Ok(())
}

#[test]
fn no_weights_names_the_directory() -> TestResult {
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join("pytorch_model.bin"), b"")?;
    let err = load_hf_weights(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(err, Error::NoWeights { .. }));
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    Ok(())
}

#[test]
fn missing_shard_is_io_error_naming_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    save_hf_weights(dir.path(), &four(), DType::F32, 20)?;
    let shard = dir.path().join("model-00002-of-00003.safetensors");
    fs::remove_file(&shard)?;
    match load_hf_weights(dir.path()) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains(&shard.display().to_string())),
        other => panic!("expected Io error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn shard_lacking_a_promised_key_is_a_mismatch() -> TestResult {
    let dir = tempfile::tempdir()?;
    save_hf_weights(dir.path(), &four(), DType::F32, 20)?;
    let index = fs::read_to_string(dir.path().join(INDEX))?.replace(
        "\"d\": \"model-00003-of-00003.safetensors\"",
        "\"d\": \"model-00003-of-00003.safetensors\",\n    \"z\": \"model-00001-of-00003.safetensors\"",
    );
    fs::write(dir.path().join(INDEX), index)?;
    expect_mismatch(dir.path(), "model-00001-of-00003.safetensors", "z");
    Ok(())
}

#[test]
fn key_in_two_shards_or_unlisted_is_a_mismatch() -> TestResult {
    let dir = tempfile::tempdir()?;
    let no_meta = BTreeMap::new();
    let mut first = TensorMap::new();
    first.insert("a".into(), tensor(2, 0.0));
    first.insert("b".into(), tensor(2, 1.0));
    write_safetensors(
        &dir.path().join("s1.safetensors"),
        &first,
        DType::F32,
        &no_meta,
    )?;
    let mut second = TensorMap::new();
    second.insert("b".into(), tensor(2, 1.0));
    write_safetensors(
        &dir.path().join("s2.safetensors"),
        &second,
        DType::F32,
        &no_meta,
    )?;
    let index = r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#;
    fs::write(dir.path().join(INDEX), index)?;
    expect_mismatch(dir.path(), "s1.safetensors", "b");

    let index = r#"{"weight_map": {"b": "s2.safetensors"}}"#;
    fs::write(dir.path().join(INDEX), index)?;
    fs::remove_file(dir.path().join("s1.safetensors"))?;
    second.insert("extra".into(), tensor(1, 0.0));
    write_safetensors(
        &dir.path().join("s2.safetensors"),
        &second,
        DType::F32,
        &no_meta,
    )?;
    expect_mismatch(dir.path(), "s2.safetensors", "extra");
    Ok(())
}

#[test]
fn bad_indexes_name_the_index_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(INDEX);
    fs::write(&path, r#"{"weight_map": {"a": "../outside.safetensors"}}"#)?;
    expect_mismatch(dir.path(), INDEX, "a");
    fs::write(&path, r#"{"weight_map": {}}"#)?;
    let err = load_hf_weights(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(err, Error::InvalidIndex { .. }));
    assert!(err.to_string().contains(INDEX));
    fs::write(&path, r#"{"weight_map": ["#)?;
    let err = load_hf_weights(dir.path())
        .err()
        .ok_or("expected an error")?;
    assert!(matches!(err, Error::Json { .. }));
    assert!(err.to_string().contains(INDEX));
    Ok(())
}

#[test]
fn inconsistent_tensor_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("model");
    let mut m = four();
    m.insert(
        "bad".into(),
        HostTensor {
            shape: vec![5],
            data: vec![0.0; 2],
        },
    );
    let err = save_hf_weights(&out, &m, DType::F32, 20)
        .err()
        .ok_or("expected an error")?;
    assert!(err.to_string().contains("`bad`"), "{err}");
    assert!(!out.exists());
    Ok(())
}
