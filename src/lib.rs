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
//! `examples/parallel_custom.rs` is a training loop for any layout in about 100 lines;
//! the builder's own example is in [`trainer`].

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
