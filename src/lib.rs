//! tidemill: fine-tune open LLMs (Llama, Qwen2, Mixtral) with LoRA or full-parameter SFT,
//! data, tensor, pipeline and expert parallel.
//!
//! The crates, re-exported by room: [`trainer`] (models, LoRA, data, optimizer, and the
//! builder that assembles a trainer for any dp×tp×pp×ep layout), [`parallel`] (layouts,
//! meshes, communicators, the worker runtime, the strategy search), [`checkpoint`]
//! (safetensors, sharded checkpoints, PEFT files) and, with the default `cli` feature,
//! [`launcher`] (the `launch` CLI, its job files and event log). [`prelude`] has what a
//! training loop needs; `examples/` has loops of one process and of every layout.
//!
//! ```no_run
//! use tidemill::prelude::*;
//! # fn main() -> Result<(), tidemill::trainer::Error> {
//! let ctx = init()?; // the rank's place in a job `launch run` started (or a world of one)
//! let options = ParallelOptions { tp: 2, pp: 2, ..Default::default() };
//! let mesh = options.mesh(&ctx)?;
//! let model = load_hf_model::<CpuTrain>("model".as_ref(), true, &Default::default())?;
//! let (rows, _) = load_dataset("train.jsonl".as_ref(), None, &DataOptions::default())?;
//! let mut trainer = Trainer::builder(model, rows, &TrainOptions::default())
//!     .parallel(&mesh, &options)
//!     .build()?;
//! for _ in 0..10 {
//!     println!("loss {}", trainer.step()?.loss);
//! }
//! # Ok(()) }
//! ```

pub use checkpoint;
#[cfg(feature = "cli")]
pub use launcher;
pub use parallel;
pub use trainer;

/// What a custom training loop needs, in one `use`.
pub mod prelude {
    pub use parallel::{init, Layout, Mesh, RankContext};
    pub use trainer::backend::{Cpu, CpuTrain};
    #[cfg(feature = "cuda")]
    pub use trainer::backend::{Cuda, CudaTrain};
    pub use trainer::data::{load_dataset, needs_tokenizer, TextTokenizer};
    pub use trainer::lora::{self, LoraSpec};
    pub use trainer::{
        load_hf_model, CausalLm, DataOptions, EvalResult, LrSchedule, ParallelOptions,
        PipelineSchedule, StepReport, Strategy, TrainOptions, Trainer, TrainerBuilder,
    };
}
