//! Errors of the `launch` CLI and the exit code each maps to.

use std::path::PathBuf;

/// Exit status of a job that stopped for its window's end or a preemption: sysexits'
/// EX_TEMPFAIL, "yielded, run me again" (0 is finished, anything else a failure).
pub const YIELDED: u8 = 75;

/// What `launch` can fail with. [`Error::exit_code`]: 2 for bad configuration or usage,
/// 1 for failures while running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job file or an override is invalid (the message names the key).
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    /// The job file cannot be read.
    #[error("{path}: {source}")]
    ConfigIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A path named by the config or the command line does not exist or is of the wrong kind.
    #[error("{key}: {path}: {message}")]
    BadPath {
        key: String,
        path: PathBuf,
        message: String,
    },
    /// The run directory cannot be written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Starting the job failed (rendezvous, the coordinator, spawning workers).
    #[error("{0}")]
    Launch(String),
    /// A worker process failed; the message names its rank, node, pid and exit status.
    #[error("{message}")]
    WorkerFailed { message: String, code: u8 },
    /// The coordinator stopped the job (another node's worker failed, a node was lost) or
    /// the agent was interrupted.
    #[error("job stopped: {0}")]
    JobStopped(String),
    /// A tidal job stopped for its window's end or a preemption, to be run again: exit
    /// status [`YIELDED`].
    #[error("yielded: {0}")]
    Yielded(String),
    #[error(transparent)]
    Trainer(#[from] trainer::Error),
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
}

impl Error {
    /// 2 for bad configuration, usage or input files (the model's, the data's, an
    /// adapter's), 1 for failures while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config { .. } | Error::ConfigIo { .. } | Error::BadPath { .. } => 2,
            Error::WorkerFailed { code, .. } => *code,
            Error::Yielded(_) => YIELDED,
            Error::Trainer(e) if e.is_input() => 2,
            Error::Checkpoint(e) if e.is_input() => 2,
            Error::Parallel(parallel::Error::Layout(_)) => 2,
            Error::Io { .. }
            | Error::Launch(_)
            | Error::JobStopped(_)
            | Error::Trainer(_)
            | Error::Checkpoint(_)
            | Error::Parallel(_) => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Ok` if the path named by `key` exists (and is a directory, when `dir`); otherwise an
/// error naming the key and the path.
pub fn require_path(key: &str, path: &std::path::Path, dir: bool) -> Result<()> {
    let message = match (path.exists(), dir && !path.is_dir()) {
        (false, _) => "no such file or directory",
        (true, true) => "not a directory",
        (true, false) => return Ok(()),
    };
    Err(Error::BadPath {
        key: key.into(),
        path: path.to_path_buf(),
        message: message.into(),
    })
}

/// A file or directory that must exist.
pub fn require_exists(key: &str, path: &std::path::Path) -> Result<()> {
    require_path(key, path, false)
}

/// An error and its sources on one line, `a: b: c`, skipping a source the message already
/// ends with (several of our errors print their source inline).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
