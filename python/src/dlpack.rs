//! Tensors across the boundary: the consumer side of DLPack (`__dlpack__`,
//! `__dlpack_device__`), so torch, CuPy, JAX and NumPy arrays all work and none of them is a
//! build dependency.
//!
//! A [`Tensor`] keeps the capsule it was read from: the producer's memory stays alive (and its
//! deleter runs, through the capsule's destructor, once the tensor is dropped — after the launch
//! that reads it was queued, which is stream-ordered with the producer's allocator when it runs
//! on the producer's current stream).

use std::ffi::c_void;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};

use crate::errors::{argument_error, tensor_error};

/// DLPack's device types this module distinguishes.
pub const DL_CPU: i32 = 1;
/// A CUDA device pointer.
pub const DL_CUDA: i32 = 2;
/// Pinned host memory (readable from the host).
pub const DL_CUDA_HOST: i32 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// Element types a tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    /// float16
    F16,
    /// bfloat16
    Bf16,
    /// float32
    F32,
    /// int32
    I32,
    /// int64
    I64,
    /// uint8
    U8,
    /// float64 (only ever refused)
    F64,
    /// anything else: (code, bits, lanes)
    Other(u8, u8, u16),
}

impl Dt {
    fn of(t: DLDataType) -> Dt {
        match (t.code, t.bits, t.lanes) {
            (2, 16, 1) => Dt::F16,
            (4, 16, 1) => Dt::Bf16,
            (2, 32, 1) => Dt::F32,
            (0, 32, 1) => Dt::I32,
            (0, 64, 1) => Dt::I64,
            (1, 8, 1) => Dt::U8,
            (2, 64, 1) => Dt::F64,
            (c, b, l) => Dt::Other(c, b, l),
        }
    }

    /// The name torch and NumPy use.
    pub fn name(self) -> String {
        match self {
            Dt::F16 => "float16".into(),
            Dt::Bf16 => "bfloat16".into(),
            Dt::F32 => "float32".into(),
            Dt::I32 => "int32".into(),
            Dt::I64 => "int64".into(),
            Dt::U8 => "uint8".into(),
            Dt::F64 => "float64".into(),
            Dt::Other(c, b, l) => format!("DLPack type code {c}, {b} bits × {l} lanes"),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dt::F16 | Dt::Bf16 => 2,
            Dt::F32 | Dt::I32 => 4,
            Dt::I64 | Dt::F64 => 8,
            Dt::U8 => 1,
            Dt::Other(_, b, l) => (b as usize * l as usize).div_ceil(8),
        }
    }
}

/// A dtype as a Python user writes it: "float16", "bfloat16", "half", "bf16", or a torch/NumPy
/// dtype object (its `str` is e.g. `torch.float16`).
pub fn parse_dtype(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<attnforge::kv::DType> {
    use attnforge::kv::DType;
    let s = obj.str()?.to_string();
    let s = s.trim_start_matches("torch.").trim_start_matches("numpy.").trim_start_matches("<class 'numpy.").trim_end_matches("'>");
    match s {
        "float16" | "half" | "f16" | "fp16" => Ok(DType::F16),
        "bfloat16" | "bf16" => Ok(DType::Bf16),
        _ => Err(argument_error(obj.py(), &format!("{arg}: `{s}` is not a kernel dtype (float16 or bfloat16)"))),
    }
}

/// One tensor read through DLPack.
pub struct Tensor {
    /// The argument's name, for messages.
    pub arg: String,
    /// The first element's address (the producer's pointer plus its byte offset).
    pub data: u64,
    /// DLPack device type and ordinal.
    pub device: (i32, i32),
    /// The element type.
    pub dtype: Dt,
    /// The shape.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub strides: Vec<i64>,
    /// The DLPack capsule (or the torch tensor) the facts were read from, kept alive.
    _capsule: Py<PyAny>,
}

impl Tensor {
    /// Reads `obj` through `__dlpack__`. `stream` is the stream the consumer will use, passed to
    /// a CUDA producer so that it orders its pending work before it (DLPack's contract; `0`, the
    /// legacy default stream, is spelled 1 there).
    pub fn from_obj(arg: &str, obj: &Bound<'_, PyAny>, stream: Option<u64>) -> PyResult<Tensor> {
        if let Some(t) = Tensor::from_torch(arg, obj)? {
            return Ok(t);
        }
        let py = obj.py();
        if !obj.hasattr("__dlpack__")? || !obj.hasattr("__dlpack_device__")? {
            return Err(tensor_error(py, &format!("{arg}: a {} is not a tensor (it has no __dlpack__); pass a torch, CuPy, JAX or NumPy array", type_name(obj))));
        }
        let (device_type, _): (i32, i32) =
            obj.call_method0("__dlpack_device__")?.extract().map_err(|_| tensor_error(py, &format!("{arg}: __dlpack_device__ did not return (device_type, device_id)")))?;
        let capsule = if device_type == DL_CUDA {
            let kw = PyDict::new(py);
            if let Some(s) = stream {
                kw.set_item("stream", if s == 0 { 1 } else { s })?;
            }
            obj.call_method("__dlpack__", (), Some(&kw))
        } else {
            obj.call_method0("__dlpack__")
        }
        .map_err(|e| tensor_error(py, &format!("{arg}: its __dlpack__ failed: {e}")))?;
        // SAFETY: `capsule` is a live object; PyCapsule_GetPointer checks that it is a capsule
        // named "dltensor" (an unconsumed DLPack tensor) and returns null (with an error set)
        // otherwise.
        let raw = unsafe { pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), c"dltensor".as_ptr()) } as *const DLManagedTensor;
        if raw.is_null() {
            let _ = PyErr::take(py);
            return Err(tensor_error(py, &format!("{arg}: __dlpack__ did not return a \"dltensor\" capsule")));
        }
        // SAFETY: a "dltensor" capsule holds a DLManagedTensor that stays valid while the
        // capsule is alive and unconsumed; we only read it, and keep the capsule until `self` is
        // dropped. `shape` (and `strides`, unless null) hold `ndim` entries.
        let t = unsafe { &(*raw).dl_tensor };
        if t.ndim < 0 || t.ndim > 8 {
            return Err(tensor_error(py, &format!("{arg}: {} dimensions", t.ndim)));
        }
        let nd = t.ndim as usize;
        let shape_i: Vec<i64> = if nd == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(t.shape, nd) }.to_vec() };
        if shape_i.iter().any(|&d| d < 0) {
            return Err(tensor_error(py, &format!("{arg}: a negative extent in shape {shape_i:?}")));
        }
        let shape: Vec<usize> = shape_i.iter().map(|&d| d as usize).collect();
        let strides = if t.strides.is_null() || nd == 0 { compact_strides(&shape) } else { unsafe { std::slice::from_raw_parts(t.strides, nd) }.to_vec() };
        let data = (t.data as u64).checked_add(t.byte_offset).ok_or_else(|| tensor_error(py, &format!("{arg}: its byte offset overflows")))?;
        let (device, dtype) = ((t.device.device_type, t.device.device_id), Dt::of(t.dtype));
        Ok(Tensor { arg: arg.to_string(), data, device, dtype, shape, strides, _capsule: capsule.unbind() })
    }

    /// A torch tensor's metadata read from its attributes (`dtype`, `is_cuda`, `get_device`,
    /// `data_ptr`, `shape`, `stride`): the same facts DLPack gives, without building a capsule (in
    /// the serving loop on the H200, capsules for the four tensors of a `run` made our host launch
    /// time 3.5× FlashInfer's; BENCHMARKS.md). torch's `Tensor` type and dtypes are looked up once
    /// ([`TorchTypes`]) and then compared by identity, so a tensor costs six attribute reads.
    /// No stream handshake: the launch goes on the stream the caller named, by default torch's
    /// current one, which orders it after the tensors' producers. `None` for anything else, or a
    /// dtype or device this module does not name (DLPack reads those).
    fn from_torch(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<Option<Tensor>> {
        let py = obj.py();
        let Some(torch) = TorchTypes::get(obj)? else { return Ok(None) };
        if !obj.is_instance(torch.tensor.bind(py))? {
            return Ok(None);
        }
        let dt = obj.getattr(intern!(py, "dtype"))?;
        let Some(&(_, dtype)) = torch.dtypes.iter().find(|(d, _)| d.bind(py).is(&dt)) else { return Ok(None) };
        let device = if obj.getattr(intern!(py, "is_cuda"))?.extract::<bool>()? {
            (DL_CUDA, obj.call_method0(intern!(py, "get_device"))?.extract::<i32>()?)
        } else if obj.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
            (DL_CPU, 0)
        } else {
            return Ok(None);
        };
        let data: u64 = obj.call_method0(intern!(py, "data_ptr"))?.extract()?;
        let shape: Vec<usize> = obj.getattr(intern!(py, "shape"))?.extract()?;
        let strides: Vec<i64> = obj.call_method0(intern!(py, "stride"))?.extract()?;
        Ok(Some(Tensor { arg: arg.to_string(), data, device, dtype, shape, strides, _capsule: obj.clone().unbind() }))
    }

    /// Elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the elements are dense in row-major order (extents of 1 have any stride).
    pub fn is_contiguous(&self) -> bool {
        let want = compact_strides(&self.shape);
        self.shape.iter().zip(self.strides.iter().zip(&want)).all(|(&d, (&s, &w))| d <= 1 || s == w)
    }

    /// Errors unless the elements are dense in row-major order.
    pub fn contiguous(&self, py: Python<'_>) -> PyResult<()> {
        if self.is_contiguous() {
            Ok(())
        } else {
            Err(tensor_error(py, &format!("{}: not contiguous (shape {:?}, strides {:?} in elements); pass .contiguous()", self.arg, self.shape, self.strides)))
        }
    }

    /// Errors unless the tensor lives on CUDA device `ordinal`.
    pub fn on_cuda(&self, py: Python<'_>, ordinal: usize) -> PyResult<()> {
        match self.device {
            (DL_CUDA, d) if d as usize == ordinal => Ok(()),
            (DL_CUDA, d) => Err(tensor_error(py, &format!("{}: on cuda:{d}, but the wrapper runs on cuda:{ordinal}", self.arg))),
            (t, _) => Err(tensor_error(py, &format!("{}: in {} memory; the kernels need a CUDA tensor on cuda:{ordinal}", self.arg, device_name(t)))),
        }
    }

    /// Errors unless the host can read the tensor.
    pub fn on_host(&self, py: Python<'_>) -> PyResult<()> {
        match self.device.0 {
            DL_CPU | DL_CUDA_HOST => Ok(()),
            t => Err(tensor_error(py, &format!("{}: in {} memory; this needs a host (CPU) array", self.arg, device_name(t)))),
        }
    }

    /// Errors unless the dtype is one of `want`.
    pub fn dtype_in(&self, py: Python<'_>, want: &[Dt]) -> PyResult<Dt> {
        if want.contains(&self.dtype) {
            Ok(self.dtype)
        } else {
            let names: Vec<String> = want.iter().map(|d| d.name()).collect();
            Err(tensor_error(py, &format!("{}: dtype {}, expected {}", self.arg, self.dtype.name(), names.join(" or "))))
        }
    }

    /// Errors unless the shape is `want` (`None` entries match any extent).
    pub fn shape_is(&self, py: Python<'_>, want: &[Option<usize>], what: &str) -> PyResult<()> {
        let ok = self.shape.len() == want.len() && self.shape.iter().zip(want).all(|(&d, w)| w.is_none_or(|w| w == d));
        if ok {
            Ok(())
        } else {
            let w: Vec<String> = want.iter().map(|w| w.map_or("*".to_string(), |w| w.to_string())).collect();
            Err(tensor_error(py, &format!("{}: shape {:?}, expected ({}) {what}", self.arg, self.shape, w.join(", "))))
        }
    }

    /// The elements as a host slice (a contiguous host tensor of `T`'s size).
    ///
    /// # Safety
    /// `T` must be the tensor's element type.
    pub unsafe fn host_slice<T>(&self) -> &[T] {
        if self.numel() == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.data as *const T, self.numel())
    }
}

/// torch's `Tensor` type and the dtypes this module names, looked up once the first torch
/// object is seen (torch is never imported for a caller that does not use it).
struct TorchTypes {
    tensor: Py<PyType>,
    dtypes: Vec<(Py<PyAny>, Dt)>,
}

impl TorchTypes {
    /// The types, or `None` while no torch object has been seen and `obj` is not one.
    fn get<'a>(obj: &Bound<'a, PyAny>) -> PyResult<Option<&'a TorchTypes>> {
        static TORCH: PyOnceLock<TorchTypes> = PyOnceLock::new();
        let py = obj.py();
        if let Some(t) = TORCH.get(py) {
            return Ok(Some(t));
        }
        let module = obj.get_type().module().ok().map(|m| m.to_string());
        if !module.as_deref().is_some_and(|m| m == "torch" || m.starts_with("torch.")) {
            return Ok(None);
        }
        let torch = py.import("torch")?;
        let mut dtypes = Vec::new();
        for (name, dt) in [("float16", Dt::F16), ("bfloat16", Dt::Bf16), ("float32", Dt::F32), ("float64", Dt::F64), ("int32", Dt::I32), ("int64", Dt::I64), ("uint8", Dt::U8)] {
            dtypes.push((torch.getattr(name)?.unbind(), dt));
        }
        let tensor = torch.getattr("Tensor")?.cast_into::<PyType>()?.unbind();
        Ok(Some(TORCH.get_or_init(py, || TorchTypes { tensor, dtypes })))
    }
}

/// Row-major strides of `shape`, in elements.
pub fn compact_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].saturating_mul(shape[i + 1].max(1) as i64);
    }
    s
}

fn device_name(t: i32) -> String {
    match t {
        DL_CPU => "CPU".into(),
        DL_CUDA => "CUDA".into(),
        DL_CUDA_HOST => "pinned host".into(),
        4 => "OpenCL".into(),
        7 => "Vulkan".into(),
        8 => "Metal".into(),
        10 => "ROCm".into(),
        13 => "CUDA managed".into(),
        t => format!("DLPack device type {t}"),
    }
}

/// The Python type's name of `obj`.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into())
}

/// A host index array as i32: a list or tuple of ints, or a host tensor (NumPy, a CPU torch
/// tensor) of int32 or int64, 1-D. A CUDA tensor is refused: reading it would synchronise.
pub fn host_ints(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i32>> {
    let py = obj.py();
    let too_big = |x: i64| argument_error(py, &format!("{arg}: {x} does not fit the kernels' int32 indices"));
    let on_host = |dt: i32| {
        if dt == DL_CPU || dt == DL_CUDA_HOST {
            return Ok(());
        }
        Err(argument_error(
            py,
            &format!("{arg}: in {} memory; plan takes host index arrays (lists, NumPy arrays or CPU tensors: a device array would need a device-to-host sync), e.g. .cpu()", device_name(dt)),
        ))
    };
    let tensor = if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        None
    } else if let Some(t) = Tensor::from_torch(arg, obj)? {
        on_host(t.device.0)?;
        Some(t)
    } else if obj.hasattr("__dlpack__")? {
        // Asked before __dlpack__: exporting a device array could synchronise.
        if let Ok((dt, _)) = obj.call_method0("__dlpack_device__").and_then(|d| d.extract::<(i32, i32)>()) {
            on_host(dt)?;
        }
        Tensor::from_obj(arg, obj, None).ok()
    } else {
        None
    };
    if let Some(t) = tensor {
        if t.shape.len() != 1 {
            return Err(argument_error(py, &format!("{arg}: shape {:?}; an index array is 1-D", t.shape)));
        }
        let n = t.shape[0];
        let at = |i: usize| t.data as i64 + t.strides[0] * i as i64 * t.dtype.size() as i64;
        // SAFETY: a host tensor's elements at `data + i * stride` for i < n, of its dtype.
        return match t.dtype {
            Dt::I32 => Ok((0..n).map(|i| unsafe { *(at(i) as *const i32) }).collect()),
            Dt::I64 => (0..n).map(|i| unsafe { *(at(i) as *const i64) }).map(|x| i32::try_from(x).map_err(|_| too_big(x))).collect(),
            d => Err(argument_error(py, &format!("{arg}: dtype {}; index arrays are int32 or int64", d.name()))),
        };
    }
    let not_an_array = || argument_error(py, &format!("{arg}: a {} is not an index array (a list of ints, a NumPy array or a CPU tensor)", type_name(obj)));
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(not_an_array());
    }
    let items: Vec<Bound<'_, PyAny>> = obj.try_iter().map_err(|_| not_an_array())?.collect::<PyResult<_>>()?;
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let v: i64 = x.extract().map_err(|_| argument_error(py, &format!("{arg}[{i}]: a {} is not an integer", type_name(x))))?;
            i32::try_from(v).map_err(|_| too_big(v))
        })
        .collect()
}
