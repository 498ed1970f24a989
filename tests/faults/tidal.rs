//! Tidal jobs end to end on loopback, with real short windows (seconds): a job that needs
//! several windows stops by itself in each and hands the GPUs back before `end − margin`,
//! resumes in the next (at another world size, too) and trains exactly what an
//! uninterrupted run trains; SIGTERM and `launch preempt` stop it within their grace,
//! checkpointing only when that fits. Each test prints its hand-back latencies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::jobs::*;
use crate::common::*;

const STEPS: u64 = 40;
/// Every rank sleeps this long after each step: the steps take about 15 ms here.
const PACE: &str = "*:0.1";

/// The job of `dir` (LoRA, `STEPS` steps, a checkpoint every 4, `checkpoint` more keys of
/// that section), with `tidal` (TOML keys) as its `[tidal]` section.
fn tidal_job(dir: &Path, checkpoint: &str, tidal: &str) -> PathBuf {
    let job = write_job(dir, true, STEPS);
    let mut body = std::fs::read_to_string(&job).expect("job");
    body.push_str(&format!("[checkpoint]\nevery = 4\n{checkpoint}\n"));
    body.push_str(&format!(
        "[tidal]\ntimezone = \"UTC\"\nhandback_margin_s = 0.5\nsafety_factor = 1.0\n{tidal}\n"
    ));
    std::fs::write(&job, body).expect("job");
    job
}

/// Rank 0's losses of the uninterrupted run on 2 ranks (computed once).
fn reference() -> &'static BTreeMap<u64, f64> {
    static REFERENCE: OnceLock<BTreeMap<u64, f64>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let job = write_job(tmp.path(), true, STEPS);
        train(&job, 1, 2, &["checkpoint.every=4"]);
        let losses = step_losses(&tmp.path().join("run"));
        assert_eq!(losses.len() as u64, STEPS);
        losses
    })
}

fn assert_losses(run: &Path, tolerance: f64, what: &str) {
    let got = step_losses(run);
    let want = reference();
    assert_eq!(got.len(), want.len(), "{what}: every step taken");
    for (step, w) in want {
        let g = got[step];
        assert!(
            rel_diff(g, *w) <= tolerance,
            "{what}: step {step} loss {g} vs uninterrupted {w}"
        );
    }
}

/// `HH:MM:SS` (UTC) of `secs` from now.
fn clock(secs: f64) -> String {
    utc_in(secs, "%H:%M:%S")
}

/// RFC 3339 (UTC) of `secs` from now.
fn rfc3339(secs: f64) -> String {
    utc_in(secs, "%Y-%m-%dT%H:%M:%SZ")
}

/// `launch train JOB --nproc-per-node N ARGS…` with the pace hook and `envs`.
fn tidal_cmd(job: &Path, nproc: usize, args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut c = launch_cmd();
    c.arg("train")
        .arg(job)
        .args(["--nproc-per-node", &nproc.to_string()])
        .args(args)
        .env("TIDEMILL_TEST_DELAY", PACE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

/// Run `c` to its end, at most 3 minutes (a test never waits for tomorrow's window).
fn run(mut c: Command) -> Output {
    let child = c.spawn().expect("launch runs");
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !watch.load(std::sync::atomic::Ordering::SeqCst) {
            if start.elapsed() > Duration::from_secs(180) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = child.wait_with_output().expect("launch ends");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    out
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn of<'a>(ev: &'a [Value], kind: &str) -> Vec<&'a Value> {
    ev.iter().filter(|e| e["event"] == kind).collect()
}

/// Every `gpus_released` came before its window's hand-back (`end − margin`); the
/// latencies from the window's deadline are printed.
fn assert_handed_back(ev: &[Value], what: &str) {
    let mut handback = None;
    for e in ev {
        match e["event"].as_str() {
            Some("window_open") => handback = e["handback"].as_f64(),
            Some("gpus_released") => {
                let (at, h) = (e["at"].as_f64().expect("at"), handback.expect("a window"));
                assert!(
                    at < h,
                    "{what}: released at {at}, after the hand-back {h}: {e}"
                );
                assert!(e["margin_s"].as_f64() > Some(0.0), "{e}");
                assert!(
                    e["checked"]
                        .as_str()
                        .is_some_and(|c| c.contains("groups gone")),
                    "{e}"
                );
                println!("{what}: GPUs released {:.2} s before the hand-back", h - at);
            }
            _ => {}
        }
    }
}

#[test]
fn a_job_needing_several_windows_hands_back_in_each_and_trains_what_an_uninterrupted_run_does() {
    let _one = crate::serial();
    reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Windows of 4 s, 2 s apart (the job needs three or four; more are given for a slow
    // machine).
    let windows: Vec<String> = (0..12)
        .map(|k| {
            let start = 2.0 + 6.0 * k as f64;
            format!("\"{}-{}\"", clock(start), clock(start + 4.0))
        })
        .collect();
    // The operator's hooks: each node's GPUs released, each window's workers about to start.
    let hooks = tmp.path().join("hooks.log");
    let job = tidal_job(
        tmp.path(),
        "",
        &format!(
            "windows = [{}]\non_release = \"echo released $TIDEMILL_NODE >> {h}\"\n\
             on_acquire = \"echo acquired $TIDEMILL_NODE >> {h}\"",
            windows.join(", "),
            h = hooks.display()
        ),
    );
    let out = run(tidal_cmd(&job, 2, &[], &[("TIDEMILL_TEST_DELAY", "*:0.2")]));
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let run_dir = tmp.path().join("run");
    let ev = run_events(&run_dir);
    let opens = of(&ev, "window_open").len();
    let closes = of(&ev, "window_close");
    assert!(opens >= 3, "{opens} windows: {}", stdout(&out));
    assert_eq!(closes.len(), opens);
    assert_eq!(of(&ev, "gpus_released").len(), opens);
    let (last, rest) = closes.split_last().expect("closes");
    assert_eq!(last["reason"], "finished", "{last}");
    for c in rest {
        assert_eq!(c["reason"], "deadline", "{c}");
        assert_eq!(
            c["lost_steps"], 0,
            "each window ends with a checkpoint: {c}"
        );
    }
    assert_eq!(of(&ev, "resumed").len(), opens - 1);
    let hooks = std::fs::read_to_string(&hooks).expect("the hooks ran");
    assert_eq!(hooks.matches("acquired 0").count(), opens, "{hooks}");
    assert_eq!(hooks.matches("released 0").count(), opens, "{hooks}");
    assert!(stdout(&out).contains("waiting for the next window"));
    assert_handed_back(&ev, "window end");
    assert_losses(&run_dir, 1e-5, "three windows");

    // The ledger adds up, window by window, and the picture is drawn.
    let status = launch(&[
        "status",
        run_dir.to_str().expect("utf8"),
        "--format",
        "json",
    ]);
    assert!(status.status.success(), "{}", stderr(&status));
    let l: Value = serde_json::from_str(stdout(&status).trim()).expect("json");
    let windows = l["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), opens);
    for w in windows {
        let part = |k: &str| w[k].as_f64().expect(k);
        let parts: f64 = [
            "startup_s",
            "useful_s",
            "checkpoint_s",
            "lost_s",
            "drain_s",
            "idle_s",
        ]
        .iter()
        .map(|k| {
            assert!(part(k) >= -1e-6, "{k} < 0: {w}");
            part(k)
        })
        .sum();
        let wall = part("end") - part("start");
        assert!(
            (parts - wall).abs() < 1.0,
            "parts {parts} vs wall {wall}: {w}"
        );
        assert!(part("useful_s") > 0.0, "{w}");
    }
    assert_eq!(l["finished"], true);
    assert_eq!(l["step"], STEPS);
    let svg = std::fs::read_to_string(run_dir.join("status.svg")).expect("status.svg");
    assert!(svg.contains("<svg") && svg.contains("loss"), "{svg:.200}");
    let text = launch(&["status", run_dir.to_str().expect("utf8")]);
    println!("{}", stdout(&text));
}

#[test]
fn a_second_window_at_half_the_world_re_plans_and_finishes_with_the_same_losses() {
    let _one = crate::serial();
    reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = tidal_job(tmp.path(), "", "");
    let auto = ["--set", "parallel.strategy=\"auto\""];
    let pace = [("TIDEMILL_TEST_DELAY", "*:0.25")];
    let window = |nproc: usize, secs: f64| {
        let until = rfc3339(secs);
        run(tidal_cmd(
            &job,
            nproc,
            &[&["--until", until.as_str()][..], &auto].concat(),
            &pace,
        ))
    };
    // Windows of 7 s: 40 steps of 0.25 s need three.
    let first = window(4, 7.0);
    assert_eq!(code(&first), Some(75), "{}", stderr(&first));
    let second = window(2, 7.0);
    assert_eq!(code(&second), Some(75), "{}", stderr(&second));
    let last = window(2, 60.0);
    assert_eq!(code(&last), Some(0), "{}", stderr(&last));
    let run_dir = tmp.path().join("run");
    let ev = run_events(&run_dir);
    let worlds: Vec<&Value> = of(&ev, "window_open").iter().map(|e| &e["world"]).collect();
    assert_eq!(worlds, [4, 2, 2], "one window at 4 ranks, then 2");
    assert_handed_back(&ev, "--until");
    assert_losses(&run_dir, 1e-4, "4 ranks, then 2");
}

/// Start a tidal job (`--until` a minute away) and wait until rank 0 took `steps` steps.
fn started(job: &Path, run_dir: &Path, steps: u64, envs: &[(&str, &str)]) -> std::process::Child {
    let mut c = tidal_cmd(job, 2, &["--until", &rfc3339(60.0)], envs);
    c.stdout(Stdio::null());
    let child = c.spawn().expect("launch starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = run_events(run_dir);
        if ev
            .iter()
            .any(|e| e["event"] == "step" && e["rank"] == 0 && e["step"].as_u64() >= Some(steps))
        {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "the job never got to step {steps}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawned(ev: &[Value]) -> Vec<u32> {
    of(ev, "spawn")
        .iter()
        .map(|e| e["pid"].as_u64().expect("pid") as u32)
        .collect()
}

/// The newest committed checkpoint's step.
fn committed(run_dir: &Path) -> Vec<u64> {
    of(&run_events(run_dir), "checkpoint")
        .iter()
        .map(|e| e["step"].as_u64().expect("step"))
        .collect()
}

#[test]
fn sigterm_with_a_grace_longer_than_a_checkpoint_saves_at_the_next_step_and_resumes_exactly() {
    let _one = crate::serial();
    reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = tidal_job(tmp.path(), "", "grace_s = 5");
    let run_dir = tmp.path().join("run");
    let child = started(&job, &run_dir, 6, &[]);
    let sent = Instant::now();
    signal(child.id(), "-TERM");
    let (status, err, _) = wait_exit(child, Duration::from_secs(30));
    let took = sent.elapsed().as_secs_f64();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(took < 5.0, "gone {took:.2} s after SIGTERM, grace 5 s");
    let ev = run_events(&run_dir);
    for pid in spawned(&ev) {
        assert!(!alive(pid), "worker {pid} outlived the grace");
    }
    let y = of(&ev, "yield");
    assert!(
        y.len() == 1 && y[0]["checkpointed"] == true && y[0]["lost_steps"] == 0,
        "{y:?}"
    );
    let close = of(&ev, "window_close");
    assert_eq!(close[0]["reason"], "preempted", "{close:?}");
    assert_eq!(close[0]["lost_steps"], 0, "{close:?}");
    println!("SIGTERM → exit 75 in {took:.2} s, no step lost");
    let step = y[0]["step"].as_u64().expect("step");
    assert_eq!(committed(&run_dir).last(), Some(&step));
    let again = run(tidal_cmd(&job, 2, &["--until", &rfc3339(60.0)], &[]));
    assert_eq!(code(&again), Some(0), "{}", stderr(&again));
    let resumed = of(&run_events(&run_dir), "resumed")[0]["step"].clone();
    assert_eq!(resumed, step);
    assert_losses(&run_dir, 1e-5, "SIGTERM with a long grace");
}

#[test]
fn sigterm_with_a_grace_shorter_than_a_checkpoint_kills_at_the_deadline_and_resumes_from_the_last()
{
    let _one = crate::serial();
    reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = tidal_job(tmp.path(), "async = false", "grace_s = 1");
    let run_dir = tmp.path().join("run");
    // Checkpoints take 2 s more than they would, longer than the grace; steps 1.5 s: the
    // signal comes mid-step and the next boundary after the grace.
    let slow = [
        ("TIDEMILL_TEST_SAVE_DELAY", "2"),
        ("TIDEMILL_TEST_DELAY", "*:1.5"),
    ];
    let child = started(&job, &run_dir, 5, &slow);
    let before = committed(&run_dir);
    let sent = Instant::now();
    signal(child.id(), "-TERM");
    let (status, err, _) = wait_exit(child, Duration::from_secs(30));
    let took = sent.elapsed().as_secs_f64();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(took < 1.5, "gone {took:.2} s after SIGTERM, grace 1 s");
    let ev = run_events(&run_dir);
    for pid in spawned(&ev) {
        assert!(!alive(pid), "worker {pid} outlived the grace");
    }
    // No checkpoint was started for the stop: the one before the signal is the newest.
    assert!(
        of(&ev, "yield").iter().all(|y| y["checkpointed"] == false),
        "{:?}",
        of(&ev, "yield")
    );
    let newest = committed(&run_dir).last().copied();
    assert_eq!(
        newest,
        before.last().copied(),
        "no checkpoint after the signal"
    );
    assert_eq!(newest, Some(4));
    let close = of(&ev, "window_close");
    assert_eq!(close[0]["reason"], "preempted", "{close:?}");
    assert!(close[0]["lost_steps"].as_u64() >= Some(1), "{close:?}");
    println!(
        "SIGTERM, grace 1 s < a checkpoint: exit 75 in {took:.2} s, {} steps lost",
        close[0]["lost_steps"]
    );
    let again = run(tidal_cmd(&job, 2, &["--until", &rfc3339(60.0)], &[]));
    assert_eq!(code(&again), Some(0), "{}", stderr(&again));
    let resumed = of(&run_events(&run_dir), "resumed")[0]["step"].as_u64();
    assert_eq!(
        resumed, newest,
        "resumed from the last committed checkpoint"
    );
    assert_losses(&run_dir, 1e-5, "SIGTERM with a short grace");
}

#[test]
fn a_save_slower_than_the_time_left_is_not_started_and_the_previous_one_is_used() {
    let _one = crate::serial();
    reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = tidal_job(tmp.path(), "async = false", "grace_s = 30");
    let run_dir = tmp.path().join("run");
    let slow = [("TIDEMILL_TEST_SAVE_DELAY", "3")];
    // Steps 4's and 8's checkpoints were measured (3 s and more); then a preemption leaves
    // 1.5 s.
    let child = started(&job, &run_dir, 10, &slow);
    let before = committed(&run_dir);
    let sent = Instant::now();
    let p = launch(&["preempt", run_dir.to_str().expect("utf8"), "--grace", "1.5"]);
    assert!(p.status.success(), "{}", stderr(&p));
    let (status, err, _) = wait_exit(child, Duration::from_secs(30));
    let took = sent.elapsed().as_secs_f64();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(
        took < 1.6,
        "gone {took:.2} s after launch preempt, grace 1.5 s"
    );
    let ev = run_events(&run_dir);
    let y = of(&ev, "yield");
    assert!(y.len() == 1 && y[0]["checkpointed"] == false, "{y:?}");
    assert!(y[0]["lost_steps"].as_u64() >= Some(1), "{y:?}");
    let newest = committed(&run_dir).last().copied();
    assert_eq!(newest, before.last().copied());
    assert_eq!(newest, Some(8));
    assert_handed_back(&ev, "launch preempt");
    println!(
        "launch preempt --grace 1.5 with 3 s saves: exit 75 in {took:.2} s, {} steps lost",
        y[0]["lost_steps"]
    );
    let again = run(tidal_cmd(&job, 2, &["--until", &rfc3339(60.0)], &[]));
    assert_eq!(code(&again), Some(0), "{}", stderr(&again));
    assert_eq!(
        of(&run_events(&run_dir), "resumed")[0]["step"].as_u64(),
        newest
    );
    assert_losses(&run_dir, 1e-5, "a save slower than the time left");
}

#[test]
fn a_rehearsal_plays_a_night_in_seconds_and_says_where_it_ends_and_whether_the_margin_holds() {
    let _one = crate::serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    // A night of 8.5 h at 5100×: 6 s.
    let job = tidal_job(tmp.path(), "", "windows = [\"22:00-06:30\"]");
    let sets = [
        "--set",
        "tidal.timezone=\"Asia/Shanghai\"",
        "--set",
        "tidal.handback_margin_s=3000",
    ];
    let out = run(tidal_cmd(
        &job,
        2,
        &[&["--rehearse", "5100"][..], &sets].concat(),
        &[],
    ));
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    println!("{said}");
    assert!(
        said.contains("06:30:00 CST") && said.contains("at 5100×"),
        "{said}"
    );
    assert!(said.contains("the night stopped after step"), "{said}");
    assert!(said.contains("the margin holds"), "{said}");
    assert!(
        said.contains("a real night at these rates takes about"),
        "{said}"
    );
    // It ran in a directory of its own; the job's own run is untouched.
    assert!(!tmp.path().join("run").exists());
    let ev = run_events(&tmp.path().join("run-rehearsal"));
    assert_handed_back(&ev, "rehearsal");
    let close = of(&ev, "window_close");
    assert_eq!(close.len(), 1);
    assert_eq!(close[0]["reason"], "deadline", "{close:?}");
}

#[test]
fn two_nodes_whose_release_hook_outlasts_the_heartbeat_timeout_both_yield_75() {
    let _one = crate::serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let hooks = tmp.path().join("hooks.log");
    // The hook takes 5 s; a node is lost after 3 s without a heartbeat.
    let job = tidal_job(
        tmp.path(),
        "",
        &format!(
            "on_release = \"sleep 5; echo released $TIDEMILL_NODE >> {}\"",
            hooks.display()
        ),
    );
    let rdzv = format!("127.0.0.1:{}", free_port());
    let until = rfc3339(6.0);
    let agents: Vec<std::process::Child> = (0..2)
        .map(|node| {
            let mut c = agent_cmd(&job, 2, 1, node, &rdzv, &[]);
            c.args(["--until", &until]).env("TIDEMILL_TEST_DELAY", PACE);
            c.spawn().expect("launch starts")
        })
        .collect();
    for (node, agent) in agents.into_iter().enumerate() {
        let (status, err, _) = wait_exit(agent, Duration::from_secs(60));
        assert_eq!(status.code(), Some(75), "node {node}: {err}");
    }
    let said = std::fs::read_to_string(&hooks).expect("hooks ran");
    assert!(
        said.contains("released 0") && said.contains("released 1"),
        "{said}"
    );
    let ev = run_events(&tmp.path().join("run"));
    assert_eq!(
        of(&ev, "gpus_released").len(),
        2,
        "both nodes' reports arrived"
    );
    assert!(of(&ev, "fault").is_empty(), "{:?}", of(&ev, "fault"));
}
