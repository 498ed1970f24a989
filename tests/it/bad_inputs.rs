//! Bad input gets a clear error naming the file, key or line — never a panic, and `launch`
//! exits 2 for bad configuration, 1 for failures while running.

use std::path::{Path, PathBuf};

use crate::common::*;
use tidemill::trainer::load_hf_model;

/// A copy of a fixture model in a temp dir, to damage.
fn copy_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for entry in std::fs::read_dir(model_dir(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match load_hf_model::<Cpu>(dir, false, &Default::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn job(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, body).expect("write job");
    path
}

fn eval_job(dir: &Path, model: &Path, eval: &Path) -> PathBuf {
    job(
        dir,
        &format!(
            "[job]\nname = \"bad\"\nrun_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\neval = \"{}\"\npacking = false\n",
            dir.join("run").display(),
            model.display(),
            eval.display()
        ),
    )
}

#[test]
fn unknown_config_key_exits_2_naming_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = job(
        tmp.path(),
        "[job]\nname = \"x\"\n[model]\npath = \"m\"\n[training]\nlearnin_rate = 1\n",
    );
    let out = launch(&["train", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("learnin_rate"), "{}", stderr(&out));
    let out = launch(&[
        "train",
        path.to_str().expect("utf8"),
        "--set",
        "lora.rank=4",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_files_exit_2_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = launch(&[
        "train",
        tmp.path().join("nope.toml").to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));

    let missing = tmp.path().join("no-model");
    let eval = fixtures().join("data/eval_tokens.jsonl");
    let path = eval_job(tmp.path(), &missing, &eval);
    let out = launch(&["eval", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("model.path") && stderr(&out).contains("no-model"),
        "{}",
        stderr(&out)
    );

    let train = job(
        tmp.path(),
        &format!(
            "[job]\nname = \"t\"\nrun_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n",
            tmp.path().join("run").display(),
            model_dir("llama2").display(),
            tmp.path().join("absent.jsonl").display()
        ),
    );
    let out = launch(&["train", train.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data.train") && stderr(&out).contains("absent.jsonl"),
        "{}",
        stderr(&out)
    );

    let path = eval_job(
        tmp.path(),
        &model_dir("llama2"),
        &tmp.path().join("gone.jsonl"),
    );
    let out = launch(&["eval", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("data.eval") && stderr(&out).contains("gone.jsonl"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_tmp, dir) = copy_model("llama2");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn header_lying_about_offsets_names_file_and_tensor() {
    let (_tmp, dir) = copy_model("llama2");
    let file = dir.join("model.safetensors");
    let header = r#"{"model.norm.weight":{"dtype":"F32","shape":[32],"data_offsets":[0,4096]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 128]);
    std::fs::write(&file, bytes).expect("write");
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.norm.weight"),
        "{msg}"
    );
}

#[test]
fn wrong_shapes_name_tensor_and_both_shapes() {
    let (_tmp, dir) = copy_model("llama2");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    let changed = config.replace("\"intermediate_size\": 64", "\"intermediate_size\": 65");
    assert_ne!(config, changed, "fixture config has intermediate_size 64");
    std::fs::write(dir.join("config.json"), changed).expect("write");
    let msg = load_err(&dir);
    assert!(
        msg.contains("mlp.gate_proj.weight")
            && msg.contains("[65, 32]")
            && msg.contains("[64, 32]"),
        "{msg}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let (_tmp, dir) = copy_model("llama2");
    let mut tensors =
        tidemill::checkpoint::read_safetensors(&dir.join("model.safetensors")).expect("read");
    let norm = tensors.remove("model.norm.weight").expect("norm");
    let meta = Default::default();
    let file = dir.join("model.safetensors");
    tidemill::checkpoint::write_safetensors(
        &file,
        &tensors,
        tidemill::checkpoint::DType::F32,
        &meta,
    )
    .expect("write");
    let msg = load_err(&dir);
    assert!(msg.contains("missing tensor `model.norm.weight`"), "{msg}");
    tensors.insert("model.norm.weight".into(), norm.clone());
    tensors.insert("model.extra.weight".into(), norm);
    tidemill::checkpoint::write_safetensors(
        &file,
        &tensors,
        tidemill::checkpoint::DType::F32,
        &meta,
    )
    .expect("write");
    let msg = load_err(&dir);
    assert!(
        msg.contains("unexpected tensor `model.extra.weight`"),
        "{msg}"
    );
}

#[test]
fn bad_training_values_exit_2_before_any_work() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let path = job(
        tmp.path(),
        &format!(
            "[job]\nname = \"t\"\nrun_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n\
             [training]\nglobal_batch = 6\nmicro_batch = 4\n",
            run.display(),
            model_dir("llama2").display(),
            fixtures().join("data/train_tokens.jsonl").display()
        ),
    );
    let out = launch(&["train", path.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("global_batch"), "{}", stderr(&out));
    assert!(!run.exists(), "nothing written for a bad config");
}

#[test]
fn export_refuses_to_replace_a_foreign_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("mine");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    std::fs::write(out_dir.join("notes.txt"), "keep me").expect("write");
    let src = model_dir("llama2");
    let out = launch_export(&src, "hf", &out_dir, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("notes.txt"), "{}", stderr(&out));
    assert!(
        out_dir.join("notes.txt").is_file(),
        "the user's file survives"
    );
    let out = launch_export(&src, "hf", &src, &[]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "exporting over the base model is refused"
    );
    assert!(src.join("model.safetensors").is_file());
}

#[test]
fn malformed_jsonl_names_the_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"input_ids\":[1,2,3]}\n\n{\"input_ids\":[1,2,\n{\"input_ids\":[4,5]}\n",
    )
    .expect("write");
    let path = eval_job(tmp.path(), &model_dir("llama2"), &data);
    let out = launch(&["eval", path.to_str().expect("utf8")]);
    // Bad input exits 2 (it exited 1 before input errors were told from failures).
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("eval.jsonl:3"), "{}", stderr(&out));
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,96000]}\n",
    )
    .expect("write");
    let path = eval_job(tmp.path(), &model_dir("llama2"), &data);
    let out = launch(&["eval", path.to_str().expect("utf8")]);
    // Bad input exits 2 (it exited 1 before input errors were told from failures).
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("96000"), "{}", stderr(&out));
}

/// A training job whose data or model is bad: `(job file, run dir)`, two workers.
fn train_job(dir: &Path, model: &Path, train: &Path) -> (PathBuf, PathBuf) {
    let run = dir.join("run");
    let path = job(
        dir,
        &format!(
            "[job]\nname = \"bad\"\nrun_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\n\
             train = \"{}\"\nmax_seq_len = 64\npacking = false\n[training]\nmax_steps = 3\n\
             global_batch = 4\n",
            run.display(),
            model.display(),
            train.display()
        ),
    );
    (path, run)
}

/// `launch train` with two workers: its output and how long it took.
fn train_2(path: &Path) -> (std::process::Output, std::time::Duration) {
    let started = std::time::Instant::now();
    let out = launch_cmd()
        .args([
            "train",
            path.to_str().expect("utf8"),
            "--nproc-per-node",
            "2",
        ])
        .output()
        .expect("launch runs");
    (out, started.elapsed())
}

/// `launch train` of `path` exits 2 within 5 s naming `names`, and starts nothing.
fn refused_before_any_worker(path: &Path, run: &Path, names: &str) {
    let (out, took) = train_2(path);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(names), "{}", stderr(&out));
    assert!(took.as_secs_f64() < 5.0, "{took:?}");
    assert!(!run.join("events.jsonl").exists(), "no worker started");
}

#[test]
fn launch_train_checks_the_data_before_any_worker_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("train.jsonl");
    let good = std::fs::read_to_string(fixtures().join("data/train_tokens.jsonl")).expect("data");
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(4, "{\"input_ids\": [1, 2,");
    std::fs::write(&data, lines.join("\n")).expect("write");
    let (path, run) = train_job(tmp.path(), &model_dir("llama2"), &data);
    refused_before_any_worker(&path, &run, "train.jsonl:5");
}

#[test]
fn launch_train_checks_the_model_files_before_any_worker_starts() {
    let (tmp, dir) = copy_model("llama2");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() - 100]).expect("truncate");
    let data = fixtures().join("data/train_tokens.jsonl");
    let (path, run) = train_job(tmp.path(), &dir, &data);
    let (out, took) = train_2(&path);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("model.safetensors"),
        "{}",
        stderr(&out)
    );
    assert!(took.as_secs_f64() < 5.0, "{took:?}");
    assert!(!run.join("events.jsonl").exists(), "no worker started");
}

/// Input only the workers find (a sample that supervises nothing, which the data's shape
/// alone does not show) ends the job at once with the worker's words (exit 2): no restart.
#[test]
fn a_worker_failing_on_its_input_ends_the_job_without_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("train.jsonl");
    let good = std::fs::read_to_string(fixtures().join("data/train_tokens.jsonl")).expect("data");
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(
        2,
        "{\"input_ids\": [5, 6, 7], \"labels\": [-100, -100, -100]}",
    );
    std::fs::write(&data, lines.join("\n")).expect("write");
    let (path, run) = train_job(tmp.path(), &model_dir("llama2"), &data);
    let (out, took) = train_2(&path);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("train.jsonl") && err.contains('3'), "{err}");
    assert!(!err.contains("node 0 should be excluded"), "{err}");
    assert!(took.as_secs_f64() < 30.0, "{took:?}");
    let events = records(&run);
    let count = |pick: fn(&Event) -> bool| events.iter().filter(|r| pick(&r.event)).count();
    assert_eq!(
        count(|e| matches!(e, Event::Restart { .. })),
        0,
        "{events:?}"
    );
    assert_eq!(
        count(|e| matches!(e, Event::Spawn { .. })),
        2,
        "one generation"
    );
    assert!(
        events.iter().any(|r| matches!(
            &r.event,
            Event::Decision {
                action: tidemill::launcher::events::Action::GiveUp,
                ..
            }
        )),
        "{events:?}"
    );
}
