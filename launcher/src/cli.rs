//! Command line: `launch train|run|eval|export|convert|plan` (and the hidden `worker` the agent spawns).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::JobConfig;
use crate::error::Result;
use crate::export::Format;

#[derive(Parser, Debug)]
#[command(
    name = "launch",
    version,
    about = "Fine-tune open LLMs with LoRA or full SFT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train as the job file says; writes the run directory. Starts one worker per
    /// `--nproc-per-node` on this node; several nodes join through `--rdzv`.
    Train {
        /// The job file (TOML).
        config: PathBuf,
        /// Override a key: --set training.lr=1e-4 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        launch: LaunchArgs,
        /// Train one tidal window, from now until TIME (RFC 3339, or HH:MM[:SS] in
        /// `tidal.timezone`), then hand the GPUs back: exit 0 when finished, 75 when there
        /// is more to do (for a scheduler that starts the job itself each night).
        #[arg(long, value_name = "TIME", conflicts_with = "rehearse")]
        until: Option<String>,
        /// Rehearse the next tidal window with a clock SPEED times fast (510: a night of
        /// 8.5 h in a minute), for real, in `<run_dir>-rehearsal`: at which step the night
        /// ends and whether the hand-back margin holds.
        #[arg(long, value_name = "SPEED")]
        rehearse: Option<f64>,
    },
    /// Preempt a running tidal job: it stops within GRACE seconds (checkpointing if that
    /// fits) and its `launch train` exits 75 (with `--until`) or waits for the next window.
    Preempt {
        run_dir: PathBuf,
        /// Seconds the job has to stop.
        #[arg(long, default_value_t = 30.0)]
        grace: f64,
    },
    /// A run's tidal windows and totals (the goodput ledger), the windows still needed at
    /// the measured rate, and a picture of loss, tokens/s and the windows (status.svg).
    Status {
        run_dir: PathBuf,
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Run your own training program once per rank, with the torchrun environment
    /// (RANK, WORLD_SIZE, ...) plus TIDEMILL_* for `parallel::init()`.
    Run {
        #[command(flatten)]
        launch: LaunchArgs,
        /// The run directory for events.jsonl (default: runs/PROGRAM_NAME).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Seconds a collective may wait for a peer.
        #[arg(long)]
        collective_timeout: Option<f64>,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
        program: Vec<String>,
    },
    /// What this host offers the GPU path: the driver and its GPUs, the CUDA headers the
    /// kernels are compiled against, NVRTC and NCCL (JSON); exit 2 when one GPU rank could
    /// not run here.
    Probe,
    /// Put this host's data plane through the communicator contract (every collective,
    /// uneven sizes, split groups) with the device's tensors, alone or as each rank of
    /// `launch run -- launch comm-check` (on GPUs: NCCL, one GPU per rank), and time an
    /// all-reduce through the device path against host memory. One JSON line per rank;
    /// exit 1 when a case fails.
    CommCheck {
        #[arg(long, value_enum, default_value = "cpu")]
        device: crate::config::Device,
        /// MiB of f32 to all-reduce for the timing (0: no timing).
        #[arg(long, default_value_t = 0)]
        bench_mb: usize,
        /// Timed all-reduces per path (interleaved; the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// One rank of `launch train` (started by the agent, not by hand).
    #[command(hide = true)]
    Worker {
        config: PathBuf,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// The layout the coordinator decided (JSON).
        #[arg(long)]
        plan: String,
        /// Go on from the last committed checkpoint (a restarted generation).
        #[arg(long)]
        resume: bool,
        /// The tidal window's deadline and estimates (JSON).
        #[arg(long)]
        window: Option<String>,
    },
    /// Mean token loss on data.eval; the last stdout line is {"loss","tokens","samples"}.
    Eval {
        config: PathBuf,
        /// A PEFT adapter directory to apply to model.path.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write a run's result (or an adapter) as a PEFT adapter or a merged HF model.
    Export {
        /// A run directory, a PEFT adapter directory or an HF model directory.
        source: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        #[arg(long)]
        out: PathBuf,
        /// Dtype of HF weights.
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: checkpoint::DType,
    },
    /// Convert weights: hf:DIR → sharded:DIR laid out for --tp/--pp/--ep, sharded:DIR →
    /// hf:DIR, or sharded → sharded at another layout. Dtypes kept; streams tensor by tensor.
    /// The last stdout line is {"tensors","bytes","files","seconds"}.
    Convert(Box<crate::convert::ConvertArgs>),
    /// Pick dp/tp/pp/ep, micro-batch, recomputation, ZeRO-1 and virtual stages for a job
    /// (a job file, or model dimensions) on a cluster, from a cost model: candidates best
    /// first with predicted step time, TFLOP/s, MFU and memory, and why the rest were
    /// rejected. `--calibrate` measures this machine into a hardware profile.
    Plan(Box<crate::plan::PlanArgs>),
}

/// torchrun's flags; each overrides the job file's `[launch]` key of the same name.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LaunchArgs {
    /// Worker processes on this node.
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job.
    #[arg(long)]
    pub nnodes: Option<usize>,
    /// This node's index (0 hosts the coordinator).
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// HOST:PORT of the coordinator on node 0.
    #[arg(long)]
    pub rdzv: Option<String>,
    /// Address this node's workers listen on for the data plane.
    #[arg(long)]
    pub host: Option<String>,
}

impl LaunchArgs {
    /// `--set launch.KEY=VALUE` overrides for the flags given.
    fn overrides(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |key: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push(format!("launch.{key}={v}"));
            }
        };
        add("nproc_per_node", self.nproc_per_node.map(|v| v.to_string()));
        add("nnodes", self.nnodes.map(|v| v.to_string()));
        add("node_rank", self.node_rank.map(|v| v.to_string()));
        add("rdzv", self.rdzv.as_ref().map(|v| format!("\"{v}\"")));
        add("host", self.host.as_ref().map(|v| format!("\"{v}\"")));
        out
    }
}

/// `f32`, `bf16` or `f16`, as a job file writes them.
fn parse_dtype(s: &str) -> std::result::Result<checkpoint::DType, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            set,
            launch,
            until,
            rehearse,
        } => {
            let mut all = set.clone();
            all.extend(launch.overrides());
            match rehearse {
                Some(speed) => crate::launch::rehearse(&config, &all, speed),
                None => crate::launch::train(&config, &all, until.as_deref()),
            }
        }
        Command::Preempt { run_dir, grace } => crate::launch::preempt(&run_dir, grace),
        Command::Status { run_dir, format } => {
            print!("{}", crate::tidal::status::status(&run_dir, &format)?);
            Ok(())
        }
        Command::Run {
            launch,
            run_dir,
            collective_timeout,
            program,
        } => crate::launch::run_program(&launch.overrides(), run_dir, collective_timeout, &program),
        Command::Worker {
            config,
            set,
            plan,
            resume,
            window,
        } => {
            let mut cfg = JobConfig::load(&config, &set)?;
            cfg.checkpoint.resume |= resume;
            let json = |flag: &str, text: &str| crate::error::Error::Config {
                file: flag.into(),
                message: text.to_string(),
            };
            let plan = serde_json::from_str(&plan).map_err(|e| json("--plan", &e.to_string()))?;
            let window = match window {
                Some(w) => {
                    Some(serde_json::from_str(&w).map_err(|e| json("--window", &e.to_string()))?)
                }
                None => None,
            };
            crate::train::worker(&cfg, &plan, window)
        }
        Command::Eval {
            config,
            adapter,
            set,
        } => {
            let report = crate::eval::run(&JobConfig::load(&config, &set)?, adapter.as_deref())?;
            println!("{}", crate::eval::report_line(&report));
            Ok(())
        }
        Command::Export {
            source,
            format,
            out,
            dtype,
        } => crate::export::run(&source, format, &out, dtype),
        Command::Convert(args) => {
            println!("{}", crate::convert::run(&args.request()?)?);
            Ok(())
        }
        Command::Plan(args) => {
            print!("{}", crate::plan::run(&args)?);
            Ok(())
        }
        Command::Probe => probe(),
        Command::CommCheck {
            device,
            bench_mb,
            repeats,
        } => crate::comm_check::run(device, bench_mb, repeats),
    }
}

/// Parse arguments, run, print the error chain; 0 success, 2 bad config or usage, 1 failure.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // A worker says which rank it is: several write to the same terminal.
    let who = match (&cli.command, std::env::var(parallel::runtime::env::RANK)) {
        (Command::Worker { .. }, Ok(rank)) => format!("rank {rank}: "),
        _ => String::new(),
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(crate::error::Error::Yielded(why)) => {
            let line = format!("{who}yielded: {why}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::from(crate::tidal::YIELDED)
        }
        Err(e) => {
            let code = e.exit_code();
            // One write, so lines of workers failing together do not interleave.
            let line = format!("error: {who}{}\n", crate::error::chain(&e));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::from(code)
        }
    }
}

/// `launch probe`.
#[cfg(feature = "cuda")]
fn probe() -> Result<()> {
    let found = trainer::backend::CudaProbe::run();
    let mut json = serde_json::to_value(&found).unwrap_or_default();
    json["kernel_cache"] = trainer::backend::kernel_cache_dir()
        .display()
        .to_string()
        .into();
    println!("{json}");
    match found.missing() {
        Some(message) => Err(crate::error::Error::Config {
            file: "this host".into(),
            message: format!("the GPU path cannot run here: {message}"),
        }),
        None => Ok(()),
    }
}

/// `launch probe` in a build without the GPU path.
#[cfg(not(feature = "cuda"))]
fn probe() -> Result<()> {
    println!("{}", serde_json::json!({"cuda": false}));
    crate::config::Device::Cuda.ready()
}
