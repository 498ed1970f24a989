//! Command line: `launch train|eval|export`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::JobConfig;
use crate::error::Result;
use crate::export::Format;

#[derive(Parser, Debug)]
#[command(name = "launch", version, about = "Fine-tune open LLMs with LoRA or full SFT")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train as the job file says; writes the run directory.
    Train {
        /// The job file (TOML).
        config: PathBuf,
        /// Override a key: --set training.lr=1e-4 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
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
        /// Dtype of HF weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { config, set } => crate::train::run(&JobConfig::load(&config, &set)?),
        Command::Eval { config, adapter, set } => {
            let report = crate::eval::run(&JobConfig::load(&config, &set)?, adapter.as_deref())?;
            println!("{}", crate::eval::report_line(&report));
            Ok(())
        }
        Command::Export {
            source,
            format,
            out,
            dtype,
        } => {
            if !["f32", "bf16", "f16"].contains(&dtype.as_str()) {
                return Err(crate::error::Error::Config {
                    file: "--dtype".into(),
                    message: format!("`{dtype}`: expected f32, bf16 or f16"),
                });
            }
            crate::export::run(&source, format, &out, &dtype)
        }
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
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::from(code)
        }
    }
}
