//! The trainer room of tidemill: model families and their Hugging Face name maps, LoRA,
//! tokenizer and chat templates, SFT datasets with packing and loss masks, AdamW and
//! schedules, and the builder that assembles a [`Trainer`] for any dp×tp×pp×ep layout.
//!
//! ```no_run
//! # use tidemill_trainer as trainer;
//! use trainer::backend::CpuTrain;
//! use trainer::{data, lora, DataOptions, LoraSpec, ParallelOptions, TrainOptions, Trainer};
//! # fn main() -> Result<(), trainer::Error> {
//! // This rank's place in the job `launch run` started (or a world of one), and the layout.
//! let ctx = parallel::init()?;
//! let layout = ParallelOptions { tp: 2, pp: 2, ..Default::default() };
//! let mesh = layout.mesh(&ctx)?;
//! // The whole model and data on every rank; the builder keeps this rank's share.
//! let dir = std::path::Path::new("models/tiny");
//! let base = trainer::load_hf_model::<CpuTrain>(dir, false, &Default::default())?;
//! let (model, _) = lora::apply(base, &LoraSpec::default(), 42)?;
//! let tokenizer = data::TextTokenizer::load(dir)?;
//! let opts = DataOptions { max_seq_len: 512, ..Default::default() };
//! let (rows, audit) = data::load_dataset("train.jsonl".as_ref(), Some(&tokenizer), &opts)?;
//! println!("{audit}");
//! let mut trainer = Trainer::builder(model, rows, &TrainOptions::default())
//!     .parallel(&mesh, &layout)
//!     .build()?;
//! println!("loss {}", trainer.step()?.loss);
//! # Ok(()) }
//! ```

pub mod backend;
mod backprop;
pub mod collective;
pub mod data;
mod error;
mod eval;
pub mod export;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
mod options;
mod parallelize;
pub mod pipeline;
pub mod state;
mod train;

pub use collective::{ParallelBackend, TrainBackend};
pub use data::DataOptions;
pub use error::{Error, Result};
pub use eval::{evaluate, evaluate_trained, inputs, EvalResult};
pub use lora::LoraSpec;
pub use model::{load_hf_model, CausalLm, ModelConfig};
pub use optim::LrSchedule;
pub use options::TrainOptions;
pub use parallel::runtime::StepReport;
pub use parallelize::{ParallelOptions, Strategy, TrainerBuilder};
pub use pipeline::PipelineSchedule;
pub use train::Trainer;
