//! `launch convert` end to end: HF → sharded at every layout of the parallelism tests → HF
//! gives back the same tensors (names, dtypes, shapes, bytes) and exactly the files that
//! `tools/golden/convert_golden.py` loaded in transformers with identical logits; an offline
//! reshard changes nothing either; bad input is refused naming the culprit, leaving nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn convert(from: &str, to: &str, args: &[&str]) {
    let mut all = vec!["convert", "--from", from, "--to", to];
    all.extend_from_slice(args);
    let out = launch(&all);
    assert!(out.status.success(), "{all:?}: {}", stderr(&out));
    let report: Value = serde_json::from_str(stdout(&out).lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{all:?}: last line not JSON ({e}): {}", stdout(&out)));
    assert!(report["tensors"].as_u64().unwrap_or(0) > 0, "{report}");
}

fn convert_golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("convert_golden.json"))
        .expect("convert_golden.json");
    serde_json::from_str(&text).expect("convert_golden.json is JSON")
}

/// SHA-256 of every file in `dir`, by name.
fn hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let bytes = std::fs::read(e.path()).expect("file");
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.insert(e.file_name().to_string_lossy().into_owned(), hex);
    }
    out
}

/// Every tensor of an HF model directory: name → (dtype, shape, bytes).
fn hf_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        if !e.file_name().to_string_lossy().ends_with(".safetensors") {
            continue;
        }
        let bytes = std::fs::read(e.path()).expect("file");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        for (name, view) in st.tensors() {
            let t = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            );
            assert!(out.insert(name.clone(), t).is_none(), "{name} twice");
        }
    }
    out
}

fn layouts(model: &str) -> Vec<Vec<&'static str>> {
    let mut out: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--tp", "2"],
        vec!["--tp", "4"],
        vec!["--pp", "2"],
        vec!["--tp", "2", "--pp", "2"],
    ];
    match model {
        "mixtral" => out.extend([
            vec!["--ep", "2"],
            vec!["--ep", "4"],
            vec!["--tp", "2", "--ep", "2"],
            vec!["--tp", "2", "--pp", "2", "--ep", "2"],
        ]),
        "llama-deep" => out.extend([
            vec!["--pp", "2", "--virtual-stages", "3"],
            vec!["--pp", "3", "--virtual-stages", "2"],
            vec!["--tp", "2", "--pp", "2", "--virtual-stages", "2"],
            vec!["--pp", "2", "--stage-layers", "5,1"],
        ]),
        _ => {}
    }
    out
}

fn ranks(args: &[&str]) -> usize {
    args.chunks(2)
        .filter(|kv| ["--tp", "--pp", "--ep"].contains(&kv[0]))
        .map(|kv| kv[1].parse::<usize>().expect("number"))
        .product()
}

#[test]
fn hf_to_sharded_at_every_layout_and_back_gives_the_files_transformers_loaded() {
    let golden = convert_golden();
    let max = golden["max_shard_size"].as_str().expect("max_shard_size");
    let tmp = tempfile::tempdir().expect("tmp");
    for model in ["llama3", "qwen2", "mixtral", "llama-deep"] {
        let src = model_dir(model);
        let want_files: BTreeMap<String, String> =
            serde_json::from_value(golden["models"][model]["files"].clone()).expect("files");
        let original = hf_tensors(&src);
        for (i, args) in layouts(model).iter().enumerate() {
            let sharded = tmp.path().join(format!("{model}-{i}-sharded"));
            let back = tmp.path().join(format!("{model}-{i}-hf"));
            let hf_from = format!("hf:{}", src.display());
            convert(&hf_from, &format!("sharded:{}", sharded.display()), args);
            let manifest: Value = serde_json::from_str(
                &std::fs::read_to_string(sharded.join("manifest.json")).expect("manifest"),
            )
            .expect("manifest JSON");
            let files = manifest["files"].as_object().expect("files").len();
            assert_eq!(files, ranks(args), "{model} {args:?}: a file per rank");
            convert(
                &format!("sharded:{}", sharded.display()),
                &format!("hf:{}", back.display()),
                &["--max-shard-size", max],
            );
            assert_eq!(hf_tensors(&back), original, "{model} {args:?}: tensors");
            assert_eq!(hashes(&back), want_files, "{model} {args:?}: files");
        }
    }
}

#[test]
fn an_offline_reshard_keeps_every_tensor_and_the_training_state() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = model_dir("mixtral");
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    let (hf, sa) = (
        format!("hf:{}", src.display()),
        format!("sharded:{}", a.display()),
    );
    convert(&hf, &sa, &["--tp", "2", "--pp", "2", "--ep", "2"]);
    convert(&sa, &format!("sharded:{}", b.display()), &["--ep", "4"]);
    convert(
        &format!("sharded:{}", b.display()),
        &format!("hf:{}", c.display()),
        &[],
    );
    assert_eq!(hf_tensors(&c), hf_tensors(&src));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("manifest.json")).expect("m"))
            .expect("JSON");
    assert_eq!(manifest["state"]["layout"]["ep"], 4);
    assert!(manifest["extras"]["config.json"]["sha256"].is_string());
    // Expert 3 of layer 0 is on expert-parallel rank 3 alone.
    let pieces =
        &manifest["tensors"]["model.layers.0.block_sparse_moe.experts.3.w1.weight"]["pieces"];
    assert_eq!(pieces.as_array().map(Vec::len), Some(1));
    assert_eq!(pieces[0]["file"], "rank-00003.safetensors");
}

fn fails(args: &[&str], names: &str) -> String {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    let out = launch(&all);
    let err = stderr(&out);
    assert!(!out.status.success(), "{all:?} succeeded");
    assert!(!err.contains("panicked"), "{all:?} panicked: {err}");
    assert!(err.contains(names), "{all:?}: `{names}` not in {err}");
    err
}

/// Only `keep` is left in `dir` (no hidden partial output either).
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep, "{}", dir.display());
}

#[test]
fn bad_conversions_name_the_culprit_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = |p: &str| -> PathBuf { tmp.path().join(p) };
    let src = format!("hf:{}", model_dir("llama3").display());
    let out = format!("sharded:{}", t("out").display());
    fails(&["--from", "/nope", "--to", &out], "--from");
    fails(&["--from", "hf:/nope", "--to", &out], "/nope");
    fails(&["--from", &src, "--to", &out, "--tp", "3"], "tp=3");
    fails(&["--from", &src, "--to", &out, "--ep", "2"], "ep=2");
    fails(&["--from", &src, "--to", &out, "--pp", "3"], "pp=3");
    let hf_out = format!("hf:{}", t("out").display());
    fails(&["--from", &src, "--to", &hf_out], "hf → hf");
    only(tmp.path(), &[]);

    // The output exists and holds something: refused, left as it was.
    std::fs::create_dir(t("full")).expect("dir");
    std::fs::write(t("full/keep.txt"), "mine").expect("file");
    let full = format!("sharded:{}", t("full").display());
    fails(&["--from", &src, "--to", &full], "not empty");
    only(&t("full"), &["keep.txt"]);

    // A truncated weights file: named, and no output.
    std::fs::create_dir(t("broken")).expect("dir");
    let bytes = std::fs::read(model_dir("qwen2").join("model.safetensors")).expect("model");
    std::fs::write(t("broken/model.safetensors"), &bytes[..bytes.len() / 2]).expect("cut");
    std::fs::copy(
        model_dir("qwen2").join("config.json"),
        t("broken/config.json"),
    )
    .expect("config");
    let broken = format!("hf:{}", t("broken").display());
    fails(&["--from", &broken, "--to", &out], "model.safetensors");

    // A sharded checkpoint whose shard was altered: named by the checksum check.
    let good = t("good");
    convert(&src, &format!("sharded:{}", good.display()), &["--tp", "2"]);
    let shard = good.join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, bytes).expect("write");
    let from_good = format!("sharded:{}", good.display());
    fails(
        &["--from", &from_good, "--to", &hf_out],
        "rank-00001.safetensors",
    );
    only(tmp.path(), &["broken", "full", "good"]);
}
