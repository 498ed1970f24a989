//! tidemill: fine-tune open LLMs (Llama, Qwen2, Mixtral) with LoRA or full-parameter SFT.
//!
//! The crates, re-exported by room: [`trainer`] (models, LoRA, data, optimizer, loop),
//! [`checkpoint`] (safetensors and PEFT files), [`parallel`] (parallel layouts),
//! [`launcher`] (the `launch` CLI). See `examples/custom_loop.rs` for a hand-written loop.

pub use checkpoint;
pub use launcher;
pub use parallel;
pub use trainer;
