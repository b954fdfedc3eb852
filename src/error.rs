//! The one error type of the library, with one kind per thing a program can act on.
//!
//! A serving stack reacts differently to "there is no GPU" (fall back, or refuse to start),
//! "NVRTC is missing" (install it), "this spec does not compile" (show the log), "this config is
//! not supported" (pick another) and "this batch is malformed" (a bug upstream): each is its own
//! variant, with the details as fields and `Display` for people. Messages are lowercase, carry no
//! trailing period, and name the offending value; the binary prints them as they are.

use std::fmt;
use std::path::PathBuf;

use crate::kv::LayoutError;
use crate::spec::SpecError;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A malformed variant spec (file, hook, column). Boxed: it carries the hook's text, and
    /// every `Result` of the library would otherwise be as large.
    #[error(transparent)]
    Spec(Box<SpecError>),
    /// A parameter value that does not fit its declaration, an unknown parameter, or a
    /// softmax scale that is not positive and finite.
    #[error("{0}")]
    Param(String),
    /// A malformed page table, ragged index array, shape or buffer length.
    #[error(transparent)]
    InvalidBatch(#[from] LayoutError),
    /// Neither a spec file nor a shipped variant has this name.
    #[error("no spec file `{name}` and no shipped variant of that name (shipped: {})", shipped.join(", "))]
    UnknownVariant {
        /// The name or path given.
        name: String,
        /// The shipped variants' names.
        shipped: Vec<&'static str>,
    },
    /// Rendering a template failed (a bug in attnforge), or a hand-built variant has names that
    /// may not reach the source.
    #[error("render: {0}")]
    Render(String),
    /// NVRTC (`libnvrtc.so`) could not be found or loaded.
    #[error("NVRTC (libnvrtc.so.13) not found: {detail}; install a CUDA toolkit and set CUDA_HOME, or `pip install --target .cuda nvidia-cuda-nvrtc==13.0.88` in the working directory, or put its directory on LD_LIBRARY_PATH")]
    NvrtcMissing {
        /// Where it was looked for, or why loading failed.
        detail: String,
    },
    /// The CUDA headers NVRTC needs (`cuda_fp16.h`, `cuda_bf16.h`) were not found.
    #[error("CUDA headers not found (cuda_fp16.h, cuda_bf16.h) under {}: set CUDA_HOME to a CUDA toolkit, or `pip install --target .cuda nvidia-cuda-runtime==13.0.88` in the working directory", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    CudaHeadersMissing {
        /// The include directories that were tried.
        searched: Vec<PathBuf>,
    },
    /// NVRTC rejected the rendered source.
    #[error(transparent)]
    CompileFailed(Box<CompileFailure>),
    /// An NVRTC call other than the compile itself failed.
    #[error("NVRTC: {call} failed: {detail}")]
    Nvrtc {
        /// The failing API call.
        call: &'static str,
        /// What it reported.
        detail: String,
    },
    /// The kernel cache could not be used.
    #[error(transparent)]
    Cache(#[from] attnforge_cache::CacheError),
    /// The planner cannot schedule the batch, or a plan does not fit its buffers.
    #[error("plan: {0}")]
    Plan(#[from] PlanError),
    /// There is no CUDA driver or no usable GPU.
    #[error("no GPU: {reason}")]
    NoGpu {
        /// Why (no driver library, no device, the device would not start).
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("cuda: {call}: {detail}")]
    Cuda {
        /// What was being done ("launch decode", "allocate").
        call: String,
        /// The driver's error.
        detail: String,
    },
    /// The request is valid, but this build or device cannot run it (a head dim, a dtype, a
    /// shared-memory size, a tile).
    #[error("unsupported: {0}")]
    UnsupportedConfig(String),
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Why a plan cannot be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The plan needs more workspace than the buffers give.
    #[error("the plan needs {needed} bytes of workspace, {given} were given")]
    WorkspaceTooSmall {
        /// Bytes the plan needs.
        needed: usize,
        /// Bytes given.
        given: usize,
    },
    /// A fixed grid too small for the batch.
    #[error("the batch needs {needed} work items but the fixed grid holds {max_ctas}; plan with a larger max_ctas")]
    FixedGridTooSmall {
        /// Work items the batch needs.
        needed: usize,
        /// CTAs of the fixed grid.
        max_ctas: usize,
    },
    /// A CUDA graph is being captured, and the plan is not a fixed-grid one.
    #[error("capturing a CUDA graph needs a FixedGrid plan (its grid and buffers stay fixed across steps)")]
    GraphNeedsFixedGrid,
    /// A fixed-grid plan that does not fit the buffers a graph captured.
    #[error("this fixed-grid plan does not fit the buffers a graph captured; plan with the same max_ctas and capacities")]
    CapturedBuffersTooSmall,
    /// The plan was not uploaded to the buffers it is run with.
    #[error("the plan was not uploaded to these buffers (upload_plan)")]
    NotUploaded,
    /// A plan mode's parameter is out of range, or the batch does not suit the op.
    #[error("{0}")]
    Invalid(String),
}

/// A failed NVRTC compile: the log, the rendered lines around each error with the spec hook
/// they came from, and where the source was saved.
#[derive(Debug, Clone)]
pub struct CompileFailure {
    /// The kernel's readable name.
    pub kernel: String,
    /// NVRTC's result code.
    pub code: String,
    /// NVRTC's log, as it printed it.
    pub log: String,
    /// The rendered lines around each line the log names.
    pub excerpts: Vec<SourceExcerpt>,
    /// Where the rendered source was saved, or why it could not be.
    pub saved: Result<PathBuf, String>,
}

/// Rendered lines around one line of a failed compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceExcerpt {
    /// The 1-based line the log names.
    pub line: usize,
    /// The spec hook emitted on that line, if any.
    pub hook: Option<String>,
    /// `(line number, text)` of the line and its neighbours.
    pub lines: Vec<(usize, String)>,
}

impl fmt::Display for CompileFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "NVRTC failed to compile {} ({}):", self.kernel, self.code)?;
        let mut excerpts = self.excerpts.iter().peekable();
        for l in self.log.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(f, "  {l}")?;
            // Each excerpt follows the first log line that names its line.
            if let Some(x) = excerpts.next_if(|x| log_line_number(l) == Some(x.line)) {
                if let Some(hook) = &x.hook {
                    writeln!(f, "  ^ in the code emitted for spec hook `{hook}`")?;
                }
                for (n, text) in &x.lines {
                    let mark = if *n == x.line { '>' } else { ' ' };
                    writeln!(f, "  {mark} {n:>5} | {text}")?;
                }
            }
        }
        match &self.saved {
            Ok(p) => write!(f, "  rendered source saved to {}", p.display()),
            Err(e) => write!(f, "  (could not save the rendered source: {e})"),
        }
    }
}

impl std::error::Error for CompileFailure {}

/// `name.cu(123): error: …` → 123.
pub(crate) fn log_line_number(log_line: &str) -> Option<usize> {
    let open = log_line.find(".cu(")? + 4;
    let close = log_line[open..].find(')')? + open;
    log_line[open..close].parse().ok()
}

/// The library's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Error {
        Error::Spec(Box::new(e))
    }
}
