//! Multi-process jobs on loopback: `launch train` with several workers and several agents
//! gives the losses of one process; `launch run` runs a user's binary per rank; a killed
//! or stopped worker stops the whole job with an error naming it and leaves no process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::jobs::*;
use crate::common::*;

/// Elements of optimizer state `rank` held after its first step in the last run of `job`.
fn optimizer_state(job: &Path, rank: u64) -> u64 {
    let run = job.parent().expect("dir").join("run");
    run_events(&run)
        .iter()
        .find(|e| e["event"] == "step" && e["rank"] == rank && e["step"] == 1)
        .and_then(|e| e["optimizer_state_elems"].as_u64())
        .expect("a step event with optimizer_state_elems")
}

#[test]
fn data_parallel_gives_the_losses_of_one_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for lora in [true, false] {
        let job = write_job(tmp.path(), lora, 10);
        let mode = if lora { "lora" } else { "full" };
        let one = train(&job, 1, 1, &[]);
        // 10 steps, then the evals (every rank evaluates a share) after steps 5 and 10.
        assert_eq!(one.len(), 12);
        assert!(one[9] < one[0], "{mode}: training lowers the loss: {one:?}");
        assert!(
            one[10] > 0.0 && one[11] > 0.0,
            "{mode}: eval losses {one:?}"
        );
        assert_same(&one, &train(&job, 1, 2, &[]), &format!("{mode} dp2"));
        assert_same(
            &one,
            &train(&job, 1, 4, &[]),
            &format!("{mode} dp4, one agent"),
        );
        assert_same(
            &one,
            &train(&job, 2, 2, &[]),
            &format!("{mode} dp4, two agents"),
        );
        // Without ZeRO-1 every rank holds AdamW state for the whole trainable model.
        let full_state = optimizer_state(&job, 0);
        assert_same(
            &one,
            &train(&job, 1, 2, &["parallel.zero1=true"]),
            &format!("{mode} dp2 ZeRO-1"),
        );
        // With it each rank holds its share only, and the shares add up.
        let shares = [optimizer_state(&job, 0), optimizer_state(&job, 1)];
        assert_eq!(
            shares[0] + shares[1],
            full_state,
            "{mode}: ZeRO-1 shares {shares:?} of {full_state}"
        );
        assert!(
            shares.iter().all(|&s| s > 0 && s * 4 <= full_state * 3),
            "{mode}: unbalanced ZeRO-1 shares {shares:?} of {full_state}"
        );
    }
}

/// The data plane as a user checks it: `launch comm-check` on each rank of `launch run`
/// (TCP here; NCCL on a GPU host with `--device cuda`, see tools/bench/nccl_check.sh).
#[test]
fn comm_check_passes_on_every_rank_of_launch_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let exe = env!("CARGO_BIN_EXE_launch");
    let out = launch(&[
        "run",
        "--nproc-per-node",
        "3",
        "--run-dir",
        run.to_str().expect("utf8"),
        "--",
        exe,
        "comm-check",
        "--bench-mb",
        "1",
        "--repeats",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut ranks: Vec<u64> = lines.iter().filter_map(|l| l["rank"].as_u64()).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2], "{lines:?}");
    for l in &lines {
        assert_eq!(l["world"], 3, "{l}");
        assert_eq!(l["contract"]["cases"], 37, "{l}");
        assert_eq!(l["data_plane"], "tcp", "{l}");
    }
}

#[test]
fn launch_run_starts_a_user_binary_per_rank() {
    let exe = example("dp_custom");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("assets/quickstart/model");
    let data = root.join("assets/quickstart/data/train.jsonl");
    let args = [
        model.to_str().expect("utf8"),
        data.to_str().expect("utf8"),
        "3",
    ];
    let step_lines = |out: &std::process::Output| -> Vec<f64> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.strip_prefix("step ")?
                    .split(" loss ")
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .collect()
    };
    // Alone (no launcher: a world of one) ...
    let solo = Command::new(&exe)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("example runs");
    assert!(
        solo.status.success(),
        "{}",
        String::from_utf8_lossy(&solo.stderr)
    );
    // ... and as two ranks through `launch run`.
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let out = launch_cmd()
        .args([
            "run",
            "--nproc-per-node",
            "2",
            "--run-dir",
            run.to_str().expect("utf8"),
            "--",
        ])
        .arg(&exe)
        .args(args)
        .output()
        .expect("launch run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (one, two) = (step_lines(&solo), step_lines(&out));
    assert_eq!(one.len(), 3, "{}", String::from_utf8_lossy(&solo.stdout));
    assert_same(&one, &two, "dp_custom under launch run");
    let ev = run_events(&run);
    for rank in [0u64, 1] {
        assert!(
            ev.iter()
                .any(|e| e["event"] == "spawn" && e["rank"] == rank),
            "spawn of rank {rank}"
        );
        assert!(
            ev.iter().any(|e| e["event"] == "step" && e["rank"] == rank),
            "steps of rank {rank}"
        );
    }
    // The program's own event, one per rank, logged as a user event with its fields.
    let finished: Vec<Record> = records(&run)
        .into_iter()
        .filter(|r| {
            matches!(&r.event, Event::User { name, fields }
                if name == "finished" && fields["steps"] == 3)
        })
        .collect();
    assert_eq!(finished.len(), 2, "{finished:?}");
}

/// Start a long job with two workers; return it with the pids of its workers once both
/// have taken a step.
// The child is handed to the caller, which waits for it (clippy cannot see that).
#[allow(clippy::zombie_processes)]
fn start_long_job(dir: &Path, sets: &[&str]) -> (Child, Vec<u32>, PathBuf) {
    let job = write_job(dir, true, 1_000_000);
    let run = dir.join("run");
    let mut c = launch_cmd();
    c.arg("train").arg(&job).args(["--nproc-per-node", "2"]);
    for s in sets {
        c.args(["--set", s]);
    }
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ev = run_events(&run);
        let stepped = |r: u64| {
            ev.iter()
                .any(|e| e["event"] == "step" && e["rank"] == r && e["step"].as_u64() >= Some(2))
        };
        if stepped(0) && stepped(1) {
            let mut pids: Vec<(u64, u32)> = ev
                .iter()
                .filter(|e| e["event"] == "spawn")
                .map(|e| {
                    (
                        e["rank"].as_u64().expect("rank"),
                        e["pid"].as_u64().expect("pid") as u32,
                    )
                })
                .collect();
            pids.sort();
            return (child, pids.into_iter().map(|p| p.1).collect(), run);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the job never got going: {ev:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_worker_stops_a_job_without_restarts_and_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (child, pids, run) = start_long_job(tmp.path(), &["launch.max_restarts=0"]);
    signal(pids[1], "-KILL");
    let (status, err, took) = wait_exit(child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("rank 1") && err.contains("SIGKILL"), "{err}");
    assert!(took < Duration::from_secs(10));
    let ev = run_events(&run);
    let fault = ev
        .iter()
        .find(|e| e["event"] == "fault")
        .expect("a fault event");
    assert_eq!(
        (&fault["rank"], &fault["kind"]),
        (&1.into(), &"crash".into()),
        "{fault}"
    );
    assert!(
        fault["detail"].as_str().expect("detail").contains("rank 1"),
        "{fault}"
    );
    let decision = ev
        .iter()
        .find(|e| e["event"] == "decision")
        .expect("a decision");
    assert_eq!(decision["action"], "give_up", "{decision}");
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived the job");
    }
}

#[test]
fn a_stopped_peer_fails_the_others_within_the_deadline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (child, pids, run) = start_long_job(
        tmp.path(),
        &["launch.collective_timeout_s=2", "launch.max_restarts=0"],
    );
    signal(pids[1], "-STOP");
    let stopped = Instant::now();
    let (status, err, _) = wait_exit(child, Duration::from_secs(30));
    let took = stopped.elapsed();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("rank 1 did not answer within 2"), "{err}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(12),
        "{took:?}"
    );
    let ev = run_events(&run);
    let fault = ev
        .iter()
        .find(|e| e["event"] == "fault")
        .expect("a fault event");
    assert!(
        fault["detail"]
            .as_str()
            .expect("detail")
            .contains("rank 1 did not answer"),
        "{fault}"
    );
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived the job");
    }
}

/// A LoRA job of `steps` in `dir`, its losses on 2 agents × `nproc` workers, and its run
/// directory emptied for the run under test.
fn undisturbed_run(dir: &Path, steps: u64, nproc: usize) -> (PathBuf, PathBuf, Vec<f64>) {
    let job = write_job(dir, true, steps);
    let losses = train(&job, 2, nproc, &[]);
    let run = dir.join("run");
    let _ = std::fs::remove_dir_all(&run);
    (job, run, losses)
}

/// The control plane takes calls only with the job's shared secret: a call with a wrong
/// token (or none) during a two-agent job is refused and logged, and the job goes on to
/// the losses of an undisturbed run; a multi-node job without a secret does not start.
#[test]
fn a_control_plane_call_with_a_wrong_token_is_rejected_and_the_job_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (job, run, undisturbed) = undisturbed_run(tmp.path(), 6, 2);
    let rdzv = format!("127.0.0.1:{}", free_port());
    let children = start_agents(&job, 2, 2, &rdzv, &[]);
    // Once the coordinator is up (it writes the start event), knock with a wrong token.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_events(&run).iter().any(|e| e["event"] == "start") {
        assert!(Instant::now() < deadline, "the coordinator never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let wrong = tidemill::launcher::probe(&rdzv, "not-the-job-token-0000", &Default::default())
        .expect_err("a wrong token is refused")
        .to_string();
    assert!(wrong.contains("wrong token"), "{wrong}");
    tidemill::launcher::probe(&rdzv, TOKEN, &Default::default())
        .expect("the job's token is accepted");
    wait_ok(children, "an agent");
    let rejected: Vec<_> = run_events(&run)
        .into_iter()
        .filter(|e| e["event"] == "auth_rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["reason"], "wrong token");
    assert!(rejected[0]["peer"]
        .as_str()
        .expect("peer")
        .starts_with("127.0.0.1:"));
    assert_same(
        &undisturbed,
        &losses(&run),
        "a job knocked on with a wrong token",
    );

    // Two nodes and no secret: refused before anything starts, naming what to set.
    let out = Command::new(env!("CARGO_BIN_EXE_launch"))
        .env_remove(tidemill::launcher::TOKEN_ENV)
        .arg("train")
        .arg(&job)
        .args([
            "--nproc-per-node",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rdzv",
            &rdzv,
        ])
        .output()
        .expect("launch runs");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("TIDEMILL_TOKEN"), "{}", stderr(&out));
}

/// With `launch.tls_ca` (and node 0's certificate and key) the control plane runs over TLS:
/// the job trains to the losses of a plain one; a plain-text call does not get through, a
/// TLS call with the right token does; a file that is not PEM is refused naming its key.
#[test]
fn the_control_plane_runs_over_tls_when_given_certificates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (job, run, plain) = undisturbed_run(tmp.path(), 4, 1);
    let tls = fixtures().join("tls");
    let set = |key: &str, file: &str| format!("launch.{key}=\"{}\"", tls.join(file).display());
    let sets = [
        set("tls_ca", "ca.pem"),
        set("tls_cert", "server.pem"),
        set("tls_key", "server.key"),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let rdzv = format!("127.0.0.1:{}", free_port());
    // Paced (a test-only sleep after each step) so the probes find the job running.
    let pace = [
        (0, "TIDEMILL_TEST_DELAY", "*:0.5"),
        (1, "TIDEMILL_TEST_DELAY", "*:0.5"),
    ];
    let children = start_agents_env(&job, 2, 1, &rdzv, &sets, &pace);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_events(&run).iter().any(|e| e["event"] == "step") {
        assert!(Instant::now() < deadline, "the coordinator never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    use tidemill::launcher::probe;
    assert!(
        probe(&rdzv, TOKEN, &Default::default()).is_err(),
        "plain text got through"
    );
    let launch = tidemill::launcher::LaunchOptions {
        tls_ca: Some(tls.join("ca.pem")),
        node_rank: 1,
        ..Default::default()
    };
    let client = tidemill::launcher::Tls::load(&launch).expect("the CA loads");
    probe(&rdzv, TOKEN, &client).expect("a TLS call with the token is accepted");
    wait_ok(children, "an agent");
    assert_same(&plain, &losses(&run), "a job over TLS");

    let not_pem = format!("launch.tls_ca=\"{}\"", job.display());
    let out = launch_train(&job, 1, &[&not_pem]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("launch.tls_ca") && stderr(&out).contains("PEM"),
        "{}",
        stderr(&out)
    );
    // A key that does not belong to the certificate: refused before anything starts.
    let wrong_key = [
        set("tls_ca", "ca.pem"),
        set("tls_cert", "ca.pem"),
        set("tls_key", "server.key"),
    ];
    let wrong_key: Vec<&str> = wrong_key.iter().map(String::as_str).collect();
    let out = launch_train(&job, 1, &wrong_key);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("launch.tls_key"), "{}", stderr(&out));
}

/// Ctrl-C reaches an agent wherever it waits: node 0 of a two-node job whose second node
/// never comes stops on SIGINT at once (not after the rendezvous timeout), and a node 1
/// still looking for a coordinator that is not there stops on SIGTERM.
#[test]
fn an_agent_waiting_for_the_others_stops_on_sigint_and_sigterm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = write_job(tmp.path(), true, 4);
    let run = tmp.path().join("run");
    let rdzv = format!("127.0.0.1:{}", free_port());
    let node = |rank| {
        agent_cmd(&job, 2, 1, rank, &rdzv, &["launch.rdzv_timeout_s=300"])
            .spawn()
            .expect("launch starts")
    };
    let node0 = node(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_events(&run).iter().any(|e| e["event"] == "start") {
        assert!(Instant::now() < deadline, "the coordinator never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_handlers(node0.id());
    // Let it settle into the rendezvous, beating.
    std::thread::sleep(Duration::from_millis(500));
    signal(node0.id(), "-INT");
    let (status, err, took) = wait_exit(node0, Duration::from_secs(10));
    assert!(!status.success(), "{err}");
    assert!(err.contains("interrupted (SIGINT)"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Nobody listens at the rendezvous now: node 1 retries its connection for 300 s.
    let node1 = node(1);
    wait_for_handlers(node1.id());
    signal(node1.id(), "-TERM");
    let (status, err, took) = wait_exit(node1, Duration::from_secs(10));
    assert!(!status.success(), "{err}");
    assert!(err.contains("terminated (SIGTERM)"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
