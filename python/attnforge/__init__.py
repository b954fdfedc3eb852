"""attnforge: a JIT attention engine for LLM inference over a paged KV cache.

Variants (soft caps, sliding windows, ALiBi, sinks, ...) are JSON specs compiled with NVRTC at
first use and cached on disk. The wrappers have FlashInfer's shape -- ``plan()`` once per step on
host index arrays, ``run()`` once per layer on device tensors -- so a serving backend can switch
with a few lines. Tensors cross by DLPack: torch, CuPy and JAX arrays all work, and none of them
is a dependency. Kernels launch on the caller's current stream (torch's or CuPy's, or
``stream=``) in the device's primary context, the one torch uses.

Quick start::

    import torch, attnforge
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(kv_layout="NHD")
    w.plan(kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16,
           q_data_type=torch.bfloat16, variant="gemma2", params={"window": 4096})
    out = w.run(q, (k_cache, v_cache))

Differences from FlashInfer worth knowing: the LSE is the natural logarithm (FlashInfer's is
base 2); attnforge sizes its own workspace from each plan, so ``float_workspace_buffer`` is
accepted for signature compatibility and never written; FlashInfer's ``logits_soft_cap`` and
``window_left`` map to the shipped ``soft_cap`` / ``sliding_window`` / ``gemma2`` variants, and
anything they cannot express is an error, never ignored.
"""

import sys
import threading

from . import errors
from ._attnforge import Variant, __version__
from ._attnforge import check_spec as _check_spec
from ._attnforge import compile as _compile
from ._attnforge import gpu_available
from ._attnforge import _merge_states
from ._attnforge import reference as _reference
from ._attnforge import shipped_variants
from ._attnforge import variant as _variant
from ._attnforge import DecodeCore as _DecodeCore
from ._attnforge import PrefillCore as _PrefillCore
from .errors import (
    ArgumentError,
    BatchError,
    CacheError,
    CompileError,
    CudaError,
    Error,
    FileError,
    InternalError,
    NoGpuError,
    NvrtcMissingError,
    ParamError,
    PlanError,
    SpecError,
    TensorError,
    UnknownVariantError,
    UnsupportedError,
)

__all__ = [
    "Variant",
    "variant",
    "shipped_variants",
    "check_spec",
    "compile",
    "reference",
    "merge_state",
    "merge_state_in_place",
    "merge_state_into",
    "merge_states",
    "gpu_available",
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "errors",
    "Error",
    "SpecError",
    "ParamError",
    "BatchError",
    "ArgumentError",
    "TensorError",
    "UnknownVariantError",
    "CompileError",
    "NvrtcMissingError",
    "NoGpuError",
    "CudaError",
    "PlanError",
    "UnsupportedError",
    "CacheError",
    "FileError",
    "InternalError",
    "__version__",
]

_VARIANTS = {}
_VARIANTS_LOCK = threading.Lock()


def variant(name):
    """A shipped variant by name (``"causal"``, ``"gemma2"``, ...) or a spec file by path.

    The same name gives the same object, so wrappers reuse its compiled kernels."""
    with _VARIANTS_LOCK:
        v = _VARIANTS.get(name)
        if v is None:
            v = _VARIANTS[name] = _variant(name)
        return v


def check_spec(text, file="<string>"):
    """Parses and type-checks spec JSON; returns the :class:`Variant` or raises
    :class:`SpecError` with ``file``, ``line``, ``hook`` and ``column`` set."""
    return _check_spec(text, file)


def compile(variant, op, head_dim, num_qo_heads, num_kv_heads, dtype="float16", head_dim_vo=None, arch=None, device=0):
    """Compiles (or finds in the disk cache) every kernel a wrapper would load for this shape,
    ahead of serving. ``op`` is ``"decode"`` or ``"prefill"``; without ``arch`` (``"sm_90a"``),
    the arch of CUDA device ``device``. Returns the kernels' names."""
    return _compile(_as_variant(variant), op, head_dim, num_qo_heads, num_kv_heads, dtype, head_dim_vo, arch, device)


def reference(variant, q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, last_page_len, params=None, sm_scale=None, kv_layout="NHD"):
    """The CPU reference (f64 inside) on host arrays: ``q`` ``(total_q, num_qo_heads, head_dim)``
    and the cache in any form the wrappers take, float16/bfloat16/float32. Returns NumPy float32
    ``(o, lse)``: ``(total_q, num_qo_heads, head_dim_vo)`` and ``(total_q, num_qo_heads)``, the
    LSE in natural log (``-inf`` for a row with no visible key)."""
    import numpy as np

    o, o_shape, lse, lse_shape = _reference(_as_variant(variant), q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, last_page_len, params, sm_scale, kv_layout)
    return np.frombuffer(o, dtype=np.float32).reshape(o_shape), np.frombuffer(lse, dtype=np.float32).reshape(lse_shape)


def merge_state(v_a, s_a, v_b, s_b, stream=None):
    """Merges two attention states over disjoint key sets: ``v`` ``(tokens, heads, dim)``
    (float16, bfloat16 or float32) and its LSE ``s`` ``(tokens, heads)`` float32, natural log.
    Returns the new ``(v, s)``: ``s = log(e^s_a + e^s_b)``, ``v`` weighted by ``e^(s_side - s)``.
    A side with ``s = -inf`` (no visible key) contributes nothing and its ``v`` is not read; both:
    ``v = 0, s = -inf``; a NaN ``s`` makes the row NaN.

    CUDA tensors (torch, CuPy) are merged by attnforge's kernel on the current stream (any
    strides with a contiguous last dim); host arrays by the array library's own operations."""
    if _on_cuda(v_a):
        out_v, out_s = _empty(v_a, tuple(v_a.shape)), _empty(v_a, tuple(s_a.shape), float32=True)
        _merge_states(v_a, s_a, v_b, s_b, None, out_v, out_s, _current_stream(_cuda_ordinal(v_a), v_a, stream))
        return out_v, out_s
    return _merge_pair_host(v_a, s_a, v_b, s_b)


def merge_state_in_place(v, s, v_other, s_other, mask=None, stream=None):
    """``(v, s) = merge_state(v, s, v_other, s_other)`` in place, on CUDA tensors; with ``mask``
    (bool or uint8 ``(tokens,)``), only the tokens whose entry is true. Returns nothing."""
    if not _on_cuda(v):
        raise TensorError("v: merge_state_in_place needs CUDA tensors; on host arrays use merge_state")
    _merge_states(v, s, v_other, s_other, mask, v, s, _current_stream(_cuda_ordinal(v), v, stream))


merge_state_into = merge_state_in_place


def merge_states(v, s, stream=None):
    """Merges ``n`` states ``v`` ``(tokens, n, heads, dim)``, ``s`` ``(tokens, n, heads)`` into
    one ``(tokens, heads, dim)`` / ``(tokens, heads)`` state, as :func:`merge_state` (``n = 0``:
    ``v = 0, s = -inf``). One kernel launch for CUDA tensors."""
    if _on_cuda(v):
        t, _, h, d = v.shape
        out_v, out_s = _empty(v, (t, h, d)), _empty(v, (t, h), float32=True)
        _merge_states(v, s, None, None, None, out_v, out_s, _current_stream(_cuda_ordinal(v), v, stream))
        return out_v, out_s
    xp = _namespace(v)
    t, n, h, d = v.shape
    out_v, out_s = xp.zeros((t, h, d), dtype=v.dtype), xp.full((t, h), float("-inf"), dtype=s.dtype)
    for i in range(n):
        out_v, out_s = _merge_pair_host(out_v, out_s, v[:, i], s[:, i])
    return out_v, out_s


def _merge_pair_host(v_a, s_a, v_b, s_b):
    """:func:`merge_state` as array operations (host arrays)."""
    xp = _namespace(v_a)
    m = xp.maximum(s_a, s_b)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, xp.zeros_like(m))
    wa = xp.exp(s_a - m0)
    wb = xp.exp(s_b - m0)
    total = wa + wb
    safe = xp.where(total > 0, total, xp.ones_like(total))
    fa, fb = _widen(v_a), _widen(v_b)
    # A side with no visible key is not read (its v may be anything, NaN included).
    fa = xp.where((wa > 0)[..., None], fa, xp.zeros_like(fa))
    fb = xp.where((wb > 0)[..., None], fb, xp.zeros_like(fb))
    v = fa * (wa / safe)[..., None] + fb * (wb / safe)[..., None]
    v = xp.where(xp.isnan(m)[..., None], xp.full_like(v, float("nan")), v)
    s = xp.where(total > 0, m0 + xp.log(safe), xp.full_like(m, float("-inf")))
    s = xp.where(xp.isnan(m), m, s)
    return _astype(v, v_a), s


def _widen(x):
    """16-bit floats as float32 (wider types as they are)."""
    if hasattr(x, "element_size"):
        return x.float() if x.element_size() < 4 else x
    return x.astype("float32") if x.dtype.itemsize < 4 else x


def _on_cuda(x):
    return hasattr(x, "__dlpack_device__") and int(x.__dlpack_device__()[0]) == 2


def _cuda_ordinal(x):
    return int(x.__dlpack_device__()[1])


def _namespace(x):
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    if hasattr(x, "__array_namespace__"):
        return x.__array_namespace__()
    import numpy

    return numpy


def _astype(v, like):
    if hasattr(v, "to") and hasattr(like, "dtype"):
        return v.to(like.dtype)
    return v.astype(like.dtype)


def _as_variant(v):
    if v is None:
        return variant("default")
    if isinstance(v, str):
        return variant(v)
    if isinstance(v, Variant):
        return v
    raise ArgumentError(f"variant: a {type(v).__name__}; pass a shipped variant's name, a spec path or an attnforge.Variant")


def _stream_arg(stream):
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise ArgumentError(f"stream: a {type(stream).__name__}; pass a CUDA stream handle (int), a torch.cuda.Stream or a cupy Stream")


_torch_stream = None  # torch's current raw stream of a device, resolved on first use


def _torch_current_stream(device):
    global _torch_stream
    if _torch_stream is None:
        import torch

        # The C accessor returns the handle without building a torch.cuda.Stream (about 5 us a
        # call less); the public spelling where a torch lacks it.
        _torch_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (lambda d: torch.cuda.current_stream(d).cuda_stream)
    return _torch_stream(device)


def _current_stream(device, hint=None, stream=None):
    """The stream to launch on: ``stream`` if given, else the current stream of the library the
    tensors come from (torch, CuPy), else the legacy default stream (0)."""
    if stream is not None:
        return _stream_arg(stream)
    mod = type(hint).__module__ if hint is not None else ""
    if mod == "torch" or mod.startswith("torch.") or (hint is None and "torch" in sys.modules):
        return _torch_current_stream(device)
    if mod.startswith("cupy") or (hint is None and "cupy" in sys.modules):
        import cupy

        return cupy.cuda.get_current_stream().ptr
    return 0


def _empty(like, shape, float32=False):
    """An uninitialised array on ``like``'s device: ``like``'s dtype, or float32."""
    if type(like).__module__.startswith("torch"):
        import torch

        return torch.empty(shape, dtype=torch.float32 if float32 else like.dtype, device=like.device)
    if type(like).__module__.startswith("cupy"):
        import cupy

        return cupy.empty(shape, dtype=cupy.float32 if float32 else like.dtype)
    if hasattr(like, "__dlpack_device__") and like.__dlpack_device__()[0] != 2:
        raise TensorError(f"q: a {type(like).__name__} in host memory; the kernels need a CUDA tensor")
    raise ArgumentError(f"out=None with a {type(like).__name__}: attnforge allocates outputs for torch and CuPy tensors; pass out= and lse=")


def _device_of(buf, device):
    """The CUDA ordinal: ``device`` (an int, ``"cuda:N"`` or a torch.device), else the
    workspace buffer's, else torch's current device, else 0."""
    if device is not None:
        if isinstance(device, int):
            return device
        if isinstance(device, str):
            return int(device.split(":")[1]) if ":" in device else 0
        index = getattr(device, "index", None)
        return int(index) if index is not None else 0
    if buf is not None and hasattr(buf, "__dlpack_device__"):
        kind, idx = buf.__dlpack_device__()
        if kind == 2:
            return int(idx)
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.current_device()
    return 0


def _dtype_name(d):
    if d is None:
        return None
    s = str(d)
    for p in ("torch.", "numpy."):
        if s.startswith(p):
            s = s[len(p):]
    return {"half": "float16", "f16": "float16", "fp16": "float16", "bf16": "bfloat16"}.get(s, s)


def _map_flashinfer(kind, variant, params, causal, window_left, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta, q_data_type, kv_data_type):
    """FlashInfer's variant flags as a shipped variant and parameters; errors where they cannot
    be expressed (never ignored)."""
    if pos_encoding_mode not in (None, "NONE"):
        raise UnsupportedError(f"pos_encoding_mode={pos_encoding_mode!r}: apply RoPE before attention; ALiBi is variant='alibi' with params={{'slopes': [...]}}")
    if rope_scale is not None or rope_theta is not None:
        raise UnsupportedError("rope_scale / rope_theta: attnforge does not apply RoPE inside attention; rotate q and k before")
    if kv_data_type is not None and _dtype_name(kv_data_type) != _dtype_name(q_data_type):
        raise UnsupportedError(f"kv_data_type {_dtype_name(kv_data_type)} differs from q_data_type {_dtype_name(q_data_type)}: the kernels take one element type")
    cap = logits_soft_cap if logits_soft_cap is not None and logits_soft_cap > 0 else None
    window = window_left + 1 if window_left is not None and window_left >= 0 else None
    if variant is not None:
        if cap is not None or window is not None or causal:
            raise ArgumentError("variant= with causal / window_left / logits_soft_cap: the variant's spec decides the mask and logits; pass its parameters in params=")
        return _as_variant(variant), params
    # Decode has one query, at the end: causal and non-causal are the same there.
    causal = causal or kind == "decode"
    extra = {}
    if cap is not None:
        extra["soft_cap"] = float(cap)
    if window is not None:
        extra["window"] = int(window)
    name = {(False, False): "causal", (True, False): "soft_cap", (False, True): "sliding_window", (True, True): "gemma2"}[(cap is not None, window is not None)]
    if not causal:
        if extra:
            raise UnsupportedError("a non-causal soft cap or window has no shipped variant: write a spec (attnforge.Variant.from_json) and pass variant=")
        name = "default"
    merged = dict(params or {})
    merged.update(extra)
    return variant_(name), merged or None


variant_ = variant


class _Wrapper:
    _core = None
    _device = 0

    @property
    def is_cascade(self):
        """Whether the planned step runs as a cascade: requests that share leading pages (a
        prefix cache's shared prompt) have those keys read once for all their queries, on the
        prefill kernel, and the states merged. Detected from the page table at ``plan`` when it
        pays (``cascade=True``). A prefill wrapper runs every level on its prefill kernel (never
        in CUDA-graph mode); a decode wrapper runs the shared prefixes on the prefill kernel of
        its variant and each request's own keys on the decode kernel, in CUDA-graph mode too."""
        return self._core.cascaded()

    def _stream(self, hint, stream):
        return _current_stream(self._device, hint, stream)

    def _run(self, q, kv, out, lse, return_lse, stream, *extra):
        if out is None or lse is None:
            out, lse = self._outputs(q, out, lse)
        self._core.run(q, kv, out, lse, _current_stream(self._device, q, stream), *extra)
        return (out, lse) if return_lse else out

    def _outputs(self, q, out, lse):
        planned = self._core.planned()
        if planned is None:
            raise PlanError("plan: run before plan: plan the step first")
        shape = getattr(q, "shape", None)
        if shape is None or len(shape) != 3:
            raise TensorError(f"q: shape {tuple(shape) if shape is not None else type(q).__name__}, expected (tokens, num_qo_heads, head_dim_qk)")
        rows, heads, dv = shape[0], shape[1], planned[2]
        if out is None:
            out = _empty(q, (rows, heads, dv))
        if lse is None:
            lse = _empty(q, (rows, heads), float32=True)
        return out, lse


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    """Batch decode (one query token per request) over a paged KV cache, FlashInfer's shape.

    ``use_cuda_graph=True`` fixes every buffer at construction (capacities from
    ``max_batch_size`` / ``max_pages``, or from FlashInfer's ``paged_kv_indptr_buffer`` /
    ``paged_kv_indices_buffer`` lengths); ``plan()`` between replays only rewrites them, and
    ``run()`` may be captured. Capturing ``run()`` of a wrapper not made for graphs is a
    :class:`PlanError` (a captured eager plan would replay stale buffers). In graph mode ``q``,
    ``out`` and ``lse`` hold ``max_batch_size`` rows; rows beyond the planned batch are not
    written.

    ``cascade``: run batches whose requests share leading pages as decode cascades (see
    :attr:`is_cascade`). ``None`` (the default) means on in eager mode and off in CUDA-graph
    mode, where it costs every step one launch of idle prefill CTAs even when nothing is shared;
    ``True`` turns it on in graph mode as well (one captured graph then replays steps with and
    without a shared prefix). The cascade kernel is compiled at the first step that shares a
    prefix (in graph mode, at the first ``plan``).
    """

    def __init__(self, float_workspace_buffer=None, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False, paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None, backend="auto", *, device=None, max_batch_size=None, max_pages=None, max_ctas=None, deterministic=False, cascade=None):
        self._device = _device_of(float_workspace_buffer, device)
        if paged_kv_indptr_buffer is not None and max_batch_size is None:
            max_batch_size = len(paged_kv_indptr_buffer) - 1
        if paged_kv_indices_buffer is not None and max_pages is None:
            max_pages = len(paged_kv_indices_buffer)
        self._layout = kv_layout
        if cascade is None:
            cascade = not use_cuda_graph
        self._core = _DecodeCore(self._device, kv_layout, bool(use_cuda_graph), max_batch_size, max_pages, max_ctas, bool(deterministic), bool(cascade))
        self.is_cuda_graph_enabled = bool(use_cuda_graph)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16", kv_data_type=None, data_type=None, sm_scale=None, rope_scale=None, rope_theta=None, non_blocking=True, *, variant=None, params=None, head_dim_vo=None, stream=None):
        """Plans one decode step from host index arrays (lists, NumPy arrays, CPU tensors): the
        page table of every request. ``variant`` is a shipped name, a spec path or a
        :class:`Variant`; ``params`` its parameter values by name."""
        q_data_type = data_type if data_type is not None else q_data_type
        v, params = _map_flashinfer("decode", variant, params, False, window_left, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta, q_data_type, kv_data_type)
        self._core.plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, head_dim_vo, _dtype_name(q_data_type), v, params, sm_scale, self._stream(None, stream))

    def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse=False, stream=None):
        """Attention of ``q`` ``(batch, num_qo_heads, head_dim)`` over the cache (one tensor
        ``(pages, 2, page_size, kv_heads, head_dim)`` for NHD, or a pair ``(k, v)``). Returns
        ``out``, or ``(out, lse)`` with ``return_lse``."""
        return self._run(q, paged_kv_cache, out, lse, return_lse, stream)

    forward = run


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    """Batch prefill / append over a paged KV cache (ragged queries), FlashInfer's shape. A
    request's queries are the last ``q_len`` positions of its ``kv_len`` keys. Graph mode as
    for decode, with ``max_tokens`` (query tokens) as well. ``backend``: ``"auto"`` (the
    engine's choice: the Hopper main loop on sm_90a, else the portable one),
    ``"fa3"`` (the Hopper loop; sm_90a and head dims that are multiples of 64, else an error at
    ``plan``) or ``"fa2"`` (the portable loop); short appends run the append tile either way."""

    _ragged = False

    def __init__(self, float_workspace_buffer=None, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None, backend="auto", *, device=None, max_batch_size=None, max_tokens=None, max_pages=None, max_ctas=None, deterministic=False, cascade=True):
        self._device = _device_of(float_workspace_buffer, device)
        if qo_indptr_buf is not None and max_batch_size is None:
            max_batch_size = len(qo_indptr_buf) - 1
        if paged_kv_indices_buf is not None and max_pages is None:
            max_pages = len(paged_kv_indices_buf)
        self._layout = kv_layout
        self._core = _PrefillCore(self._device, kv_layout, bool(use_cuda_graph), max_batch_size, max_tokens, max_pages, max_ctas, bool(deterministic), bool(cascade), backend)
        self.is_cuda_graph_enabled = bool(use_cuda_graph)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None, causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1, logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None, non_blocking=True, *, variant=None, params=None, stream=None):
        """Plans one prefill step from host index arrays. ``causal``, ``window_left`` and
        ``logits_soft_cap`` pick a shipped variant; or give ``variant`` (and ``params``)."""
        self._plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, custom_mask, packed_custom_mask, causal, pos_encoding_mode, sm_scale, window_left, logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type, variant, params, stream)

    def _plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, custom_mask, packed_custom_mask, causal, pos_encoding_mode, sm_scale, window_left, logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type, variant, params, stream):
        if custom_mask is not None or packed_custom_mask is not None:
            raise UnsupportedError("custom_mask: use variant='tree_mask' with its bits parameter (params={'tree': {'bits': ..., 'offsets': [...]}})")
        v, params = _map_flashinfer("prefill", variant, params, causal, window_left, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta, q_data_type, kv_data_type)
        self._core.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, _dtype_name(q_data_type), v, params, sm_scale, self._stream(None, stream))

    def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse=False, stream=None):
        """Attention of ``q`` ``(total_q, num_qo_heads, head_dim_qk)`` over the cache. Returns
        ``out``, or ``(out, lse)`` with ``return_lse``."""
        return self._run(q, paged_kv_cache, out, lse, return_lse, stream, False)

    forward = run


class BatchPrefillWithRaggedKVCacheWrapper(BatchPrefillWithPagedKVCacheWrapper):
    """Batch prefill over contiguous (ragged) K/V: ``k``, ``v`` ``(total_kv, kv_heads, dim)``
    with ``kv_indptr``. It runs on the paged kernels with pages of one token (the table is
    ``kv_indptr`` itself); there is no contiguous-K/V kernel, and this path's speed against one
    is not measured."""

    def __init__(self, float_workspace_buffer=None, kv_layout="NHD", use_cuda_graph=False, backend="auto", *, device=None, max_batch_size=None, max_tokens=None, max_kv_tokens=None, max_ctas=None, deterministic=False, cascade=True):
        if kv_layout != "NHD":
            raise UnsupportedError("the ragged wrapper takes NHD K/V (tokens, heads, dim)")
        super().__init__(float_workspace_buffer, "NHD", use_cuda_graph, backend=backend, device=device, max_batch_size=max_batch_size, max_tokens=max_tokens, max_pages=max_kv_tokens, max_ctas=max_ctas, deterministic=deterministic, cascade=cascade)

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None, custom_mask=None, packed_custom_mask=None, causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1, logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None, non_blocking=True, *, variant=None, params=None, stream=None):
        """Plans one step: request ``b``'s queries ``qo_indptr[b]..qo_indptr[b+1]`` over its keys
        ``kv_indptr[b]..kv_indptr[b+1]``."""
        # Pages of one token: the table is kv_indptr itself (the core builds it).
        self._plan(qo_indptr, kv_indptr, None, None, num_qo_heads, num_kv_heads, head_dim_qk, 1, head_dim_vo, custom_mask, packed_custom_mask, causal, pos_encoding_mode, sm_scale, window_left, logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type, variant, params, stream)

    def run(self, q, k, v, *, out=None, lse=None, return_lse=False, stream=None):
        """Attention of ``q`` over ``k``, ``v`` ``(total_kv, kv_heads, dim)``."""
        return self._run(q, (k, v), out, lse, return_lse, stream, True)

    forward = run
