//! Fault tolerance end to end: a job of 2 agents × 2 workers on loopback, a fault injected
//! with a signal (or, for a straggler, a test-only delay), and the job must detect it, name
//! it, recover and finish every step with the losses of an undisturbed run. Each test
//! prints its detection latency and recovery time (fault → next completed step) and checks
//! them against the targets: a lost heartbeat within 3 × the 1 s interval + 1 s, a hang
//! within the hang limit + 1 s, recovery within 15 s.
//!
//! The tests measure time, so they run one at a time, and in a test binary of their own
//! (cargo runs test binaries one after the other: nothing else loads the machine then).

#[path = "../it/common/mod.rs"]
mod common;
mod slurm;
mod tidal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::jobs::*;
use crate::common::*;
use serde_json::Value;

const STEPS: u64 = 60;
/// Checkpoint every 2 steps; a hang is no progress for 3 s (the steps take far less).
const SETS: &[&str] = &["checkpoint.every=2", "launch.hang_floor_s=3"];
const HANG_LIMIT_S: f64 = 3.0;
const HEARTBEAT_TIMEOUT_S: f64 = 3.0;
const RECOVERY_TARGET_S: f64 = 15.0;

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Rank 0's losses of the undisturbed 2 × 2 run (computed once).
fn reference() -> &'static BTreeMap<u64, f64> {
    static REFERENCE: OnceLock<BTreeMap<u64, f64>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let job = write_job(tmp.path(), true, STEPS);
        train(&job, 2, 2, SETS);
        let losses = step_losses(&tmp.path().join("run"));
        assert_eq!(
            losses.len() as u64,
            STEPS,
            "the reference run took every step"
        );
        losses
    })
}

struct Job {
    agents: Vec<Child>,
    job: PathBuf,
    rdzv: String,
    run: PathBuf,
    /// Worker pid of each rank (first generation).
    workers: BTreeMap<u64, u32>,
}

/// Every rank sleeps this long after each step (a test-only hook that does not change the
/// numbers): the steps take about 15 ms here, too fast to act between them.
const PACE: &str = "*:0.1";

/// Start the job (each node's agent with `TIDEMILL_TEST_DELAY` = `delays[node]`, and a
/// spare agent, node rank 2, when `spare`) and return once every rank has taken 4 steps
/// (2 checkpoints committed).
fn start(dir: &Path, delays: [&str; 2], spare: bool) -> Job {
    let job = write_job(dir, true, STEPS);
    let run = dir.join("run");
    let rdzv = format!("127.0.0.1:{}", free_port());
    let envs = [
        (0, "TIDEMILL_TEST_DELAY", delays[0]),
        (1, "TIDEMILL_TEST_DELAY", delays[1]),
    ];
    let mut agents = start_agents_env(&job, 2, 2, &rdzv, SETS, &envs);
    if spare {
        let mut sets = SETS.to_vec();
        sets.push("launch.spare=true");
        let mut c = agent_cmd(&job, 2, 2, 2, &rdzv, &sets);
        c.env("TIDEMILL_TEST_DELAY", PACE);
        agents.push(c.spawn().expect("the spare starts"));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ev = run_events(&run);
        let stepped = |r: u64| {
            ev.iter()
                .any(|e| e["event"] == "step" && e["rank"] == r && e["step"].as_u64() >= Some(4))
        };
        if (0..4).all(stepped) {
            let workers = ev
                .iter()
                .filter(|e| e["event"] == "spawn")
                .map(|e| {
                    let rank = e["rank"].as_u64().expect("rank");
                    (rank, e["pid"].as_u64().expect("pid") as u32)
                })
                .collect();
            return Job {
                agents,
                job,
                rdzv,
                run,
                workers,
            };
        }
        if Instant::now() > deadline || ev.iter().any(|e| e["event"] == "done") {
            kill_rest(&mut Job {
                agents,
                job,
                rdzv,
                run,
                workers: BTreeMap::new(),
            });
            panic!("the job never got going (or ended too soon): {ev:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One fault test's run, one test at a time: start the job, `inject` the fault once every
/// rank took 4 steps, wait for the agents in `survivors` to finish and kill whatever is
/// left. The job, its events, and its directory (kept until the test ends).
fn faulted(
    delays: [&str; 2],
    spare: bool,
    survivors: &[usize],
    inject: impl FnOnce(&mut Job),
) -> (Job, Vec<Value>, tempfile::TempDir) {
    let _one = serial();
    reference();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut job = start(tmp.path(), delays, spare);
    inject(&mut job);
    finish(&mut job, survivors);
    kill_rest(&mut job);
    let ev = run_events(&job.run);
    (job, ev, tmp)
}

/// Wait for the agents in `survivors` to end successfully (within 3 minutes).
fn finish(job: &mut Job, survivors: &[usize]) {
    for &n in survivors {
        let child = std::mem::replace(
            &mut job.agents[n],
            std::process::Command::new("true").spawn().expect("true"),
        );
        let (status, err, _) = wait_exit(child, Duration::from_secs(180));
        assert!(status.success(), "agent {n}: {err}");
    }
}

/// Kill whatever is left of the job (a stopped agent, its workers).
fn kill_rest(job: &mut Job) {
    for a in &mut job.agents {
        let _ = a.kill();
        let _ = a.wait();
    }
}

fn event<'a>(ev: &'a [Value], kind: &str) -> &'a Value {
    ev.iter()
        .find(|e| e["event"] == kind)
        .unwrap_or_else(|| panic!("no `{kind}` event in {ev:#?}"))
}

/// The fault of `kind`, its decision, and the printed detection latency and recovery time.
fn report<'a>(ev: &'a [Value], kind: &str, what: &str) -> (&'a Value, &'a Value, f64, Option<f64>) {
    let fault = ev
        .iter()
        .find(|e| e["event"] == "fault" && e["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} fault in {ev:#?}"));
    let decision = ev
        .iter()
        .find(|e| e["event"] == "decision" && e["fault"] == kind)
        .expect("a decision");
    let latency = fault["detection_latency_s"].as_f64().expect("latency");
    let recovery = ev
        .iter()
        .find(|e| e["event"] == "recovered")
        .and_then(|e| e["seconds_since_fault"].as_f64());
    println!(
        "{what}: {kind} detected after {latency:.2} s; recovery (fault → next step) {}; {}",
        recovery.map_or("none needed".into(), |r| format!("{r:.2} s")),
        fault["detail"]
    );
    (fault, decision, latency, recovery)
}

fn assert_losses(got: &BTreeMap<u64, f64>, tolerance: f64, what: &str) {
    let reference = reference();
    assert_eq!(got.len(), reference.len(), "{what}: every step finished");
    for (step, want) in reference {
        let have = got[step];
        assert!(
            rel_diff(have, *want) <= tolerance,
            "{what}: step {step} loss {have} vs undisturbed {want}"
        );
    }
}

/// The fault names `rank` on `node` and its detail says `text`.
fn assert_names(fault: &Value, rank: u64, node: u64, text: &str) {
    assert_eq!(
        (&fault["rank"], &fault["node"]),
        (&rank.into(), &node.into()),
        "{fault}"
    );
    let detail = fault["detail"].as_str().expect("detail");
    assert!(detail.contains(text), "{fault}");
}

/// Every worker of the first generation is gone (killed before the restart).
fn assert_gone(job: &Job) {
    for (rank, pid) in &job.workers {
        assert!(
            !alive(*pid),
            "rank {rank}'s worker {pid} outlived its generation"
        );
    }
}

#[test]
fn a_killed_worker_is_restarted_in_place_with_the_losses_of_an_undisturbed_run() {
    let (job, ev, _dir) = faulted([PACE, PACE], false, &[0, 1], |job| {
        signal(job.workers[&2], "-KILL")
    });
    let (fault, decision, _, recovery) = report(&ev, "crash", "SIGKILL rank 2");
    assert_names(fault, 2, 1, "SIGKILL");
    assert_eq!(decision["action"], "restart_in_place", "{decision}");
    let restart = event(&ev, "restart");
    assert_eq!(
        (&restart["generation"], &restart["world"]),
        (&1.into(), &4.into())
    );
    assert!(event(&ev, "resumed")["step"].as_u64() >= Some(2));
    assert!(recovery.expect("recovered") <= RECOVERY_TARGET_S);
    assert_losses(&step_losses(&job.run), 1e-5, "restarted in place");
    assert_gone(&job);
}

#[test]
fn a_stopped_worker_is_a_hang_naming_it_and_the_job_recovers() {
    let (job, ev, _dir) = faulted([PACE, PACE], false, &[0, 1], |job| {
        signal(job.workers[&1], "-STOP")
    });
    let (fault, decision, latency, recovery) = report(&ev, "hang", "SIGSTOP rank 1");
    assert_names(fault, 1, 0, "rank 1 (node 0)");
    assert_eq!(decision["action"], "restart_in_place", "{decision}");
    assert!(
        latency <= HANG_LIMIT_S + 1.0,
        "hang detected after {latency} s"
    );
    assert!(recovery.expect("recovered") <= RECOVERY_TARGET_S);
    assert_losses(&step_losses(&job.run), 1e-5, "recovered from a hang");
    assert_gone(&job);
}

/// A lost node (its agent stopped, or killed with its workers) is excluded and the job
/// re-plans for the 2 ranks left, resharding from the last checkpoint.
fn lose_node_1(how: &str) {
    let (job, ev, _dir) = faulted([PACE, PACE], false, &[0], |job| {
        signal(job.agents[1].id(), how);
        if how == "-KILL" {
            // Its workers die with it (PR_SET_PDEATHSIG); say so explicitly all the same.
            for rank in [2, 3] {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &job.workers[&rank].to_string()])
                    .status();
            }
        }
    });
    let what = format!("kill {how} node 1's agent");
    let (fault, decision, latency, recovery) = report(&ev, "lost_heartbeat", &what);
    assert_eq!(fault["node"], 1, "{fault}");
    assert_eq!(decision["action"], "shrink", "{decision}");
    assert!(
        latency <= HEARTBEAT_TIMEOUT_S + 1.0,
        "lost heartbeat after {latency} s"
    );
    assert!(recovery.expect("recovered") <= RECOVERY_TARGET_S);
    let restart = event(&ev, "restart");
    assert_eq!(
        (&restart["world"], &restart["nodes"]),
        (&2.into(), &serde_json::json!([0]))
    );
    assert_eq!(
        restart["plan"]["dp"].as_u64().unwrap_or(0)
            * restart["plan"]["tp"].as_u64().unwrap_or(0)
            * restart["plan"]["pp"].as_u64().unwrap_or(0),
        2,
        "{restart}"
    );
    assert!(
        ev.iter()
            .any(|e| e["event"] == "step" && e["generation"] == 1 && e["rank"] == 1),
        "the 2-rank generation trained"
    );
    assert_losses(&step_losses(&job.run), 1e-4, "shrunk to 2 ranks");
    for rank in [0, 1] {
        assert!(
            !alive(job.workers[&rank]),
            "rank {rank} outlived its generation"
        );
    }
}

#[test]
fn a_stopped_agent_is_a_lost_node_and_the_job_shrinks_to_two_ranks() {
    lose_node_1("-STOP");
}

#[test]
fn a_killed_agent_and_its_workers_are_a_lost_node_and_the_job_shrinks() {
    lose_node_1("-KILL");
}

/// An agent killed with its workers and started again at once (as systemd would) joins
/// the running job as a new process: an `agent_restart` fault, a restart in place, and the
/// losses of an undisturbed run.
#[test]
fn an_agent_restarted_at_once_is_a_fault_and_the_job_restarts_in_place() {
    let (job, ev, _dir) = faulted([PACE, PACE], false, &[0, 1], |job| {
        signal(job.agents[1].id(), "-KILL");
        let _ = job.agents[1].wait();
        let mut again = agent_cmd(&job.job, 2, 2, 1, &job.rdzv, SETS);
        again.env("TIDEMILL_TEST_DELAY", PACE);
        job.agents[1] = again.spawn().expect("node 1's agent starts again");
    });
    let (fault, decision, _, recovery) = report(&ev, "agent_restart", "SIGKILL node 1, restart it");
    assert_eq!(
        (&fault["node"], &fault["rank"]),
        (&1.into(), &Value::Null),
        "{fault}"
    );
    assert_eq!(decision["action"], "restart_in_place", "{decision}");
    assert!(recovery.expect("recovered") <= RECOVERY_TARGET_S);
    assert_eq!(
        ev.iter().filter(|e| e["event"] == "restart").count(),
        1,
        "one restart"
    );
    assert_losses(
        &step_losses(&job.run),
        1e-5,
        "with node 1's agent restarted",
    );
    assert_gone(&job);
}

#[test]
fn a_lost_node_is_replaced_by_a_registered_spare_keeping_the_layout() {
    let (job, ev, _dir) = faulted([PACE, PACE], true, &[0, 2], |job| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !run_events(&job.run)
            .iter()
            .any(|e| e["event"] == "join" && e["spare"] == true)
        {
            assert!(Instant::now() < deadline, "the spare never registered");
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(job.agents[1].id(), "-STOP");
    });
    let (fault, decision, latency, recovery) =
        report(&ev, "lost_heartbeat", "SIGSTOP node 1, spare 2");
    assert_eq!(fault["node"], 1, "{fault}");
    assert_eq!(decision["action"], "replace_node", "{decision}");
    assert!(
        latency <= HEARTBEAT_TIMEOUT_S + 1.0,
        "lost heartbeat after {latency} s"
    );
    assert!(recovery.expect("recovered") <= RECOVERY_TARGET_S);
    let restart = event(&ev, "restart");
    assert_eq!(
        (&restart["world"], &restart["nodes"]),
        (&4.into(), &serde_json::json!([0, 2]))
    );
    assert!(
        ev.iter()
            .any(|e| e["event"] == "step" && e["generation"] == 1 && e["node"] == 2),
        "the spare trained"
    );
    assert_losses(
        &step_losses(&job.run),
        1e-5,
        "with a spare in a lost node's place",
    );
}

#[test]
fn a_rank_slowed_by_a_delay_is_reported_as_a_straggler() {
    let (job, ev, _dir) = faulted([PACE, "3:0.4,*:0.1"], false, &[0, 1], |_| {});
    let (fault, decision, latency, _) = report(
        &ev,
        "straggler",
        "rank 3 sleeping 0.4 s a step, the others 0.1 s",
    );
    assert_eq!(
        (&fault["rank"], &fault["node"]),
        (&3.into(), &1.into()),
        "{fault}"
    );
    assert_eq!(decision["action"], "continue", "{decision}");
    assert!(latency < 10.0, "{latency}");
    assert!(
        !ev.iter().any(|e| e["event"] == "restart"),
        "a straggler is only reported"
    );
    assert_losses(&step_losses(&job.run), 1e-5, "with a straggler");
}
