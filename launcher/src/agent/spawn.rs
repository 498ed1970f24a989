//! Starting and stopping worker processes.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use parallel::runtime::env::WorkerEnv;

/// The program each worker runs and what it gets besides the rank variables.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Variables besides the rank environment (a tidal window's control file).
    pub env: Vec<(String, String)>,
    /// The worker ignores SIGTERM and SIGUSR1 (a tidal window's): a scheduler that signals
    /// every process of the job (Slurm's `--signal`, `scancel`) asks the agent for a
    /// graceful stop, which tells the workers through the control file and kills what is
    /// left at the deadline (SIGKILL).
    pub ignore_stop_signals: bool,
}

/// A worker's environment ([`WorkerEnv::vars`]) plus, like torchrun's OMP_NUM_THREADS=1,
/// a thread count that keeps N workers from each taking every core.
fn worker_vars(env: &WorkerEnv) -> Vec<(&'static str, String)> {
    let mut v = env.vars();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        v.push((
            "RAYON_NUM_THREADS",
            (cores / env.local_world_size).max(1).to_string(),
        ));
    }
    v
}

/// `LD_LIBRARY_PATH` for the workers with a directory linking `libnccl.so` to the NCCL
/// this host has (cudarc does not load `libnccl.so.2`, NCCL's own name); nothing on a
/// host without NCCL, and nothing in a build without the GPU path. The directory is this
/// agent's own, on this host (a run directory may be shared by nodes whose NCCL differ).
pub fn nccl_env() -> crate::error::Result<Vec<(String, String)>> {
    if !cfg!(feature = "cuda") {
        return Ok(Vec::new());
    }
    let under = std::env::temp_dir().join(format!("tidemill-{}", std::process::id()));
    let dir = parallel::nccl::library::link_dir(&under)
        .map_err(|e| crate::error::Error::Launch(e.to_string()))?;
    Ok(dir
        .map(|d| {
            let mut paths = vec![d];
            paths.extend(
                std::env::var_os("LD_LIBRARY_PATH")
                    .map_or_else(Vec::new, |p| std::env::split_paths(&p).collect()),
            );
            let joined = std::env::join_paths(paths).unwrap_or_default();
            (
                "LD_LIBRARY_PATH".to_string(),
                joined.to_string_lossy().into_owned(),
            )
        })
        .into_iter()
        .collect())
}

/// Start one worker, leader of its own process group (so stopping it also stops anything it
/// started, e.g. `launch run -- bash train.sh`). It is killed if this agent dies
/// (PR_SET_PDEATHSIG), so no worker outlives its agent.
pub fn spawn(cmd: &WorkerCommand, env: &WorkerEnv) -> std::io::Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd.program);
    c.args(&cmd.args)
        .envs(worker_vars(env))
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .process_group(0);
    die_with_parent(&mut c, cmd.ignore_stop_signals);
    c.spawn()
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command, ignore_stop_signals: bool) {
    use nix::sys::signal::{signal, SigHandler};
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2)
    // and signal(2) (to ignore, which exec keeps), both async-signal-safe, and touches no
    // state shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if ignore_stop_signals {
                for sig in [Signal::SIGTERM, Signal::SIGUSR1] {
                    signal(sig, SigHandler::SigIgn).map_err(std::io::Error::from)?;
                }
            }
            Ok(())
        });
    }
}

/// SIGKILL a worker and its process group (already gone is fine).
pub fn kill_now(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// `(code, signal)` of an exit status: the code is -1 when a signal ended the process.
pub fn code_and_signal(status: &ExitStatus) -> (i32, i32) {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, 0),
        (None, Some(s)) => (-1, s),
        (None, None) => (-1, 0),
    }
}

/// SIGKILL a worker's process group (already gone is fine).
pub fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
