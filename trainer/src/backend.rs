//! The compute backends tidemill trains on, as burn types: the CPU (burn's pure-Rust
//! Flex) always, CUDA with the `cuda` feature; `*Train` is the autodiff form a
//! [`crate::Trainer`] runs on.

/// burn's Flex backend (pure Rust, SIMD and threads).
pub type Cpu = burn::backend::Flex;
/// [`Cpu`] with autodiff, for training.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;

/// burn-cuda (kernels compiled with NVRTC at run time).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;
/// [`Cuda`] with autodiff, for training.
#[cfg(feature = "cuda")]
pub type CudaTrain = burn::backend::Autodiff<Cuda>;
