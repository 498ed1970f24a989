//! The integration tests, in one binary (each test binary links all of burn; CI time is a
//! budget); the timed fault tests are the only other (`tests/faults`). Fixtures and
//! helpers shared by every module are in `common`.

mod common;

mod bad_inputs;
mod bf16;
mod checkpoint;
mod cli;
mod convert;
#[cfg(feature = "wgpu")]
mod cubecl;
mod deploy;
mod examples;
mod golden;
mod launch;
mod mesh;
mod packing_accumulation;
mod peft_roundtrip;
mod plan;
mod training_golden;
