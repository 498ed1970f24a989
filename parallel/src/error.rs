//! Errors of the parallel runtime.

/// What the parallel runtime can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A feature (e.g. "cuda") this build was compiled without.
    #[error("this build of tidemill was compiled without the `{0}` feature")]
    NotCompiledWith(&'static str),
}
