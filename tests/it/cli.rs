//! `launch train|eval|export` end to end: the run directory, the event log, the exported
//! adapter/model and the eval JSON line.

use std::path::Path;

use crate::common::*;
use serde_json::Value;

fn events(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("events.jsonl"))
        .expect("events.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("event is JSON"))
        .collect()
}

fn last_json(out: &std::process::Output) -> Value {
    let text = stdout(out);
    let last = text.lines().last().expect("some stdout");
    serde_json::from_str(last).expect("last line is JSON")
}

fn write_job(dir: &Path, lora: bool) -> std::path::PathBuf {
    let data = fixtures().join("data");
    let mut body = format!(
        "[job]\nname = \"t\"\nrun_dir = \"{run}\"\n[model]\npath = \"{model}\"\n[data]\ntrain = \"{train}\"\neval = \"{eval}\"\nmax_seq_len = 64\n\
         [training]\nmax_steps = 4\nglobal_batch = 4\nmicro_batch = 2\nlr = 1e-2\nseed = 1\n",
        run = dir.join("run").display(),
        model = model_dir("llama2").display(),
        train = data.join("train_tokens.jsonl").display(),
        eval = data.join("eval_tokens.jsonl").display(),
    );
    if lora {
        body.push_str("[lora]\nr = 4\nalpha = 8\ntargets = [\"q_proj\", \"v_proj\", \"gate_proj\"]\n[export]\nmerged = true\n");
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, body).expect("job");
    path
}

#[test]
fn lora_train_eval_export() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), true);
    let job = job.to_str().expect("utf8");
    let out = launch(&["train", job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = tmp.path().join("run");
    assert!(run.join("config.toml").is_file());
    let ev = events(&run);
    let kinds: Vec<&str> = ev.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"start"));
    assert_eq!(kinds.last(), Some(&"done"));
    assert_eq!(kinds.iter().filter(|k| **k == "step").count(), 4);
    let step = ev
        .iter()
        .find(|e| e["event"] == "step")
        .expect("a step event");
    for key in ["step", "loss", "lr", "tokens_per_s", "time"] {
        assert!(step.get(key).is_some(), "step event lacks {key}: {step}");
    }
    let trained_eval = ev
        .iter()
        .rev()
        .find(|e| e["event"] == "eval")
        .expect("eval event")["loss"]
        .as_f64()
        .expect("loss");

    // The adapter evaluates to the loss the run reported; the base model does not.
    let adapter = run.join("export/adapter");
    assert!(
        adapter.join("adapter_config.json").is_file()
            && adapter.join("adapter_model.safetensors").is_file()
    );
    let out = launch(&["eval", job, "--adapter", adapter.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = last_json(&out);
    assert_eq!(report["samples"], 6);
    assert_eq!(report["tokens"], 84);
    let adapted = report["loss"].as_f64().expect("loss");
    assert!(
        rel_diff(adapted, trained_eval) < 1e-5,
        "{adapted} vs {trained_eval}"
    );
    let base = last_json(&launch(&["eval", job]))["loss"]
        .as_f64()
        .expect("loss");
    let golden = golden()["llama2"]["loss"].as_f64().expect("golden");
    assert!(rel_diff(base, golden) < 1e-4);
    assert!(
        rel_diff(adapted, base) > 1e-3,
        "training changed nothing: {adapted} vs {base}"
    );

    // Merged export (written by train, and again by `launch export`) evaluates the same.
    let merged = tmp.path().join("merged");
    let out = launch_export(&run, "hf", &merged, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for dir in [merged.clone(), run.join("export/model")] {
        let set = format!("model.path=\"{}\"", dir.display());
        let loss = last_json(&launch(&["eval", job, "--set", &set]))["loss"]
            .as_f64()
            .expect("loss");
        assert!(
            rel_diff(loss, adapted) < 1e-5,
            "{}: merged {loss} vs adapter {adapted}",
            dir.display()
        );
    }
    // Continue training from the exported adapter.
    let init = format!("lora.init_adapter=\"{}\"", adapter.display());
    let run2 = format!("job.run_dir=\"{}\"", tmp.path().join("run2").display());
    let out = launch(&[
        "train",
        job,
        "--set",
        &init,
        "--set",
        &run2,
        "--set",
        "training.max_steps=2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first_loss = |run: &Path| {
        let ev = events(run);
        ev.iter().find(|e| e["event"] == "step").expect("a step")["loss"]
            .as_f64()
            .expect("loss")
    };
    // Same seed, same first batch: the trained adapter starts lower than fresh adapters did.
    let (fresh, resumed) = (first_loss(&run), first_loss(&tmp.path().join("run2")));
    assert!(resumed < fresh - 1e-3, "resumed {resumed} vs fresh {fresh}");

    let peft = tmp.path().join("peft");
    let out = launch_export(&run, "peft", &peft, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(peft.join("adapter_model.safetensors").is_file());
}

#[test]
fn full_sft_train_and_export() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), false);
    let job = job.to_str().expect("utf8");
    let out = launch(&["train", job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = tmp.path().join("run");
    let model = run.join("export/model");
    assert!(model.join("config.json").is_file() && model.join("model.safetensors").is_file());
    let ev = events(&run);
    let trained = ev
        .iter()
        .rev()
        .find(|e| e["event"] == "eval")
        .expect("eval")["loss"]
        .as_f64()
        .expect("loss");
    let set = format!("model.path=\"{}\"", model.display());
    let loss = last_json(&launch(&["eval", job, "--set", &set]))["loss"]
        .as_f64()
        .expect("loss");
    assert!(rel_diff(loss, trained) < 1e-5, "{loss} vs {trained}");
    let out = launch_export(&run, "peft", std::path::Path::new("/tmp/never"), &[]);
    assert_eq!(out.status.code(), Some(2));

    // A bf16 export says so in config.json and still evaluates close to the f32 model.
    let bf16 = tmp.path().join("bf16");
    let out = launch_export(&run, "hf", &bf16, &["--dtype", "bf16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["torch_dtype"], "bfloat16");
    let set = format!("model.path=\"{}\"", bf16.display());
    let loss = last_json(&launch(&["eval", job, "--set", &set]))["loss"]
        .as_f64()
        .expect("loss");
    assert!(
        rel_diff(loss, trained) < 1e-2 && loss != trained,
        "bf16 {loss} vs f32 {trained}"
    );
}

#[test]
fn quickstart_chat_data_with_tokenizer_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("configs/quickstart.toml");
    let run = format!("job.run_dir=\"{}\"", tmp.path().join("run").display());
    let model = format!(
        "model.path=\"{}\"",
        root.join("assets/quickstart/model").display()
    );
    let train = format!(
        "data.train=\"{}\"",
        root.join("assets/quickstart/data/train.jsonl").display()
    );
    let eval = format!(
        "data.eval=\"{}\"",
        root.join("assets/quickstart/data/eval.jsonl").display()
    );
    let out = launch(&[
        "train",
        config.to_str().expect("utf8"),
        "--set",
        &run,
        "--set",
        &model,
        "--set",
        &train,
        "--set",
        &eval,
        "--set",
        "training.max_steps=2",
        "--set",
        "training.eval_every=0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ev = events(&tmp.path().join("run"));
    let audit = ev
        .iter()
        .find(|e| e["event"] == "audit" && e["split"] == "train")
        .expect("train audit");
    assert_eq!(audit["audit"]["samples"], 400, "{audit}");
    assert!(stdout(&out).contains("400 samples"), "the audit is printed");
    assert!(tmp
        .path()
        .join("run/export/adapter/adapter_model.safetensors")
        .is_file());
}

/// `launch probe` in a build without the GPU path says so (exit 2, as an input error).
#[cfg(not(feature = "cuda"))]
#[test]
fn probe_without_cuda_names_the_feature() {
    let out = launch(&["probe"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(last_json(&out)["cuda"], false);
    assert!(stderr(&out).contains("--features cuda"), "{}", stderr(&out));
}
