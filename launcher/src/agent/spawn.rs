//! Starting and stopping worker processes.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// The program each worker runs and what it gets besides the rank variables.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// A worker's environment: torchrun's variables plus tidemill's (`parallel::runtime::env`).
#[derive(Clone, Debug)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub node_rank: usize,
    pub nnodes: usize,
    pub generation: u64,
    pub master: (String, u16),
    pub agent_addr: String,
    pub data_host: String,
    pub run_dir: PathBuf,
    pub collective_timeout_s: f64,
    pub connect_timeout_s: f64,
}

impl RankEnv {
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        use parallel::runtime::env as e;
        let mut v = vec![
            (e::RANK, self.rank.to_string()),
            (e::LOCAL_RANK, self.local_rank.to_string()),
            (e::WORLD_SIZE, self.world_size.to_string()),
            (e::LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (e::MASTER_ADDR, self.master.0.clone()),
            (e::MASTER_PORT, self.master.1.to_string()),
            (e::AGENT_ADDR, self.agent_addr.clone()),
            (e::NODE_RANK, self.node_rank.to_string()),
            (e::NNODES, self.nnodes.to_string()),
            (e::GENERATION, self.generation.to_string()),
            (e::RUN_DIR, self.run_dir.display().to_string()),
            (e::DATA_HOST, self.data_host.clone()),
            (
                e::COLLECTIVE_TIMEOUT_S,
                self.collective_timeout_s.to_string(),
            ),
            (e::CONNECT_TIMEOUT_S, self.connect_timeout_s.to_string()),
        ];
        // Like torchrun's OMP_NUM_THREADS=1: don't let N workers each take every core.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            v.push((
                "RAYON_NUM_THREADS",
                (cores / self.local_world_size).max(1).to_string(),
            ));
        }
        v
    }
}

/// Start one worker, leader of its own process group (so stopping it also stops anything it
/// started, e.g. `launch run -- bash train.sh`). It is killed if this agent dies
/// (PR_SET_PDEATHSIG), so no worker outlives its agent.
pub fn spawn(cmd: &WorkerCommand, env: &RankEnv) -> std::io::Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd.program);
    c.args(&cmd.args)
        .envs(env.vars())
        .kill_on_drop(true)
        .process_group(0);
    die_with_parent(&mut c);
    c.spawn()
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2),
    // which is async-signal-safe, and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
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
