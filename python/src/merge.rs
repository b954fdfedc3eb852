//! `_merge_states`: the engine's public state merge (`Engine::merge_states_raw`) on DLPack
//! tensors of any strides (the head dim contiguous), on the caller's stream.

use attnforge::abi::StateMergeArgs;
use attnforge::kv::DType;
use pyo3::prelude::*;

use crate::dlpack::{Dt, Tensor};
use crate::errors::{guard, tensor_error, OrRaise};
use crate::wrappers::{engine, stream_of};

fn read(arg: &str, obj: &Bound<'_, PyAny>, stream: u64) -> PyResult<Tensor> {
    Tensor::from_obj(arg, obj, Some(stream))
}

/// Errors unless the last dim is contiguous (stride 1, or an extent of 1).
fn inner_dense(py: Python<'_>, t: &Tensor) -> PyResult<()> {
    match (t.shape.last(), t.strides.last()) {
        (Some(&d), Some(&s)) if d > 1 && s != 1 => Err(tensor_error(py, &format!("{}: the last dim has stride {s}; it must be contiguous (pass .contiguous())", t.arg))),
        _ => Ok(()),
    }
}

/// A state's `(v, s)` on `device`: `v` of `dt` `(tokens, heads, dim)` with a contiguous last dim,
/// `s` float32 `(tokens, heads)`; `like` ends the shape messages.
#[allow(clippy::too_many_arguments)]
fn pair_of(py: Python<'_>, v: (&str, &Bound<'_, PyAny>), s: (&str, &Bound<'_, PyAny>), stream: u64, device: usize, dt: Dt, (tokens, heads, dim): (usize, usize, usize), like: &str) -> PyResult<(Tensor, Tensor)> {
    let vt = read(v.0, v.1, stream)?;
    let st = read(s.0, s.1, stream)?;
    for (t, want) in [(&vt, dt), (&st, Dt::F32)] {
        t.on_cuda(py, device)?;
        t.dtype_in(py, &[want])?;
    }
    vt.shape_is(py, &[Some(tokens), Some(heads), Some(dim)], &format!("(tokens, heads, head_dim){like}"))?;
    st.shape_is(py, &[Some(tokens), Some(heads)], &format!("(tokens, heads){like}"))?;
    inner_dense(py, &vt)?;
    Ok((vt, st))
}

/// Merges attention states. With `v_other` None: `v` `(tokens, n, heads, dim)`, `s`
/// `(tokens, n, heads)` merged over `n`; else `v`/`v_other` `(tokens, heads, dim)` and `s`/`s_other`
/// `(tokens, heads)`, the pair merged (`out_v`/`out_s` may be `v`/`s`: the in-place merge), and
/// `mask` (bool or uint8, `(tokens,)`) leaves the tokens whose entry is 0 as they are. Outputs:
/// `out_v` `(tokens, heads, dim)` of `v`'s dtype, `out_s` `(tokens, heads)` float32.
#[pyfunction]
#[pyo3(signature = (v, s, v_other, s_other, mask, out_v, out_s, stream))]
#[allow(clippy::too_many_arguments)]
pub fn _merge_states(
    py: Python<'_>,
    v: &Bound<'_, PyAny>,
    s: &Bound<'_, PyAny>,
    v_other: Option<&Bound<'_, PyAny>>,
    s_other: Option<&Bound<'_, PyAny>>,
    mask: Option<&Bound<'_, PyAny>>,
    out_v: &Bound<'_, PyAny>,
    out_s: &Bound<'_, PyAny>,
    stream: u64,
) -> PyResult<()> {
    guard(py, || {
        let pair = v_other.is_some();
        let (vn, sn) = if pair { ("v_a", "s_a") } else { ("v", "s") };
        let vt = read(vn, v, stream)?;
        let st = read(sn, s, stream)?;
        let device = match vt.device {
            (crate::dlpack::DL_CUDA, d) => d as usize,
            _ => return Err(tensor_error(py, &format!("{vn}: not a CUDA tensor (the device merge needs one; host arrays are merged by the array library)"))),
        };
        let dt = vt.dtype_in(py, &[Dt::F16, Dt::Bf16, Dt::F32])?;
        let dtype = match dt {
            Dt::F16 => DType::F16,
            Dt::Bf16 => DType::Bf16,
            _ => DType::F32,
        };
        st.dtype_in(py, &[Dt::F32])?;
        st.on_cuda(py, device)?;
        inner_dense(py, &vt)?;
        let (tokens, n, heads, dim) = if pair {
            vt.shape_is(py, &[None, None, None], "(tokens, heads, head_dim)")?;
            (vt.shape[0], 2, vt.shape[1], vt.shape[2])
        } else {
            vt.shape_is(py, &[None, None, None, None], "(tokens, num_states, heads, head_dim)")?;
            (vt.shape[0], vt.shape[1], vt.shape[2], vt.shape[3])
        };
        let mut a = StateMergeArgs { tokens: tokens as i64, heads: heads as i64, states: i32::try_from(n).map_err(|_| tensor_error(py, &format!("{vn}: {n} states; at most 2^31 - 1")))?, head_dim: dim as i32, ..Default::default() };
        if pair {
            st.shape_is(py, &[Some(tokens), Some(heads)], "(tokens, heads)")?;
            (a.v0, a.v0_tok, a.v0_head) = (vt.data, vt.strides[0], vt.strides[1]);
            (a.s0, a.s0_tok, a.s0_head) = (st.data, st.strides[0], st.strides[1]);
            let (Some(vo), Some(so)) = (v_other, s_other) else { unreachable!("pair") };
            let (vo, so) = pair_of(py, ("v_b", vo), ("s_b", so), stream, device, dt, (tokens, heads, dim), " as v_a")?;
            (a.v1, a.v1_tok, a.v1_head) = (vo.data, vo.strides[0], vo.strides[1]);
            (a.s1, a.s1_tok, a.s1_head) = (so.data, so.strides[0], so.strides[1]);
        } else {
            st.shape_is(py, &[Some(tokens), Some(n), Some(heads)], "(tokens, num_states, heads)")?;
            (a.v0, a.v0_tok, a.v0_state, a.v0_head) = (vt.data, vt.strides[0], vt.strides[1], vt.strides[2]);
            (a.s0, a.s0_tok, a.s0_state, a.s0_head) = (st.data, st.strides[0], st.strides[1], st.strides[2]);
        }
        let (ov, os) = pair_of(py, ("out_v", out_v), ("out_s", out_s), stream, device, dt, (tokens, heads, dim), "")?;
        (a.vo, a.vo_tok, a.vo_head) = (ov.data, ov.strides[0], ov.strides[1]);
        (a.so, a.so_tok, a.so_head) = (os.data, os.strides[0], os.strides[1]);
        // An output that is an input must be that input exactly (the in-place merge); partial
        // overlaps are not checked beyond this.
        if (a.vo == a.v0 && (a.vo_tok, a.vo_head) != (a.v0_tok, a.v0_head)) || (a.so == a.s0 && (a.so_tok, a.so_head) != (a.s0_tok, a.s0_head)) {
            return Err(tensor_error(py, "out_v/out_s: the same memory as the input with other strides"));
        }
        if let Some(m) = mask {
            let mt = read("mask", m, stream)?;
            mt.on_cuda(py, device)?;
            if !matches!(mt.dtype, Dt::U8 | Dt::Other(6, 8, 1)) {
                return Err(tensor_error(py, &format!("mask: dtype {}, expected bool or uint8", mt.dtype.name())));
            }
            mt.shape_is(py, &[Some(tokens)], "(tokens,)")?;
            mt.contiguous(py)?;
            a.mask = mt.data;
        }
        let e = engine(py, device)?;
        let s = stream_of(e, stream);
        // SAFETY: every pointer is a live CUDA tensor on `device` (DLPack, held by the caller for
        // the call) whose shape and strides were read from it and checked to agree; the kernel
        // reaches only the elements those strides give; outputs equal to inputs share strides.
        unsafe { e.merge_states_raw(&s, dtype, &a) }.or_raise(py)
    })
}
