//! Rust errors as Python exceptions. The classes live in `attnforge/errors.py` (so they can
//! derive from both `attnforge.Error` and the built-in they refine, e.g. `ValueError`); a Rust
//! error kind maps to one class, the message is the Rust message, and a spec error carries its
//! position as attributes.

use std::panic::{catch_unwind, AssertUnwindSafe};

use attnforge::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// An instance of `attnforge.errors.<class>` with `message`, as a `PyErr`.
fn raise(py: Python<'_>, class: &str, message: &str, attrs: &[(&str, Py<PyAny>)]) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let cls = py.import("attnforge.errors")?.getattr(class)?;
        let e = cls.call1((message,))?;
        for (k, v) in attrs {
            e.setattr(*k, v)?;
        }
        Ok(PyErr::from_value(e))
    })();
    made.unwrap_or_else(|e| PyRuntimeError::new_err(format!("{message} (and attnforge.errors.{class} could not be raised: {e})")))
}

/// `attnforge.TensorError`: a tensor of the wrong dtype, shape, device or strides.
pub fn tensor_error(py: Python<'_>, message: &str) -> PyErr {
    raise(py, "TensorError", message, &[])
}

/// `attnforge.ArgumentError`: any other bad argument.
pub fn argument_error(py: Python<'_>, message: &str) -> PyErr {
    raise(py, "ArgumentError", message, &[])
}

/// The exception of an engine error.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    let class = match &e {
        Error::Spec(s) => {
            let opt = |v: Option<usize>| v.map_or_else(|| py.None(), |v| v.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None()));
            let s = s.as_ref();
            let attrs = [
                ("file", s.file.clone().into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None())),
                ("line", opt(s.line)),
                ("hook", s.hook.clone().map_or_else(|| py.None(), |h| h.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None()))),
                ("column", opt(s.column)),
                ("detail", s.message.clone().into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None())),
            ];
            return raise(py, "SpecError", &msg, &attrs);
        }
        Error::Param(_) => "ParamError",
        Error::InvalidBatch(_) => "BatchError",
        Error::UnknownVariant { .. } => "UnknownVariantError",
        Error::Render(_) | Error::CompileFailed(_) | Error::Nvrtc { .. } => "CompileError",
        Error::NvrtcMissing { .. } | Error::CudaHeadersMissing { .. } => "NvrtcMissingError",
        Error::Cache(_) => "CacheError",
        Error::Plan(_) => "PlanError",
        Error::NoGpu { .. } => "NoGpuError",
        Error::Cuda { .. } => "CudaError",
        Error::UnsupportedConfig(_) => "UnsupportedError",
        Error::Io { .. } => "FileError",
        _ => "Error",
    };
    raise(py, class, &msg, &[])
}

/// Runs one entry point's body: an engine error becomes its exception, and a panic (a bug)
/// becomes `attnforge.InternalError` instead of crossing into Python.
pub fn guard<T>(py: Python<'_>, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".into());
            Err(raise(py, "InternalError", &format!("internal error in attnforge (please report): {what}"), &[]))
        }
    }
}

/// `?` for engine results inside an entry point.
pub trait OrRaise<T> {
    /// The engine error as its exception.
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> OrRaise<T> for attnforge::Result<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

impl<T> OrRaise<T> for Result<T, attnforge::kv::LayoutError> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, Error::InvalidBatch(e)))
    }
}
