//! The hand-back of a node's GPUs after its workers stopped: their process groups empty,
//! no worker process on a GPU (NVML, on CUDA), and the operator's hook; and where
//! `launch preempt` leaves its request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::killpg;
use nix::unistd::Pid;

use super::now;

/// Where `launch preempt RUN_DIR` leaves its deadline for node 0's agent.
pub fn preempt_file(run_dir: &Path) -> PathBuf {
    run_dir.join("preempt")
}

/// Whether any process of `pid`'s process group is left (a zombie not yet reaped counts).
pub fn group_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|pid| killpg(Pid::from_raw(pid), None).is_ok())
}

/// After a node's workers are reaped: wait (until at most `handback`) for their process
/// groups to be empty, and on CUDA check with NVML that no process of ours holds GPU
/// memory. What was checked, in words.
pub async fn check_released(pids: &[u32], handback: f64) -> String {
    let limit = handback.max(now() + 1.0);
    while pids.iter().any(|p| group_alive(*p)) && now() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<u32> = pids.iter().copied().filter(|p| group_alive(*p)).collect();
    let groups = match left.is_empty() {
        true => format!("{} worker process groups gone", pids.len()),
        false => format!("process groups still alive: {left:?}"),
    };
    format!("{groups}; {}", gpu_check(pids))
}

/// No process of ours (a worker, or one in a worker's process group) on any GPU.
#[cfg(feature = "cuda")]
fn gpu_check(pids: &[u32]) -> String {
    use nvml_wrapper::Nvml;
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => return format!("NVML unavailable ({e}): GPU memory not checked"),
    };
    let ours = |pid: u32| {
        pids.contains(&pid)
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.split_whitespace().nth(2)?.to_string();
                    after.parse::<u32>().ok()
                })
                .is_some_and(|pgrp| pids.contains(&pgrp))
    };
    let count = nvml.device_count().unwrap_or(0);
    let mut held = Vec::new();
    for i in 0..count {
        let Ok(device) = nvml.device_by_index(i) else {
            continue;
        };
        for p in device.running_compute_processes().unwrap_or_default() {
            if ours(p.pid) {
                held.push((i, p.pid));
            }
        }
    }
    match held.is_empty() {
        true => format!("NVML: no process of ours on {count} GPUs"),
        false => format!("NVML: still held (gpu, pid): {held:?}"),
    }
}

/// Without the GPU path: nothing holds GPU memory.
#[cfg(not(feature = "cuda"))]
fn gpu_check(_pids: &[u32]) -> String {
    "no GPU path in this build".into()
}

/// Run an operator's hook (`sh -c`, TIDEMILL_NODE and TIDEMILL_RUN_DIR set) within
/// `timeout_s`; a failure or a timeout is logged, not fatal (the GPUs are free either way).
pub async fn hook(key: &str, cmd: &str, timeout_s: f64, node: usize, run_dir: &Path) {
    let mut c = tokio::process::Command::new("sh");
    c.args(["-c", cmd])
        .env("TIDEMILL_NODE", node.to_string())
        .env("TIDEMILL_RUN_DIR", run_dir)
        .kill_on_drop(true);
    let run = async {
        match c.status().await {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("exited with {s}")),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(Duration::from_secs_f64(timeout_s), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{key} `{cmd}`: {e}"),
        Err(_) => tracing::warn!("{key} `{cmd}`: killed after {timeout_s} s"),
    }
}
