//! Unit tests for `safetensors_io`.

use super::*;
use std::fs;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn sample() -> TensorMap {
    let mut m = TensorMap::new();
    // Values exactly representable in bf16 and f16.
    m.insert(
        "a.weight".into(),
        HostTensor::new(vec![2, 3], vec![1.0, -2.0, 0.5, 0.25, 3.0, -0.125]),
    );
    m.insert(
        "b.bias".into(),
        HostTensor::new(vec![3], vec![0.0, 1.5, -4.0]),
    );
    m.insert("scalar".into(), HostTensor::new(vec![], vec![7.0]));
    m.insert("empty".into(), HostTensor::new(vec![0, 4], vec![]));
    m
}

/// 8-byte little-endian header length, the header, then `data`.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn expect_malformed(path: &Path, needle: &str) {
    match read_safetensors(path) {
        Err(e @ Error::Safetensors { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
        other => panic!("expected Error::Safetensors, got {other:?}"),
    }
}

#[test]
fn round_trips_in_every_dtype() -> TestResult {
    let dir = tempfile::tempdir()?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&path, &sample(), dtype, &BTreeMap::new())?;
        let (back, dtypes) = read_safetensors_with_dtypes(&path)?;
        assert_eq!(back, sample());
        assert!(dtypes.values().all(|&d| d == dtype));
        assert_eq!(dtypes.len(), 4);
    }
    Ok(())
}

#[test]
fn bf16_rounds_to_nearest_even() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("r.safetensors");
    // 1 + 2^-8 is halfway between bf16 neighbours 1.0 and 1 + 2^-7: ties to even (1.0).
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
    let mut m = TensorMap::new();
    m.insert(
        "x".into(),
        HostTensor::new(
            vec![2],
            vec![1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)],
        ),
    );
    write_safetensors(&path, &m, DType::BF16, &BTreeMap::new())?;
    let back = read_safetensors(&path)?;
    assert_eq!(back["x"].data, vec![1.0, 1.0 + 2f32.powi(-6)]);
    Ok(())
}

#[test]
fn metadata_always_has_format_pt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    let meta = BTreeMap::from([("step".to_string(), "10".to_string())]);
    write_safetensors(&path, &sample(), DType::F32, &meta)?;
    let bytes = fs::read(&path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)?;
    let got = header.metadata().clone().unwrap_or_default();
    assert_eq!(got.get("format").map(String::as_str), Some("pt"));
    assert_eq!(got.get("step").map(String::as_str), Some("10"));
    Ok(())
}

#[test]
fn truncated_file_is_an_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("t.safetensors");
    write_safetensors(&path, &sample(), DType::F32, &BTreeMap::new())?;
    let bytes = fs::read(&path)?;
    for cut in [bytes.len() - 1, bytes.len() - 8, 20, 8, 3, 0] {
        fs::write(&path, &bytes[..cut])?;
        assert!(
            matches!(read_safetensors(&path), Err(Error::Safetensors { .. })),
            "cut {cut}"
        );
    }
    fs::write(&path, &bytes[..bytes.len() - 4])?;
    expect_malformed(&path, "truncated");
    Ok(())
}

#[test]
fn header_lying_about_offsets_is_an_error_naming_the_tensor() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lie.safetensors");
    let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,4096]}}"#;
    fs::write(&path, raw_file(header, &[0u8; 16]))?;
    expect_malformed(&path, "`w`");
    // Offsets within the buffer but not matching shape * dtype.
    let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    fs::write(&path, raw_file(header, &[0u8; 16]))?;
    expect_malformed(&path, "invalid");
    // Header length prefix larger than the file.
    let mut bytes = raw_file(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0u8; 4],
    );
    bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
    fs::write(&path, bytes)?;
    expect_malformed(&path, "header claims 1000 bytes");
    // Not JSON.
    fs::write(&path, raw_file("{not json}", &[]))?;
    expect_malformed(&path, "JSON");
    Ok(())
}

#[test]
fn offsets_near_usize_max_do_not_panic() -> TestResult {
    // Eight U8 tensors of 2^61 - 1 bytes and one of 4 pass safetensors'
    // own per-tensor checks and sum to 2^64 - 4, which overflows its
    // end-of-buffer arithmetic.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("overflow.safetensors");
    let big: u64 = (1 << 61) - 1;
    let mut entries = Vec::new();
    for i in 0..8u64 {
        entries.push(format!(
            r#""t{i}":{{"dtype":"U8","shape":[{big}],"data_offsets":[{},{}]}}"#,
            i * big,
            (i + 1) * big
        ));
    }
    let end = 8 * big;
    entries.push(format!(
        r#""t8":{{"dtype":"U8","shape":[4],"data_offsets":[{end},{}]}}"#,
        end + 4
    ));
    fs::write(
        &path,
        raw_file(&format!("{{{}}}", entries.join(",")), &[0u8; 8]),
    )?;
    expect_malformed(&path, "claims bytes");
    Ok(())
}

#[test]
fn unsupported_dtype_names_file_and_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ids.safetensors");
    let raw = [0u8; 16];
    let view = TensorView::new(Dtype::I64, vec![2], &raw)?;
    fs::write(
        &path,
        safetensors::serialize([("model.embed_tokens.weight", view)], None)?,
    )?;
    let err = read_safetensors(&path).err().ok_or("expected an error")?;
    assert!(matches!(&err, Error::UnsupportedDtype { dtype, .. } if dtype == "I64"));
    assert_eq!(
        err.to_string(),
        format!(
            "reading {}: tensor `model.embed_tokens.weight` has dtype I64; supported: F32, BF16, F16",
            path.display()
        )
    );
    Ok(())
}

#[test]
fn shape_data_mismatch_is_rejected_and_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.safetensors");
    let mut m = TensorMap::new();
    m.insert(
        "w".into(),
        HostTensor {
            shape: vec![2, 2],
            data: vec![1.0; 3],
        },
    );
    let err = write_safetensors(&path, &m, DType::F32, &BTreeMap::new())
        .err()
        .ok_or("expected an error")?;
    assert!(err.to_string().contains("`w`"), "{err}");
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    assert_eq!(fs::read_dir(dir.path())?.count(), 0);
    Ok(())
}

#[test]
fn missing_file_is_io_error_naming_it() {
    let path = Path::new("/nonexistent/model.safetensors");
    let err = read_safetensors(path).err();
    assert!(matches!(&err, Some(Error::Io { .. })));
    assert!(err
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains("/nonexistent/model.safetensors"));
}
