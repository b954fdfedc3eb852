//! The one error type of the library, with one kind per pipeline stage.
//!
//! Messages are lowercase, carry no trailing period, and name the offending value; the binary
//! prints them as they are.

use crate::kv::LayoutError;
use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A malformed variant spec (file, hook, column). Boxed: it carries the hook's text, and
    /// every `Result` of the library would otherwise be as large.
    #[error(transparent)]
    Spec(Box<SpecError>),
    /// A parameter value that does not fit its declaration, or an unknown parameter.
    #[error("{0}")]
    Param(String),
    /// A malformed page table, ragged index array or buffer shape.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Rendering a template failed (a bug in attnforge, or a config it does not support).
    #[error("render: {0}")]
    Render(String),
    /// NVRTC rejected the rendered source, or could not be found.
    #[error("{0}")]
    Compile(String),
    /// The kernel cache could not be used.
    #[error(transparent)]
    Cache(#[from] attnforge_cache::CacheError),
    /// The planner cannot schedule the batch (workspace too small, graph mode misuse, …).
    #[error("plan: {0}")]
    Plan(String),
    /// A CUDA driver call failed, or there is no GPU.
    #[error("cuda: {0}")]
    Cuda(String),
    /// The request is valid but this build or device cannot run it.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Reading or writing a file.
    #[error("{0}")]
    Io(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Error {
        Error::Spec(Box::new(e))
    }
}
