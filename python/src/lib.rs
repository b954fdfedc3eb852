//! `attnforge._attnforge`: the Rust half of the Python package. The Python half
//! (`python/attnforge/__init__.py`) holds the FlashInfer-shaped classes, finds the caller's
//! stream and allocates outputs; this half reads tensors through DLPack, checks them, and drives
//! the engine's two-call wrappers.
//!
//! Every entry point runs inside [`errors::guard`]: engine errors become `attnforge.*Error`
//! exceptions and a panic becomes `attnforge.InternalError`, never an abort.

mod dlpack;
mod errors;
mod kvcache;
mod merge;
mod wrappers;

use std::collections::HashMap;
use std::sync::Arc;

use attnforge::engine::{Decode, Family, Prefill};
use attnforge::jit::{Arch, Jit, KernelConfig};
use attnforge::kv::{Batch, DType, KvLayout, PageTable};
use attnforge::spec::params::{Dims, ParamInput, ParamValues};
use attnforge::spec::typed::ParamTy;
use half::{bf16, f16};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};

use crate::dlpack::{host_ints, Dt, Tensor};
use crate::errors::{argument_error, guard, OrRaise};

/// A parsed, type-checked attention variant (a spec).
#[pyclass(module = "attnforge._attnforge", name = "Variant", frozen)]
pub struct PyVariant {
    pub(crate) inner: Arc<attnforge::spec::Variant>,
}

#[pymethods]
impl PyVariant {
    /// Loads a spec file.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: std::path::PathBuf) -> PyResult<PyVariant> {
        guard(py, || {
            let text = std::fs::read_to_string(&path).map_err(|source| attnforge::Error::Io { path: path.clone(), source }).or_raise(py)?;
            let v = attnforge::spec::load(&path.display().to_string(), &text).map_err(attnforge::Error::from).or_raise(py)?;
            Ok(PyVariant { inner: Arc::new(v) })
        })
    }

    /// Parses a spec from JSON text; `file` names it in error messages.
    #[staticmethod]
    #[pyo3(signature = (text, file = "<string>"))]
    fn from_json(py: Python<'_>, text: &str, file: &str) -> PyResult<PyVariant> {
        guard(py, || {
            let v = attnforge::spec::load(file, text).map_err(attnforge::Error::from).or_raise(py)?;
            Ok(PyVariant { inner: Arc::new(v) })
        })
    }

    /// The variant's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }

    /// The spec's description.
    #[getter]
    fn description(&self) -> String {
        self.inner.description.clone()
    }

    /// Where the spec came from (a path, `shipped:<name>` or the `file` given to `from_json`).
    #[getter]
    fn origin(&self) -> String {
        self.inner.origin.clone()
    }

    /// The parameter declarations: a list of dicts (name, type, default, range, description).
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .params
            .iter()
            .map(|p| {
                let d = PyDict::new(py);
                d.set_item("name", &p.name)?;
                d.set_item("type", param_ty(&p.ty))?;
                d.set_item("default", p.default)?;
                d.set_item("range", p.range)?;
                d.set_item("description", &p.description)?;
                Ok(d)
            })
            .collect()
    }

    /// The hooks' source text, by hook name.
    #[getter]
    fn hooks(&self) -> HashMap<String, String> {
        let v = &self.inner;
        let mut m = HashMap::new();
        m.insert("logits".to_string(), v.logits.source.clone());
        if let Some(h) = &v.mask {
            m.insert("mask".into(), h.source.clone());
        }
        if let Some(r) = &v.kv_range {
            if let Some(h) = &r.lo {
                m.insert("kv_range.lo".into(), h.source.clone());
            }
            if let Some(h) = &r.hi {
                m.insert("kv_range.hi".into(), h.source.clone());
            }
        }
        if let Some(h) = &v.sink {
            m.insert("sink".into(), h.source.clone());
        }
        m
    }

    fn __repr__(&self) -> String {
        format!("attnforge.Variant({:?} from {})", self.inner.name, self.inner.origin)
    }
}

fn param_ty(t: &ParamTy) -> String {
    format!("{t}")
}

/// A shipped variant by name, or a spec file by path.
#[pyfunction]
fn variant(py: Python<'_>, name: &str) -> PyResult<PyVariant> {
    guard(py, || Ok(PyVariant { inner: Arc::new(attnforge::spec::shipped::resolve(name).or_raise(py)?) }))
}

/// The names of the shipped variants.
#[pyfunction]
fn shipped_variants(py: Python<'_>) -> PyResult<Vec<String>> {
    guard(py, || Ok(attnforge::spec::shipped::all().map_err(attnforge::Error::from).or_raise(py)?.into_iter().map(|v| v.name).collect()))
}

/// Parses and checks spec text; returns the variant or raises `SpecError` with its position.
#[pyfunction]
#[pyo3(signature = (text, file = "<string>"))]
fn check_spec(py: Python<'_>, text: &str, file: &str) -> PyResult<PyVariant> {
    PyVariant::from_json(py, text, file)
}

/// User parameter values: a number, a sequence of numbers, or `{"bits": bytes, "offsets": [..]}`.
pub(crate) fn param_inputs(py: Python<'_>, params: Option<&Bound<'_, PyDict>>) -> PyResult<HashMap<String, ParamInput>> {
    let mut m = HashMap::new();
    let Some(params) = params else { return Ok(m) };
    for (k, v) in params.iter() {
        let name: String = k.extract().map_err(|_| argument_error(py, "params: keys are parameter names (str)"))?;
        let input = if let Ok(x) = v.extract::<f64>() {
            ParamInput::Scalar(x)
        } else if let Ok(d) = v.cast::<PyDict>() {
            let bits = d.get_item("bits")?.ok_or_else(|| argument_error(py, &format!("params[{name:?}]: a dict value is a bits matrix {{'bits': bytes, 'offsets': [...]}}")))?;
            let offsets = d.get_item("offsets")?.ok_or_else(|| argument_error(py, &format!("params[{name:?}]: a bits value needs 'offsets'")))?;
            let data: Vec<u8> = match bits.extract::<Vec<u8>>() {
                Ok(b) => b,
                Err(_) => bits.call_method0("tobytes").and_then(|b| b.extract()).map_err(|_| argument_error(py, &format!("params[{name:?}]['bits']: bytes or a uint8 array")))?,
            };
            let offsets: Vec<i64> = host_ints(&format!("params[{name:?}]['offsets']"), &offsets)?.into_iter().map(i64::from).collect();
            ParamInput::Bits(data, offsets)
        } else if let Ok(xs) = v.extract::<Vec<f64>>() {
            ParamInput::List(xs)
        } else if let Ok(xs) = v.call_method0("tolist").and_then(|l| l.extract::<Vec<f64>>()) {
            ParamInput::List(xs)
        } else {
            return Err(argument_error(py, &format!("params[{name:?}]: a {} is not a number, a list of numbers or a bits dict", dlpack::type_name(&v))));
        };
        m.insert(name, input);
    }
    Ok(m)
}

/// Binds parameter values against a variant for a batch's dimensions.
pub(crate) fn bind(py: Python<'_>, v: &attnforge::spec::Variant, params: Option<&Bound<'_, PyDict>>, dims: Dims) -> PyResult<ParamValues> {
    let given = param_inputs(py, params)?;
    v.bind(&given, dims).or_raise(py)
}

/// `(o bytes, o shape, lse bytes, lse shape)`: the reference's f32 outputs.
type RefOut<'py> = (Bound<'py, PyByteArray>, Vec<usize>, Bound<'py, PyByteArray>, Vec<usize>);

/// The CPU reference (f64 inside) on host tensors; returns `(o, lse)` as bytearrays of f32 with
/// their shapes (the Python side makes NumPy arrays of them).
#[pyfunction]
#[pyo3(signature = (variant, q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, last_page_len, params = None, sm_scale = None, kv_layout = "NHD"))]
#[allow(clippy::too_many_arguments)]
fn reference<'py>(
    py: Python<'py>,
    variant: &PyVariant,
    q: &Bound<'py, PyAny>,
    paged_kv_cache: &Bound<'py, PyAny>,
    qo_indptr: &Bound<'py, PyAny>,
    kv_indptr: &Bound<'py, PyAny>,
    kv_indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    params: Option<&Bound<'py, PyDict>>,
    sm_scale: Option<f32>,
    kv_layout: &str,
) -> PyResult<RefOut<'py>> {
    guard(py, || {
        let layout = parse_layout(py, kv_layout)?;
        let qo_indptr = host_ints("qo_indptr", qo_indptr)?;
        let pages = PageTable { indptr: host_ints("kv_indptr", kv_indptr)?, indices: host_ints("kv_indices", kv_indices)?, last_page_len: host_ints("last_page_len", last_page_len)? };
        let qt = Tensor::from_obj("q", q, None)?;
        qt.on_host(py)?;
        let dt = qt.dtype_in(py, &[Dt::F16, Dt::Bf16, Dt::F32])?;
        if qt.shape.len() != 3 {
            return Err(errors::tensor_error(py, &format!("q: shape {:?}, expected (total_q, num_qo_heads, head_dim_qk)", qt.shape)));
        }
        qt.contiguous(py)?;
        let kv = kvcache::parse(py, paged_kv_cache, layout, None, false)?;
        kv.on_host(py)?;
        if kv.dtype != dt {
            return Err(errors::tensor_error(py, &format!("paged_kv_cache: dtype {}, but q is {}", kv.dtype.name(), dt.name())));
        }
        if kv.shape.head_dim_qk != qt.shape[2] {
            return Err(errors::tensor_error(py, &format!("q: head_dim {} but the cache's keys have {}", qt.shape[2], kv.shape.head_dim_qk)));
        }
        let shape = kv.shape;
        let batch = Batch { qo_indptr: &qo_indptr, pages: &pages, kv: shape, qo_heads: qt.shape[1] };
        let valid = batch.validated().or_raise(py)?;
        if valid.total_q() != qt.shape[0] {
            return Err(errors::tensor_error(py, &format!("q: {} tokens, but qo_indptr ends at {}", qt.shape[0], valid.total_q())));
        }
        let dims = Dims { qo_heads: batch.qo_heads, kv_heads: shape.kv_heads, batch: batch.batch_size() };
        let values = bind(py, &variant.inner, params, dims)?;
        // SAFETY: host tensors of the checked dtype; the K/V spans are the cache's buffers as
        // `kvcache::parse` measured them (the same buffer twice when interleaved).
        let out = unsafe {
            match dt {
                Dt::F16 => run_reference::<f16>(&variant.inner, &values, &batch, &qt, &kv, sm_scale),
                Dt::Bf16 => run_reference::<bf16>(&variant.inner, &values, &batch, &qt, &kv, sm_scale),
                _ => run_reference::<f32>(&variant.inner, &values, &batch, &qt, &kv, sm_scale),
            }
        }
        .or_raise(py)?;
        let bytes = |xs: &[f32]| PyByteArray::new(py, &xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        let (t, h, dv) = (qt.shape[0], qt.shape[1], kv.shape.head_dim_vo);
        Ok((bytes(&out.o), vec![t, h, dv], bytes(&out.lse), vec![t, h]))
    })
}

/// # Safety
/// `q` and the cache's buffers are host memory of `T`.
unsafe fn run_reference<T: attnforge::kv::Element>(
    v: &attnforge::spec::Variant,
    params: &ParamValues,
    batch: &Batch<'_>,
    q: &Tensor,
    kv: &kvcache::Kv,
    sm_scale: Option<f32>,
) -> attnforge::Result<attnforge::reference::AttnOutput> {
    let qs = q.host_slice::<T>();
    let k = std::slice::from_raw_parts(kv.k_ptr as *const T, kv.k_len);
    let vv = std::slice::from_raw_parts(kv.v_ptr as *const T, kv.v_len);
    attnforge::reference::attention(v, params, batch, qs, k, vv, sm_scale)
}

pub(crate) fn parse_layout(py: Python<'_>, s: &str) -> PyResult<KvLayout> {
    match s {
        "NHD" | "nhd" => Ok(KvLayout::Nhd),
        "HND" | "hnd" => Ok(KvLayout::Hnd),
        _ => Err(argument_error(py, &format!("kv_layout: `{s}`, expected \"NHD\" or \"HND\""))),
    }
}

/// Compiles (or finds in the disk cache) every kernel a wrapper would load for this shape, ahead
/// of serving. Without `arch`, the arch of CUDA device `device`. Returns the kernels' names.
#[pyfunction]
#[pyo3(signature = (variant, op, head_dim, num_qo_heads, num_kv_heads, dtype = None, head_dim_vo = None, arch = None, device = 0))]
#[allow(clippy::too_many_arguments)]
fn compile(
    py: Python<'_>,
    variant: &PyVariant,
    op: &str,
    head_dim: usize,
    num_qo_heads: usize,
    num_kv_heads: usize,
    dtype: Option<&Bound<'_, PyAny>>,
    head_dim_vo: Option<usize>,
    arch: Option<&str>,
    device: usize,
) -> PyResult<Vec<String>> {
    guard(py, || {
        let dt = match dtype {
            Some(d) => dlpack::parse_dtype("dtype", d)?,
            None => DType::F16,
        };
        let group = wrappers::group(py, num_qo_heads, num_kv_heads)?;
        let dv = head_dim_vo.unwrap_or(head_dim);
        let (cfg, arch) = {
            let cfg = match op {
                "decode" => KernelConfig::decode(head_dim, dv, dt, group),
                "prefill" => KernelConfig::prefill(head_dim, dv, dt, group),
                _ => return Err(argument_error(py, &format!("op: `{op}`, expected \"decode\" or \"prefill\""))),
            }
            .or_raise(py)?;
            let arch = match arch {
                Some(a) => a.parse::<Arch>().map_err(|e| argument_error(py, &format!("arch: {e}")))?,
                None => attnforge::engine::device_arch(device).or_raise(py)?,
            };
            (cfg, arch)
        };
        let tiles = if cfg.op == attnforge::jit::Op::Decode { Decode::tiles(&cfg, &arch) } else { Prefill::tiles(&cfg, &arch) };
        let jit = Jit::new().or_raise(py)?;
        tiles.iter().map(|c| jit.get(&variant.inner, c, &arch).map(|k| k.name).or_raise(py)).collect()
    })
}

/// The package version (the crate's).
#[pymodule]
fn _attnforge(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyVariant>()?;
    m.add_class::<wrappers::DecodeCore>()?;
    m.add_class::<wrappers::PrefillCore>()?;
    m.add_function(wrap_pyfunction!(variant, m)?)?;
    m.add_function(wrap_pyfunction!(shipped_variants, m)?)?;
    m.add_function(wrap_pyfunction!(check_spec, m)?)?;
    m.add_function(wrap_pyfunction!(reference, m)?)?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(wrappers::gpu_available, m)?)?;
    m.add_function(wrap_pyfunction!(merge::_merge_states, m)?)?;
    Ok(())
}
