//! Sharded checkpoints end to end: a run killed with SIGKILL after a checkpoint resumes
//! and continues bit for bit as an uninterrupted one; a checkpoint saved at tp2×pp2
//! resumes at dp4, tp4 and one process within 1e-5; a crash at any point of a save, and
//! each kind of damage to the newest checkpoint, leave the previous one in use.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;
use tidemill::checkpoint;

fn write_job(dir: &Path, max_steps: u64) -> PathBuf {
    write_job_for(dir, max_steps, &model_dir("llama-deep"))
}

fn write_job_for(dir: &Path, max_steps: u64, model: &Path) -> PathBuf {
    let data = fixtures().join("data");
    let body = format!(
        "[job]\nname = \"ckpt\"\nrun_dir = \"{run}\"\n[model]\npath = \"{model}\"\n[data]\n\
         train = \"{train}\"\nmax_seq_len = 64\npacking = false\n[training]\nmax_steps = {max_steps}\n\
         global_batch = 12\nmicro_batch = 1\nlr = 1e-2\nseed = 3\nwarmup_steps = 2\n\
         max_grad_norm = 0.8\n[checkpoint]\nevery = 2\nkeep_last = 3\n",
        run = dir.join("run").display(),
        model = model.display(),
        train = data.join("train_tokens.jsonl").display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, body).expect("job");
    path
}

fn run(job: &Path, args: &[&str]) -> std::process::Output {
    let mut c = launch_cmd();
    c.arg("train").arg(job).args(args);
    let out = c.output().expect("launch runs");
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    out
}

/// Rank 0's loss at each step, the last run's value where a step ran twice.
fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for e in run_events(run_dir) {
        if e["event"] == "step" && e["rank"].as_u64().unwrap_or(0) == 0 {
            by_step.insert(
                e["step"].as_u64().expect("step"),
                e["loss"].as_f64().expect("loss"),
            );
        }
    }
    by_step.into_iter().collect()
}

fn events_named(run_dir: &Path, name: &str) -> Vec<Value> {
    run_events(run_dir)
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let steps = 60;
    let job = write_job(tmp.path(), steps);
    let run_dir = tmp.path().join("run");
    run(&job, &["--set", "checkpoint.resume=false"]);
    let reference = losses(&run_dir);
    assert_eq!(reference.len(), steps as usize);
    std::fs::remove_dir_all(&run_dir).expect("clean");

    // Kill the launcher and its workers (one process group) once step 4 is committed.
    let mut c = launch_cmd();
    c.arg("train")
        .arg(&job)
        .args(["--nproc-per-node", "2", "--set", "parallel.pp=2"]);
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed_at = loop {
        let committed = events_named(&run_dir, "checkpoint")
            .iter()
            .filter_map(|e| e["step"].as_u64())
            .max();
        if let Some(step) = committed.filter(|&s| s >= 4) {
            let pid = child.id() as i32;
            std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status()
                .expect("kill");
            break step;
        }
        assert!(Instant::now() < deadline, "no checkpoint at step 4");
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = child.wait();
    let before = losses(&run_dir).len() as u64;
    assert!(
        before < steps,
        "killed before the end ({before} steps done)"
    );
    run(&job, &["--nproc-per-node", "2", "--set", "parallel.pp=2"]);
    let resumed = events_named(&run_dir, "resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    let from = resumed[0]["step"].as_u64().expect("step");
    assert!(
        from >= killed_at,
        "resumed from {from}, killed after {killed_at}"
    );
    // pp2 against pp2 (same layout): the same bits.
    let same = tempfile::tempdir().expect("tempdir");
    let job2 = write_job(same.path(), steps);
    run(
        &job2,
        &[
            "--nproc-per-node",
            "2",
            "--set",
            "parallel.pp=2",
            "--set",
            "checkpoint.resume=false",
        ],
    );
    let uninterrupted = losses(&same.path().join("run"));
    // Steps the killed run took after its last relayed report are in the checkpoint but not
    // in the log (the launcher died before it heard of them): a gap of at most those steps.
    let logged = losses(&run_dir);
    let expected: Vec<(u64, f64)> = uninterrupted
        .iter()
        .copied()
        .filter(|(step, _)| *step <= before || *step > from)
        .collect();
    assert_eq!(
        logged, expected,
        "resumed from step {from}, {before} logged before"
    );
    // …and within f32 rounding of one process.
    for ((_, a), (_, b)) in uninterrupted.iter().zip(&reference) {
        assert!(rel_diff(*a, *b) < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn a_checkpoint_saved_at_tp2_pp2_resumes_at_other_layouts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), 8);
    let run_dir = tmp.path().join("run");
    let sets = |s: &[&'static str]| s.to_vec();
    run(&job, &["--set", "checkpoint.resume=false"]);
    let reference = losses(&run_dir);
    let saved = tmp.path().join("saved");
    std::fs::remove_dir_all(&run_dir).expect("clean");
    run(
        &job,
        &[
            "--nproc-per-node",
            "4",
            "--set",
            "parallel.tp=2",
            "--set",
            "parallel.pp=2",
        ],
    );
    std::fs::rename(&run_dir, &saved).expect("keep");
    converted_models_match_training(tmp.path(), &saved, &reference);
    for target in [
        sets(&["--nproc-per-node", "4"]),
        sets(&["--nproc-per-node", "4", "--set", "parallel.tp=4"]),
        sets(&["--nproc-per-node", "1"]),
        sets(&[
            "--nproc-per-node",
            "2",
            "--set",
            "parallel.ep=1",
            "--set",
            "parallel.pp=2",
            "--set",
            "parallel.schedule=interleaved",
        ]),
    ] {
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(run_dir.join("checkpoints")).expect("dir");
        let from = saved.join("checkpoints/step-00000004");
        copy_dir(&from, &run_dir.join("checkpoints/step-00000004"));
        run(&job, &target);
        let resumed = events_named(&run_dir, "resumed");
        assert_eq!(resumed[0]["step"], 4, "{target:?}");
        let got = losses(&run_dir);
        assert_eq!(got.len(), 4, "{target:?}: steps 5..8");
        for (step, loss) in got {
            let want = reference[step as usize - 1].1;
            assert!(
                rel_diff(loss, want) < 1e-5,
                "{target:?} step {step}: {loss} vs {want}"
            );
        }
    }
}

/// `launch convert` lays a model out as training at tp2 × pp2 saved it (same files, same
/// boxes); training from the converted directory gives the losses of training from HF;
/// the run's last checkpoint converted to HF holds the weights the run exported.
fn converted_models_match_training(tmp: &Path, saved: &Path, reference: &[(u64, f64)]) {
    let converted = tmp.join("converted");
    let hf = format!("hf:{}", model_dir("llama-deep").display());
    convert(&hf, &converted, &["--tp", "2", "--pp", "2"]);
    let ours = manifest(&converted);
    let trained = manifest(&saved.join("checkpoints/step-00000004"));
    let mut compared = 0;
    for (name, t) in ours["tensors"].as_object().expect("tensors") {
        assert_eq!(t["pieces"], trained["tensors"][name]["pieces"], "{name}");
        compared += 1;
    }
    assert_eq!(compared, 57 - 1, "every tensor but the tied head");

    let job = write_job_for(tmp, 8, &converted);
    let run_dir = tmp.join("run");
    run(&job, &["--set", "checkpoint.resume=false"]);
    assert_eq!(
        losses(&run_dir),
        reference,
        "trained from the converted model"
    );
    std::fs::remove_dir_all(&run_dir).expect("clean");

    let back = tmp.join("back");
    let last = format!(
        "sharded:{}",
        saved.join("checkpoints/step-00000008").display()
    );
    let out = launch(&[
        "convert",
        "--from",
        &last,
        "--to",
        &format!("hf:{}", back.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exported = checkpoint::load_hf_weights(&saved.join("export/model")).expect("export");
    let ours = checkpoint::load_hf_weights(&back).expect("converted");
    assert_eq!(ours.tensors, exported.tensors);
    assert!(back.join("config.json").is_file());
}

fn manifest(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest JSON")
}

fn convert(from: &str, to: &Path, args: &[&str]) {
    let to = format!("sharded:{}", to.display());
    let mut all = vec!["convert", "--from", from, "--to", &to];
    all.extend_from_slice(args);
    let out = launch(&all);
    assert!(out.status.success(), "{all:?}: {}", stderr(&out));
}

#[test]
fn a_mixtral_checkpoint_saved_at_ep2_resumes_at_ep1() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job_for(tmp.path(), 8, &model_dir("mixtral"));
    let run_dir = tmp.path().join("run");
    run(&job, &["--set", "checkpoint.resume=false"]);
    let reference = losses(&run_dir);
    std::fs::remove_dir_all(&run_dir).expect("clean");
    run(&job, &["--nproc-per-node", "2", "--set", "parallel.ep=2"]);
    let saved = manifest(&run_dir.join("checkpoints/step-00000004"));
    let expert = &saved["tensors"]["model.layers.1.block_sparse_moe.experts.3.w2.weight"];
    assert_eq!(expert["pieces"][0]["file"], "rank-00001.safetensors");
    let ep2 = losses(&run_dir);
    for ((_, a), (_, b)) in ep2.iter().zip(&reference) {
        assert!(rel_diff(*a, *b) < 1e-5, "ep2 {a} vs one process {b}");
    }
    let keep = tmp.path().join("step-4");
    std::fs::rename(run_dir.join("checkpoints/step-00000004"), &keep).expect("keep");
    std::fs::remove_dir_all(&run_dir).expect("clean");
    copy_dir(&keep, &run_dir.join("checkpoints/step-00000004"));
    run(&job, &[]);
    let resumed = events_named(&run_dir, "resumed");
    assert_eq!(resumed[0]["step"], 4);
    let got = losses(&run_dir);
    assert_eq!(got.len(), 4, "steps 5..8");
    for (step, loss) in got {
        let want = reference[step as usize - 1].1;
        assert!(rel_diff(loss, want) < 1e-5, "step {step}: {loss} vs {want}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("read") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn a_crash_at_any_point_of_a_save_leaves_the_previous_checkpoint_in_use() {
    for point in [
        "before_shards",
        "between_shards",
        "before_manifest",
        "before_rename",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let job = write_job(tmp.path(), 4);
        let run_dir = tmp.path().join("run");
        // A clean save at step 2, then a crash while saving step 4.
        run(&job, &["--set", "training.max_steps=2"]);
        let mut c = launch_cmd();
        c.arg("train").arg(&job).env("TIDEMILL_CRASH_AT", point);
        let out = c.output().expect("launch runs");
        assert!(!out.status.success(), "{point}: the crash happened");
        run(&job, &[]);
        let resumed = events_named(&run_dir, "resumed");
        let last = resumed.last().expect("resumed");
        assert_eq!(last["step"], 2, "{point}: {resumed:?}");
        assert!(run_dir
            .join("checkpoints/step-00000004/manifest.json")
            .exists());
    }
}

#[test]
fn a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 4] = [
        ("missing shard", |d| {
            std::fs::remove_file(d.join("rank-00000.safetensors")).expect("rm")
        }),
        ("checksum", |d| {
            let p = d.join("rank-00000.safetensors");
            let mut b = std::fs::read(&p).expect("read");
            let n = b.len() - 1;
            b[n] ^= 1;
            std::fs::write(&p, b).expect("write");
        }),
        ("truncated", |d| {
            let p = d.join("rank-00000.safetensors");
            let b = std::fs::read(&p).expect("read");
            std::fs::write(&p, &b[..b.len() / 2]).expect("write");
        }),
        ("no manifest", |d| {
            std::fs::remove_file(d.join("manifest.json")).expect("rm")
        }),
    ];
    for (what, damage) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let job = write_job(tmp.path(), 4);
        let run_dir = tmp.path().join("run");
        run(&job, &[]);
        damage(&run_dir.join("checkpoints/step-00000004"));
        run(&job, &["--set", "training.max_steps=6"]);
        let skipped = events_named(&run_dir, "checkpoint_skipped");
        assert_eq!(skipped.len(), 1, "{what}: {skipped:?}");
        assert!(
            skipped[0]["file"]
                .as_str()
                .unwrap_or("")
                .contains("step-00000004"),
            "{what}"
        );
        assert_eq!(events_named(&run_dir, "resumed")[0]["step"], 2, "{what}");
    }
}

/// bf16 mixed precision with LoRA and activation recomputation: resumed from its step-4
/// checkpoint a run gives the uninterrupted losses (one process: exactly; tp2: within bf16
/// rounding), its step events carry the peak memory, and its merged export is the base as
/// loaded (f32) plus the trained adapters, not the bf16-rounded base it trained against.
#[test]
fn a_bf16_lora_run_with_recompute_resumes_and_exports_the_f32_base() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fixtures().join("data");
    let run_dir = tmp.path().join("run");
    let job = tmp.path().join("job.toml");
    let body = format!(
        "[job]\nname = \"bf16\"\nrun_dir = \"{run}\"\n[model]\npath = \"{model}\"\ndtype = \"bf16\"\n\
         [data]\ntrain = \"{train}\"\neval = \"{eval}\"\nmax_seq_len = 64\npacking = false\n\
         [training]\nmax_steps = 6\nglobal_batch = 4\nmicro_batch = 2\nlr = 1e-2\nseed = 3\n\
         recompute = true\n[lora]\nr = 4\nalpha = 8\n\
         targets = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n\
         [export]\nmerged = true\n[checkpoint]\nevery = 2\nkeep_last = 3\n",
        run = run_dir.display(),
        model = model_dir("llama2").display(),
        train = data.join("train_tokens.jsonl").display(),
        eval = data.join("eval_tokens.jsonl").display(),
    );
    std::fs::write(&job, body).expect("job");
    run(&job, &["--set", "checkpoint.resume=false"]);
    let reference = losses(&run_dir);
    assert_eq!(reference.len(), 6);
    for step in events_named(&run_dir, "step") {
        let peak = step["peak_mem_bytes"].as_u64().unwrap_or(0);
        assert!(peak > 1 << 20, "no peak memory in {step}");
    }
    let saved = tmp.path().join("saved");
    std::fs::rename(&run_dir, &saved).expect("keep");
    for (target, tolerance) in [
        (vec![], 1e-6),
        (
            vec!["--nproc-per-node", "2", "--set", "parallel.tp=2"],
            1e-2,
        ),
    ] {
        let _ = std::fs::remove_dir_all(&run_dir);
        let step4 = "checkpoints/step-00000004";
        std::fs::create_dir_all(run_dir.join("checkpoints")).expect("dir");
        copy_dir(&saved.join(step4), &run_dir.join(step4));
        run(&job, &target);
        assert_eq!(events_named(&run_dir, "resumed")[0]["step"], 4);
        let got = losses(&run_dir);
        assert_eq!(got.len(), 2, "{target:?}: steps 5 and 6");
        for (step, loss) in got {
            let want = reference[step as usize - 1].1;
            assert!(
                rel_diff(loss, want) < tolerance,
                "{target:?} step {step}: {loss} vs {want}"
            );
        }
    }
    // The adapter on the f32 base and the merged model evaluate the same (both in f32).
    let job = job.to_str().expect("utf8");
    let eval = |args: &[&str]| {
        let out = launch(&[&["eval", job, "--set", "model.dtype=\"f32\""], args].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let last: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("json");
        last["loss"].as_f64().expect("loss")
    };
    let adapter = saved.join("export/adapter");
    let adapted = eval(&["--adapter", adapter.to_str().expect("utf8")]);
    let merged = format!("model.path=\"{}\"", saved.join("export/model").display());
    let merged = eval(&["--set", &merged]);
    assert!(
        rel_diff(merged, adapted) < 1e-5,
        "merged {merged} vs adapter on the f32 base {adapted}"
    );
}
