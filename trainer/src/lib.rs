//! The trainer room of tidemill: model families and their Hugging Face name maps, LoRA,
//! tokenizer and chat templates, SFT datasets with packing and loss masks, AdamW and
//! schedules, and the training loop.
//!
//! ```no_run
//! # use tidemill_trainer as trainer;
//! use burn::backend::{Autodiff, Flex};
//! use trainer::{data, lora, model, train};
//! # fn main() -> Result<(), trainer::Error> {
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let dir = std::path::Path::new("models/tiny");
//! let base = model::load_hf_model::<B>(dir, false, &device)?;
//! let spec = lora::LoraSpec { r: 8, alpha: 16.0, dropout: 0.0, targets: vec!["q_proj".into(), "v_proj".into()], use_rslora: false };
//! let model = lora::add_lora(base, &spec, 42)?;
//! let tokenizer = data::TextTokenizer::load(dir)?;
//! let opts = data::DataOptions { max_seq_len: 512, packing: true, train_on_prompt: false, allow_empty_samples: false };
//! let (rows, audit) = data::load_dataset("train.jsonl".as_ref(), Some(&tokenizer), &opts)?;
//! println!("{audit}");
//! # Ok(()) }
//! ```

pub mod collective;
pub mod data;
mod error;
pub mod export;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod state;
pub mod train;

pub use collective::{Collective, TrainBackend};
pub use error::{Error, Result};
pub use lora::LoraSpec;
pub use model::{load_hf_model, CausalLm, ModelConfig};
pub use optim::{AdamWOptions, Schedule, ScheduleKind};
pub use train::{evaluate, evaluate_trained, EvalResult, StepStats, TrainOptions, Trainer};
