//! Running jobs of several agents and workers on loopback, for the launch and fault tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Rank 0's `(step, loss)` in the order logged.
fn rank0_steps(run: &Path) -> Vec<(u64, f64)> {
    records(run)
        .into_iter()
        .filter(|r| r.rank == Some(0))
        .filter_map(|r| match r.event {
            Event::Step(s) => Some((s.stats.step, s.stats.loss)),
            _ => None,
        })
        .collect()
}

/// Rank 0's loss at each step (and then the eval losses), in order.
pub fn losses(run: &Path) -> Vec<f64> {
    let mut steps = rank0_steps(run);
    steps.sort_by_key(|s| s.0);
    let evals = records(run).into_iter().filter_map(|r| match r.event {
        Event::Eval { loss, .. } => Some(loss),
        _ => None,
    });
    steps.into_iter().map(|s| s.1).chain(evals).collect()
}

/// Rank 0's loss at each step; a step run again after a restart counts as its last run.
pub fn step_losses(run: &Path) -> std::collections::BTreeMap<u64, f64> {
    rank0_steps(run).into_iter().collect()
}

pub fn write_job(dir: &Path, lora: bool, steps: u64) -> PathBuf {
    let data = fixtures().join("data");
    let mut body = format!(
        "[job]\nname = \"dp\"\nrun_dir = \"{run}\"\n[model]\npath = \"{model}\"\n[data]\ntrain = \"{train}\"\neval = \"{eval}\"\nmax_seq_len = 64\npacking = false\n\
         [training]\nmax_steps = {steps}\nglobal_batch = 8\nmicro_batch = 1\nlr = 1e-2\nseed = 3\nwarmup_steps = 2\neval_every = 5\n",
        run = dir.join("run").display(),
        model = model_dir("llama2").display(),
        train = data.join("train_tokens.jsonl").display(),
        eval = data.join("eval_tokens.jsonl").display(),
    );
    if lora {
        body.push_str(
            "[lora]\nr = 4\nalpha = 8\ntargets = [\"q_proj\", \"v_proj\", \"down_proj\"]\n",
        );
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, body).expect("job");
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Start `nnodes` agents of `job` (rendezvous at `rdzv`), `nproc` workers each.
pub fn start_agents(
    job: &Path,
    nnodes: usize,
    nproc: usize,
    rdzv: &str,
    sets: &[&str],
) -> Vec<Child> {
    start_agents_env(job, nnodes, nproc, rdzv, sets, &[])
}

/// [`start_agents`], with `(node, VAR, value)` in that node's agent's environment.
pub fn start_agents_env(
    job: &Path,
    nnodes: usize,
    nproc: usize,
    rdzv: &str,
    sets: &[&str],
    envs: &[(usize, &str, &str)],
) -> Vec<Child> {
    (0..nnodes)
        .map(|node| {
            let mut c = agent_cmd(job, nnodes, nproc, node, rdzv, sets);
            for (_, var, value) in envs.iter().filter(|e| e.0 == node) {
                c.env(var, value);
            }
            c.spawn().expect("launch starts")
        })
        .collect()
}

/// The `launch train` of node `node` of `nnodes` (`nproc` workers, rendezvous at `rdzv`,
/// each of `sets` as `--set`), stdout discarded and stderr piped.
pub fn agent_cmd(
    job: &Path,
    nnodes: usize,
    nproc: usize,
    node: usize,
    rdzv: &str,
    sets: &[&str],
) -> Command {
    let mut c = launch_cmd();
    c.arg("train")
        .arg(job)
        .args(["--nproc-per-node", &nproc.to_string()]);
    if nnodes > 1 || node > 0 {
        c.args([
            "--nnodes",
            &nnodes.to_string(),
            "--node-rank",
            &node.to_string(),
            "--rdzv",
            rdzv,
        ]);
    }
    for s in sets {
        c.args(["--set", s]);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Train `job` with `nproc` workers on each of `nnodes` agents; return rank 0's losses.
pub fn train(job: &Path, nnodes: usize, nproc: usize, sets: &[&str]) -> Vec<f64> {
    let run = job.parent().expect("dir").join("run");
    let _ = std::fs::remove_dir_all(&run);
    let rdzv = format!("127.0.0.1:{}", free_port());
    wait_ok(
        start_agents(job, nnodes, nproc, &rdzv, sets),
        &format!("{nnodes}×{nproc}"),
    );
    let ev = records(&run);
    let world = nnodes * nproc;
    for rank in 0..world {
        let steps = ev
            .iter()
            .filter(|e| e.rank == Some(rank))
            .filter(|e| matches!(&e.event, Event::Step(s) if s.stats.step_time > 0.0))
            .count();
        assert!(steps > 0, "rank {rank} reported its steps");
    }
    losses(&run)
}

/// Wait for every agent of a job; each must succeed (`what` and its stderr otherwise).
pub fn wait_ok(children: Vec<Child>, what: &str) {
    for child in children {
        let out = child.wait_with_output().expect("launch ends");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn assert_same(reference: &[f64], got: &[f64], what: &str) {
    assert_eq!(reference.len(), got.len(), "{what}: step count");
    for (i, (a, b)) in reference.iter().zip(got).enumerate() {
        assert!(
            rel_diff(*b, *a) < 1e-5,
            "{what}: step {} loss {b} vs one process {a}",
            i + 1
        );
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

pub fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes; `kill -0` would still succeed on it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

pub fn wait_exit(
    mut child: Child,
    limit: Duration,
) -> (std::process::ExitStatus, String, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (status, err, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("launch did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` has installed a handler for signal number `sig` (its SigCgt mask
/// in /proc): a signal sent before that would take the default action.
pub fn catches(pid: u32, sig: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:").map(|h| h.trim().to_string()))
        })
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// Wait (at most a minute) until `pid` handles SIGINT and SIGTERM.
pub fn wait_for_handlers(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(catches(pid, 2) && catches(pid, 15)) {
        assert!(
            Instant::now() < deadline,
            "{pid} never handled SIGINT/SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
