//! The paged K/V cache as FlashInfer's wrappers take it, read through DLPack:
//!
//! - one tensor `[num_pages, 2, page_size, kv_heads, head_dim]` (NHD; HND swaps `page_size` and
//!   `kv_heads`): K and V interleaved per page;
//! - a pair `(k, v)` of `[num_pages, page_size, kv_heads, head_dim]` tensors (HND likewise), each
//!   contiguous; or the two halves of one interleaved tensor (`kv[:, 0]`, `kv[:, 1]`);
//! - for the ragged wrapper, a pair `(k, v)` of `[tokens, kv_heads, head_dim]` tensors: a cache
//!   of pages of one token.

use attnforge::kv::{KvLayout, KvShape};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::dlpack::{type_name, Dt, Tensor};
use crate::errors::tensor_error;

/// A cache as the engine sees it: its geometry and its K and V buffers.
pub struct Kv {
    /// The tensors read (kept alive while the buffers are used).
    pub tensors: Vec<Tensor>,
    /// The cache's geometry as the engine takes it (the layout is the one `parse` was given).
    pub shape: KvShape,
    /// Element type.
    pub dtype: Dt,
    /// Where the K buffer starts (the shared buffer when interleaved).
    pub k_ptr: u64,
    /// Where the V buffer starts (the shared buffer when interleaved).
    pub v_ptr: u64,
    /// Elements of the K buffer.
    pub k_len: usize,
    /// Elements of the V buffer.
    pub v_len: usize,
}

impl Kv {
    /// Errors unless every tensor is host memory.
    pub fn on_host(&self, py: Python<'_>) -> PyResult<()> {
        self.tensors.iter().try_for_each(|t| t.on_host(py))
    }

    /// Errors unless every tensor is on CUDA device `ordinal`.
    pub fn on_cuda(&self, py: Python<'_>, ordinal: usize) -> PyResult<()> {
        self.tensors.iter().try_for_each(|t| t.on_cuda(py, ordinal))
    }
}

const ARG: &str = "paged_kv_cache";

/// (pages, page_size, heads, dim) of a 4-D page tensor in `layout`.
fn page_dims(t: &Tensor, layout: KvLayout) -> (usize, usize, usize, usize) {
    let s = &t.shape;
    match layout {
        KvLayout::Nhd => (s[0], s[1], s[2], s[3]),
        KvLayout::Hnd => (s[0], s[2], s[1], s[3]),
    }
}

/// Reads a cache in one of the forms of the module docs. `ragged`: the ragged wrapper's
/// `(k, v)` of `[tokens, kv_heads, head_dim]`.
pub fn parse(py: Python<'_>, obj: &Bound<'_, PyAny>, layout: KvLayout, stream: Option<u64>, ragged: bool) -> PyResult<Kv> {
    let shape = |interleaved, num_pages, page_size, kv_heads, head_dim_qk, head_dim_vo| KvShape { layout, interleaved, num_pages, page_size, kv_heads, head_dim_qk, head_dim_vo };
    let err = |m: String| tensor_error(py, &m);
    let pair = obj.is_instance_of::<PyTuple>() || obj.is_instance_of::<PyList>();
    if ragged || pair {
        let items: Vec<Bound<'_, PyAny>> = obj.try_iter()?.collect::<PyResult<_>>()?;
        if items.len() != 2 {
            return Err(err(format!("{ARG}: a {} of {} items; a pair is (k, v)", type_name(obj), items.len())));
        }
        let (kn, vn) = if ragged { ("k", "v") } else { ("paged_kv_cache[0] (k)", "paged_kv_cache[1] (v)") };
        let k = Tensor::from_obj(kn, &items[0], stream)?;
        let v = Tensor::from_obj(vn, &items[1], stream)?;
        if k.dtype != v.dtype {
            return Err(err(format!("{ARG}: k is {} but v is {}", k.dtype.name(), v.dtype.name())));
        }
        if k.device != v.device {
            return Err(err(format!("{ARG}: k and v are on different devices ({:?}, {:?})", k.device, v.device)));
        }
        let nd = if ragged { 3 } else { 4 };
        for t in [&k, &v] {
            if t.shape.len() != nd {
                let want = match (ragged, layout) {
                    (true, _) => "(tokens, num_kv_heads, head_dim)",
                    (false, KvLayout::Nhd) => "(num_pages, page_size, num_kv_heads, head_dim) for NHD",
                    (false, KvLayout::Hnd) => "(num_pages, num_kv_heads, page_size, head_dim) for HND",
                };
                return Err(err(format!("{}: shape {:?}, expected {want}", t.arg, t.shape)));
            }
        }
        let ((pk, sk, hk, dk), (pv, sv, hv, dv)) =
            if ragged { ((k.shape[0], 1, k.shape[1], k.shape[2]), (v.shape[0], 1, v.shape[1], v.shape[2])) } else { (page_dims(&k, layout), page_dims(&v, layout)) };
        if (pk, sk, hk) != (pv, sv, hv) {
            return Err(err(format!("{ARG}: k has shape {:?} but v has {:?}; they differ beyond the head dim", k.shape, v.shape)));
        }
        let esize = k.dtype.size() as u64;
        if k.is_contiguous() && v.is_contiguous() {
            let (dtype, k_ptr, v_ptr, k_len, v_len) = (k.dtype, k.data, v.data, k.numel(), v.numel());
            return Ok(Kv { tensors: vec![k, v], shape: shape(false, pk, sk, hk, dk, dv), dtype, k_ptr, v_ptr, k_len, v_len });
        }
        // The two halves of one [pages, 2, …] tensor: page stride twice a page, V one page
        // after K, each page dense.
        let page = (sk * hk * dk) as i64;
        let inner_dense = |t: &Tensor| {
            let c = crate::dlpack::compact_strides(&t.shape);
            t.shape.iter().zip(t.strides.iter().zip(&c)).skip(1).all(|(&d, (&s, &w))| d <= 1 || s == w)
        };
        let halves = !ragged
            && dk == dv
            && k.shape == v.shape
            && inner_dense(&k)
            && inner_dense(&v)
            && (pk <= 1 || (k.strides[0] == 2 * page && v.strides[0] == 2 * page))
            && v.data == k.data + page as u64 * esize;
        if !halves {
            let bad = if k.is_contiguous() { &v } else { &k };
            return Err(err(format!(
                "{}: not contiguous (shape {:?}, strides {:?} in elements); k and v must each be contiguous, or be the two halves of one [num_pages, 2, …] tensor",
                bad.arg, bad.shape, bad.strides
            )));
        }
        let len = pk * 2 * page as usize;
        let (dtype, k_ptr) = (k.dtype, k.data);
        return Ok(Kv { tensors: vec![k, v], shape: shape(true, pk, sk, hk, dk, dv), dtype, k_ptr, v_ptr: k_ptr, k_len: len, v_len: len });
    }
    let t = Tensor::from_obj(ARG, obj, stream)?;
    if t.shape.len() != 5 || t.shape[1] != 2 {
        let want = match layout {
            KvLayout::Nhd => "(num_pages, 2, page_size, num_kv_heads, head_dim) for NHD",
            KvLayout::Hnd => "(num_pages, 2, num_kv_heads, page_size, head_dim) for HND",
        };
        return Err(err(format!("{ARG}: shape {:?}, expected {want}, or a pair (k, v)", t.shape)));
    }
    t.contiguous(py)?;
    let s = &t.shape;
    let (p, ps, h, d) = match layout {
        KvLayout::Nhd => (s[0], s[2], s[3], s[4]),
        KvLayout::Hnd => (s[0], s[3], s[2], s[4]),
    };
    let (dtype, ptr, len) = (t.dtype, t.data, t.numel());
    Ok(Kv { tensors: vec![t], shape: shape(true, p, ps, h, d, d), dtype, k_ptr: ptr, v_ptr: ptr, k_len: len, v_len: len })
}
