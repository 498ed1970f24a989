use std::time::Duration;

use super::*;
use crate::DType;

/// `rows × cols` values `r·100 + c`.
fn grid(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (r * 100 + c) as f32))
        .collect()
}

fn cut(values: &[f32], cols: usize, s: &Slice) -> Vec<f32> {
    let mut out = Vec::new();
    for r in s.start[0]..s.start[0] + s.len[0] {
        for c in s.start[1]..s.start[1] + s.len[1] {
            out.push(values[r * cols + c]);
        }
    }
    out
}

/// Two ranks: "w" [4, 6] cut in columns (3 each), "b" [6] whole on rank 0, "h" [2, 2]
/// in bf16 cut in rows.
fn save(root: &Path, step: u64) -> PathBuf {
    let staging = stage(root, step).unwrap();
    let w = grid(4, 6);
    let h = [1.5f32, -2.0, 0.25, 8.0];
    for rank in 0..2 {
        let file = format!("rank-{rank:05}.safetensors");
        let ws = Slice::along(&[4, 6], 1, 3 * rank, 3);
        let hs = Slice::along(&[2, 2], 0, rank, 1);
        let mut tensors = vec![
            ("w".to_string(), DType::F32, ws.len.clone()),
            ("h".to_string(), DType::BF16, hs.len.clone()),
        ];
        if rank == 0 {
            tensors.push(("b".to_string(), DType::F32, vec![6]));
        }
        let mut writer = ShardWriter::create(&staging.join(&file), &tensors).unwrap();
        writer.append_f32(&cut(&w, 6, &ws), DType::F32).unwrap();
        writer
            .append_f32(&h[2 * rank..2 * rank + 2], DType::BF16)
            .unwrap();
        if rank == 0 {
            writer
                .append_f32(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], DType::F32)
                .unwrap();
        }
        let entry = writer.finish().unwrap();
        let mut part = Part::default();
        let mut add = |name: &str, shape: Vec<usize>, dtype, slice| {
            part.tensors.insert(
                name.into(),
                TensorEntry {
                    shape,
                    dtype,
                    pieces: vec![Piece {
                        file: file.clone(),
                        slice,
                    }],
                },
            );
        };
        add("w", vec![4, 6], DType::F32, ws);
        add("h", vec![2, 2], DType::BF16, hs);
        if rank == 0 {
            add("b", vec![6], DType::F32, Slice::whole(&[6]));
        }
        part.files.insert(file.clone(), entry);
        write_part(&staging, rank, &part).unwrap();
    }
    let state = serde_json::json!({"step": step});
    commit(root, &staging, step, 2, state, Duration::from_secs(5)).unwrap()
}

#[test]
fn any_box_reads_back_from_the_pieces_that_hold_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save(tmp.path(), 7);
    assert_eq!(dir, tmp.path().join("step-00000007"));
    let c = Checkpoint::open(&dir, true).unwrap();
    assert_eq!(c.step(), 7);
    assert_eq!(c.manifest.state["step"], 7);
    let w = grid(4, 6);
    assert_eq!(c.read("w", &Slice::whole(&[4, 6])).unwrap(), w);
    // Across both ranks' pieces, as another layout would ask.
    for s in [
        Slice {
            start: vec![1, 2],
            len: vec![2, 3],
        },
        Slice::along(&[4, 6], 0, 2, 2),
        Slice {
            start: vec![3, 5],
            len: vec![1, 1],
        },
    ] {
        assert_eq!(c.read("w", &s).unwrap(), cut(&w, 6, &s), "{s:?}");
    }
    assert_eq!(
        c.read("h", &Slice::whole(&[2, 2])).unwrap(),
        [1.5, -2.0, 0.25, 8.0]
    );
    assert_eq!(
        c.read_bytes("h", &Slice::along(&[2, 2], 0, 1, 1))
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        c.read("b", &Slice::along(&[6], 0, 4, 2)).unwrap(),
        [4.0, 5.0]
    );
    let err = c.read("w", &Slice::along(&[4, 6], 1, 4, 3)).unwrap_err();
    assert!(err.reason.contains("not inside"), "{err}");
    assert!(c.read("nope", &Slice::whole(&[1])).is_err());
    // The files are valid safetensors for any reader.
    let t = crate::read_safetensors(&dir.join("rank-00001.safetensors")).unwrap();
    assert_eq!(t["w"].shape, [4, 3]);
}

#[test]
fn a_damaged_newest_checkpoint_is_skipped_naming_the_file() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 4] = [
        (
            "missing shard",
            |d| std::fs::remove_file(d.join("rank-00001.safetensors")).unwrap(),
            "rank-00001.safetensors: missing",
        ),
        (
            "checksum",
            |d| {
                let p = d.join("rank-00000.safetensors");
                let mut bytes = std::fs::read(&p).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 0x40;
                std::fs::write(&p, bytes).unwrap();
            },
            "rank-00000.safetensors: SHA-256",
        ),
        (
            "truncated",
            |d| {
                let p = d.join("rank-00001.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
            },
            "rank-00001.safetensors: 231 bytes, the manifest says 236",
        ),
        (
            "no manifest",
            |d| std::fs::remove_file(d.join(MANIFEST)).unwrap(),
            "manifest.json: no manifest",
        ),
    ];
    for (what, damage, says) in cases {
        let tmp = tempfile::tempdir().unwrap();
        save(tmp.path(), 10);
        let newest = save(tmp.path(), 20);
        damage(&newest);
        let (found, skipped) = latest(tmp.path());
        assert_eq!(found.map(|c| c.step()), Some(10), "{what}");
        assert_eq!(skipped.len(), 1, "{what}");
        let msg = skipped[0].error.to_string();
        assert!(msg.contains(says), "{what}: {msg}");
        assert!(msg.contains("step-00000020"), "{what}: {msg}");
    }
    // Nothing valid at all: none, every one named.
    let tmp = tempfile::tempdir().unwrap();
    let only = save(tmp.path(), 5);
    std::fs::remove_file(only.join(MANIFEST)).unwrap();
    let (found, skipped) = latest(tmp.path());
    assert!(found.is_none());
    assert_eq!(skipped.len(), 1);
}

#[test]
fn an_uncommitted_save_is_never_taken_for_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    save(tmp.path(), 1);
    // A save stopped at any point stays in its hidden staging directory.
    let staging = stage(tmp.path(), 2).unwrap();
    std::fs::write(staging.join(MANIFEST), b"{}").unwrap();
    assert_eq!(committed(tmp.path()).len(), 1);
    assert_eq!(latest(tmp.path()).0.map(|c| c.step()), Some(1));
    clean_staging(tmp.path()).unwrap();
    assert!(!staging.exists());
    assert!(tmp.path().join("step-00000001").exists());
}

#[test]
fn commit_refuses_pieces_that_do_not_cover_a_tensor_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let staging = stage(tmp.path(), 3).unwrap();
    let file = "rank-00000.safetensors".to_string();
    let half = Slice::along(&[4], 0, 0, 2);
    let mut w =
        ShardWriter::create(&staging.join(&file), &[("v".into(), DType::F32, vec![2])]).unwrap();
    w.append_f32(&[1.0, 2.0], DType::F32).unwrap();
    let mut part = Part::default();
    part.files.insert(file.clone(), w.finish().unwrap());
    part.tensors.insert(
        "v".into(),
        TensorEntry {
            shape: vec![4],
            dtype: DType::F32,
            pieces: vec![Piece { file, slice: half }],
        },
    );
    write_part(&staging, 0, &part).unwrap();
    let err = commit(
        tmp.path(),
        &staging,
        3,
        1,
        serde_json::Value::Null,
        Duration::from_secs(1),
    );
    assert!(err.unwrap_err().to_string().contains("hold 2 of its 4"));
    assert!(committed(tmp.path()).is_empty());
    // And a part that never comes times out, committing nothing.
    let err = commit(
        tmp.path(),
        &staging,
        3,
        2,
        serde_json::Value::Null,
        Duration::from_millis(50),
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("rank-00001.part.json"));
}

#[test]
fn retention_keeps_the_newest_and_never_deletes_it() {
    let tmp = tempfile::tempdir().unwrap();
    for step in [1, 2, 3, 4] {
        save(tmp.path(), step);
    }
    let gone = retire(tmp.path(), 2).unwrap();
    assert_eq!(gone.len(), 2);
    let left: Vec<u64> = committed(tmp.path()).iter().map(|c| c.0).collect();
    assert_eq!(left, [3, 4]);
    retire(tmp.path(), 0).unwrap();
    let left: Vec<u64> = committed(tmp.path()).iter().map(|c| c.0).collect();
    assert_eq!(left, [4]);
}

#[test]
fn writer_refuses_a_short_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.safetensors");
    let mut w = ShardWriter::create(&p, &[("a".into(), DType::F32, vec![3])]).unwrap();
    w.append_f32(&[1.0], DType::F32).unwrap();
    assert!(w.finish().unwrap_err().to_string().contains("announces"));
}
