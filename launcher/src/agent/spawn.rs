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

/// A directory of this agent's, on this host, linking `libnccl.so` to the NCCL the host
/// has (cudarc does not load `libnccl.so.2`, NCCL's own name), put first on the workers'
/// `LD_LIBRARY_PATH`; removed when dropped. Nothing on a host without NCCL or in a build
/// without the GPU path; a link that cannot be made is a warning (a job on TCP does not
/// need it; one on NCCL then fails naming the library).
pub struct NcclLink {
    under: Option<PathBuf>,
    env: Option<(String, String)>,
}

impl NcclLink {
    pub fn make() -> Self {
        let none = Self {
            under: None,
            env: None,
        };
        if !cfg!(feature = "cuda") {
            return none;
        }
        let under = std::env::temp_dir().join(format!("tidemill-{}", std::process::id()));
        let dir = match parallel::nccl::library::link_dir(&under) {
            Ok(Some(dir)) => dir,
            Ok(None) => return none,
            Err(e) => {
                tracing::warn!("the workers may not find NCCL: {e}");
                return none;
            }
        };
        let mut paths = vec![dir];
        if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        let joined = std::env::join_paths(paths).unwrap_or_default();
        Self {
            under: Some(under),
            env: Some((
                "LD_LIBRARY_PATH".into(),
                joined.to_string_lossy().into_owned(),
            )),
        }
    }

    /// The workers' variable, if any.
    pub fn env(&self) -> Option<(String, String)> {
        self.env.clone()
    }
}

impl Drop for NcclLink {
    fn drop(&mut self) {
        if let Some(dir) = &self.under {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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
