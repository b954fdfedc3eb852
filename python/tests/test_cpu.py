"""What runs on any machine: import, specs and their error positions, the CPU reference against
a NumPy attention, bad tensors and arguments, and the wrappers' host-side checks."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import naive  # noqa: E402

import attnforge  # noqa: E402
from attnforge import errors  # noqa: E402


def test_import_and_shipped_variants():
    assert attnforge.__version__
    names = attnforge.shipped_variants()
    for n in ("default", "causal", "soft_cap", "sliding_window", "gemma2", "alibi"):
        assert n in names
        v = attnforge.variant(n)
        assert v.name == n
        assert v.origin == f"shipped:{n}"
    # The same name is the same object, so wrappers reuse its kernels.
    assert attnforge.variant("gemma2") is attnforge.variant("gemma2")
    g = attnforge.variant("gemma2")
    assert [p["name"] for p in g.params] == ["soft_cap", "window"]
    assert g.hooks["mask"] == "kv_pos <= q_pos && q_pos - kv_pos < window"


def test_spec_errors_carry_their_position():
    with pytest.raises(attnforge.SpecError) as e:
        attnforge.check_spec(json.dumps({"name": "x", "logits": "score * foo"}), file="x.json")
    assert (e.value.file, e.value.hook, e.value.column) == ("x.json", "logits", 9)
    assert "unknown identifier `foo`" in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, attnforge.Error)
    with pytest.raises(attnforge.SpecError) as e:
        attnforge.check_spec('{"name": "x",\n  "mask": "kv_pos <= q_pos +"}', file="y.json")
    assert e.value.hook == "mask" and e.value.line == 2 and e.value.column is not None
    with pytest.raises(attnforge.SpecError) as e:
        attnforge.check_spec('{"name": "x", "bogus": 1}')
    assert "bogus" in str(e.value)
    with pytest.raises(attnforge.SpecError) as e:
        attnforge.check_spec('{"name": "x", ')
    assert e.value.line == 1


def test_a_spec_file_and_an_unknown_variant(tmp_path):
    p = tmp_path / "capped.json"
    p.write_text(json.dumps({"name": "capped", "logits": "score * sm_scale", "mask": "kv_pos <= q_pos && bad"}))
    with pytest.raises(attnforge.SpecError) as e:
        attnforge.Variant.from_file(str(p))
    assert e.value.file == str(p) and e.value.hook == "mask"
    with pytest.raises(attnforge.UnknownVariantError):
        attnforge.variant("no_such_variant")
    with pytest.raises(attnforge.FileError):
        attnforge.Variant.from_file(str(tmp_path / "missing.json"))


def make_case(rng, kv_lens, q_lens, page_size, qo_heads=4, kv_heads=2, d=32, dv=None, dtype=np.float32, layout="NHD"):
    dv = dv or d
    total, indptr, indices, last = naive.random_table(rng, kv_lens, page_size)
    shape = lambda dim: (total, page_size, kv_heads, dim) if layout == "NHD" else (total, kv_heads, page_size, dim)  # noqa: E731
    k = rng.standard_normal(shape(d)).astype(dtype)
    v = rng.standard_normal(shape(dv)).astype(dtype)
    qo_indptr = np.zeros(len(q_lens) + 1, dtype=np.int32)
    qo_indptr[1:] = np.cumsum(q_lens)
    q = rng.standard_normal((qo_indptr[-1], qo_heads, d)).astype(dtype)
    return q, k, v, qo_indptr, indptr, indices, last


CASES = [
    ("default", None),
    ("causal", None),
    ("soft_cap", {"soft_cap": 5.0}),
    ("sliding_window", {"window": 7}),
    ("gemma2", {"soft_cap": 3.0, "window": 5}),
    ("alibi", {"slopes": [0.5, 0.25, 0.125, 0.0625]}),
]


@pytest.mark.parametrize("kind,params", CASES)
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_reference_matches_a_numpy_attention(kind, params, page_size):
    rng = np.random.default_rng(hash((kind, page_size)) % 2**32)
    # Ragged lengths, an empty request, partial last pages, decode and append rows.
    kv_lens, q_lens = [13, 0, 1, 40, 16], [3, 0, 1, 1, 16]
    q, k, v, qo, indptr, indices, last = make_case(rng, kv_lens, q_lens, page_size)
    o, lse = attnforge.reference(kind, q, (k, v), qo, indptr, indices, last, params=params)
    want_o, want_lse = naive.attention(kind, q, k, v, qo, indptr, indices, last, page_size, params)
    assert o.shape == want_o.shape and o.dtype == np.float32
    finite = np.isfinite(want_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, want_o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["pair", "interleaved", "halves", "hnd"])
def test_reference_takes_every_cache_form(form):
    rng = np.random.default_rng(7)
    layout = "HND" if form == "hnd" else "NHD"
    q, k, v, qo, indptr, indices, last = make_case(rng, [9, 21], [2, 1], 4, layout=layout)
    want_o, want_lse = naive.attention("causal", q, k, v, qo, indptr, indices, last, 4, layout=layout)
    cache = (k, v)
    if form in ("interleaved", "halves"):
        kv = np.ascontiguousarray(np.stack([k, v], axis=1))
        cache = kv if form == "interleaved" else (kv[:, 0], kv[:, 1])
    o, lse = attnforge.reference("causal", q, cache, qo, indptr, indices, last, kv_layout=layout)
    np.testing.assert_allclose(o, want_o, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_reference_in_float16_and_other_head_dims():
    rng = np.random.default_rng(3)
    q, k, v, qo, indptr, indices, last = make_case(rng, [30, 5], [1, 5], 16, d=64, dv=32, dtype=np.float16)
    o, _ = attnforge.reference("causal", q, (k, v), qo, indptr, indices, last, sm_scale=0.1)
    want, _ = naive.attention("causal", q, k, v, qo, indptr, indices, last, 16, sm_scale=0.1)
    assert o.shape == (6, 4, 32)
    np.testing.assert_allclose(o, want, rtol=1e-3, atol=1e-3)


def small(rng=None):
    return make_case(rng or np.random.default_rng(1), [9, 21], [2, 1], 4)


def test_bad_tensors_name_the_argument():
    q, k, v, qo, indptr, indices, last = small()
    ref = lambda **kw: attnforge.reference(kw.get("variant", "causal"), kw.get("q", q), kw.get("kv", (k, v)), kw.get("qo", qo), indptr, indices, kw.get("last", last), params=kw.get("params"))  # noqa: E731
    with pytest.raises(attnforge.TensorError, match=r"^q: dtype int32"):
        ref(q=q.astype(np.int32))
    with pytest.raises(attnforge.TensorError, match=r"^q: shape"):
        ref(q=q[:, 0])
    with pytest.raises(attnforge.TensorError, match=r"^q: not contiguous"):
        ref(q=np.ascontiguousarray(np.concatenate([q, q], axis=2))[:, :, ::2])
    with pytest.raises(attnforge.TensorError, match=r"^q: .*tokens, but qo_indptr ends at 3"):
        ref(q=q[:2])
    with pytest.raises(attnforge.TensorError, match=r"^q: a list is not a tensor"):
        ref(q=q.tolist())
    with pytest.raises(attnforge.TensorError, match=r"paged_kv_cache: k is float32 but v is float16"):
        ref(kv=(k, v.astype(np.float16)))
    with pytest.raises(attnforge.TensorError, match=r"paged_kv_cache: dtype float16, but q is float32"):
        ref(kv=(k.astype(np.float16), v.astype(np.float16)))
    with pytest.raises(attnforge.TensorError, match=r"paged_kv_cache\[0\] \(k\): shape"):
        ref(kv=(k[0], v))
    with pytest.raises(attnforge.TensorError, match=r"not contiguous"):
        ref(kv=(k[:, ::2], v[:, ::2]))
    with pytest.raises(attnforge.TensorError, match=r"paged_kv_cache: a tuple of 3 items"):
        ref(kv=(k, v, v))
    with pytest.raises(attnforge.TensorError, match=r"paged_kv_cache: shape"):
        ref(kv=k)


def test_bad_index_arrays_and_params():
    q, k, v, qo, indptr, indices, last = small()
    with pytest.raises(attnforge.BatchError):
        attnforge.reference("causal", q, (k, v), qo, indptr, indices, last[:1])
    with pytest.raises(attnforge.BatchError):
        attnforge.reference("causal", q, (k, v), qo, indptr, np.full_like(indices, 999), last)
    with pytest.raises(attnforge.ArgumentError, match=r"kv_indices: dtype float64"):
        attnforge.reference("causal", q, (k, v), qo, indptr, indices.astype(np.float64), last)
    with pytest.raises(attnforge.ArgumentError, match=r"kv_indices\[1\]: a str is not an integer"):
        attnforge.reference("causal", q, (k, v), qo, indptr, [0, "x"], last)
    with pytest.raises(attnforge.ArgumentError, match=r"does not fit"):
        attnforge.reference("causal", q, (k, v), qo, indptr, np.array([2**40] * len(indices)), last)
    with pytest.raises(attnforge.ParamError, match="nope"):
        attnforge.reference("causal", q, (k, v), qo, indptr, indices, last, params={"nope": 1.0})
    with pytest.raises(attnforge.ParamError):
        attnforge.reference("soft_cap", q, (k, v), qo, indptr, indices, last, params={"soft_cap": -1.0})
    with pytest.raises(attnforge.ParamError):
        attnforge.reference("alibi", q, (k, v), qo, indptr, indices, last, params={"slopes": [0.5]})
    with pytest.raises(attnforge.ArgumentError, match="kv_layout"):
        attnforge.reference("causal", q, (k, v), qo, indptr, indices, last, kv_layout="NDH")
    # Lists work as well as arrays.
    o1, _ = attnforge.reference("causal", q, (k, v), qo.tolist(), indptr.tolist(), indices.tolist(), last.tolist())
    o2, _ = attnforge.reference("causal", q, (k, v), qo, indptr, indices, last)
    assert np.array_equal(o1, o2)


def test_merge_state_matches_attention_over_the_union():
    rng = np.random.default_rng(5)
    q, k, v, qo, indptr, indices, last = make_case(rng, [24], [1], 4)
    whole_o, whole_lse = naive.attention("default", q, k, v, qo, indptr, indices, last, 4)
    # The first three pages and the rest of request 0, as two states.
    a = naive.attention("default", q, k, v, qo, np.array([0, 3]), indices[:3], [4], 4)
    b = naive.attention("default", q, k, v, qo, np.array([0, 3]), indices[3:6], [4], 4)
    o, s = attnforge.merge_state(a[0], a[1], b[0], b[1])
    np.testing.assert_allclose(o, whole_o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s, whole_lse, rtol=1e-12)
    # A state with no visible key contributes nothing; two of them give 0 and -inf.
    empty_o, empty_s = np.zeros_like(a[0]), np.full_like(a[1], -np.inf)
    o, s = attnforge.merge_state(a[0], a[1], empty_o, empty_s)
    np.testing.assert_allclose(o, a[0])
    np.testing.assert_allclose(s, a[1])
    o, s = attnforge.merge_state(empty_o, empty_s, empty_o, empty_s)
    assert np.all(o == 0) and np.all(np.isneginf(s))
    o, s = attnforge.merge_states(np.stack([a[0], b[0]], axis=1), np.stack([a[1], b[1]], axis=1))
    np.testing.assert_allclose(o, whole_o, rtol=1e-10, atol=1e-12)


def test_host_merges_skip_masked_states_and_keep_nan_rows():
    rng = np.random.default_rng(11)
    t, h, d = 5, 3, 8
    va, vb = rng.standard_normal((t, h, d)), rng.standard_normal((t, h, d))
    sa, sb = rng.uniform(-5, 5, (t, h)), rng.uniform(-5, 5, (t, h))
    sb[0] = -np.inf
    vb[0] = np.nan  # no visible key: never read
    sa[1, 2] = np.nan
    o, s = attnforge.merge_state(va, sa, vb, sb)
    np.testing.assert_allclose(o[0], va[0])
    np.testing.assert_allclose(s[0], sa[0])
    assert np.all(np.isnan(o[1, 2])) and np.isnan(s[1, 2])
    m = np.maximum(sa[2:], sb[2:])
    wa, wb = np.exp(sa[2:] - m), np.exp(sb[2:] - m)
    np.testing.assert_allclose(o[2:], (va[2:] * wa[..., None] + vb[2:] * wb[..., None]) / (wa + wb)[..., None], rtol=1e-12)
    np.testing.assert_allclose(s[2:], m + np.log(wa + wb), rtol=1e-12)
    # No states at all: o = 0, lse = -inf.
    o, s = attnforge.merge_states(np.zeros((t, 0, h, d)), np.zeros((t, 0, h)))
    assert o.shape == (t, h, d) and np.all(o == 0) and np.all(np.isneginf(s))
    # The in-place merge is a device operation.
    with pytest.raises(attnforge.TensorError, match="CUDA"):
        attnforge.merge_state_in_place(va, sa, vb, sb)
    assert attnforge.merge_state_into is attnforge.merge_state_in_place


def test_wrappers_check_host_arrays_and_flags_before_the_gpu():
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
    with pytest.raises(attnforge.BatchError):
        w.plan([0, 2, 1], [0, 1], [4, 4], 8, 2, 64, 16)  # indptr decreases
    with pytest.raises(attnforge.BatchError):
        w.plan([0, 1, 2], [0, 1], [4], 8, 2, 64, 16)  # last_page_len of the wrong length
    with pytest.raises(attnforge.ArgumentError, match="multiple"):
        w.plan([0, 1], [0], [4], 6, 4, 64, 16)
    with pytest.raises(attnforge.ArgumentError, match="indices: a str is not an index array"):
        w.plan([0, 1], "zero", [4], 8, 2, 64, 16)
    with pytest.raises(attnforge.ArgumentError, match="q_data_type"):
        w.plan([0, 1], [0], [4], 8, 2, 64, 16, q_data_type="float64")
    with pytest.raises(attnforge.UnsupportedError, match="RoPE"):
        w.plan([0, 1], [0], [4], 8, 2, 64, 16, pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(attnforge.ArgumentError, match="variant="):
        w.plan([0, 1], [0], [4], 8, 2, 64, 16, variant="causal", logits_soft_cap=30.0)
    with pytest.raises(attnforge.ParamError):
        w.plan([0, 1], [0], [4], 8, 2, 64, 16, variant="gemma2", params={"window": 0})
    with pytest.raises(attnforge.PlanError, match="run before plan"):
        w.run(np.zeros((1, 8, 64), np.float16), np.zeros((1, 2, 16, 2, 64), np.float16))
    with pytest.raises(attnforge.ArgumentError, match="use_cuda_graph"):
        attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", max_batch_size=4)
    with pytest.raises(attnforge.ArgumentError, match="kv_layout"):
        attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NDH")
    p = attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD")
    with pytest.raises(attnforge.UnsupportedError, match="tree_mask"):
        p.plan([0, 1], [0, 1], [0], [4], 8, 2, 64, 16, custom_mask=np.ones(4, bool))
    with pytest.raises(attnforge.UnsupportedError, match="non-causal"):
        p.plan([0, 1], [0, 1], [0], [4], 8, 2, 64, 16, logits_soft_cap=30.0)


def test_the_prefill_backend_picks_a_main_loop_and_refuses_what_it_cannot_run():
    # FlashInfer's backend names: "auto", "fa2" (portable loop), "fa3" (Hopper loop); others
    # are an ArgumentError naming the choices, on any machine.
    for cls in (attnforge.BatchPrefillWithPagedKVCacheWrapper, attnforge.BatchPrefillWithRaggedKVCacheWrapper):
        for b in ("auto", "fa2", "fa3"):
            cls(None, "NHD", backend=b)
        with pytest.raises(attnforge.ArgumentError, match="'fa3'.*'fa2'"):
            cls(None, "NHD", backend="cudnn")
    # The Hopper loop takes head dims of whole 64-column panels: d 96 is refused at plan, before
    # any GPU is needed.
    p = attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD", backend="fa3")
    with pytest.raises(attnforge.UnsupportedError, match="multiples of 64"):
        p.plan([0, 1], [0, 1], [0], [4], 8, 2, 96, 16, causal=True)


@pytest.mark.skipif(attnforge.gpu_available(), reason="this machine has a GPU (test_gpu.py covers it)")
def test_without_a_gpu_planning_says_so():
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
    with pytest.raises(attnforge.NoGpuError, match="no GPU"):
        w.plan([0, 1], [0], [4], 8, 2, 64, 16)
    assert isinstance(attnforge.NoGpuError("x"), RuntimeError)


def test_cascade_flag_on_every_wrapper():
    for w in (attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", cascade=False), attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD", cascade=True), attnforge.BatchPrefillWithRaggedKVCacheWrapper(None, "NHD", cascade=False)):
        assert w.is_cascade is False, "nothing is planned yet"
    # A batch whose two requests share their first page is still checked on the host first.
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
    with pytest.raises(attnforge.BatchError):
        w.plan([0, 2, 4], [7, 1, 7, 2], [16, 16, 3], 8, 2, 64, 16)  # last_page_len of the wrong length
    assert w.is_cascade is False


def nvrtc_missing():
    try:
        attnforge.compile("causal", "decode", 64, 8, 2, arch="sm_80")
        return False
    except attnforge.NvrtcMissingError:
        return True


@pytest.mark.skipif(nvrtc_missing() and not os.environ.get("ATTNFORGE_REQUIRE_NVRTC"), reason="no NVRTC on this machine")
def test_compile_warms_the_cache_without_a_gpu():
    names = attnforge.compile("gemma2", "decode", 128, 32, 8, dtype="bfloat16", arch="sm_90a")
    assert names and all("gemma2" in n and "d128" in n for n in names)
    names = attnforge.compile(attnforge.variant("causal"), "prefill", 64, 8, 8, arch="sm_80")
    assert len(names) >= 1
    with pytest.raises(attnforge.ArgumentError, match="arch"):
        attnforge.compile("causal", "decode", 64, 8, 2, arch="sm_70")
    with pytest.raises(attnforge.ArgumentError, match="op"):
        attnforge.compile("causal", "encode", 64, 8, 2, arch="sm_90a")
    with pytest.raises(attnforge.UnsupportedError):
        attnforge.compile("causal", "decode", 72, 8, 2, arch="sm_90a")


def test_garbage_at_every_entry_point_is_an_error_never_a_panic():
    """Random junk for every argument: an attnforge error (or Python's own TypeError for an
    argument of the wrong Python type), never InternalError or a Rust panic."""
    rng = np.random.default_rng(11)
    junk = [None, 0, -1, 2**63, 1.5, float("nan"), "", "x" * 3, b"\x00", [], [1, -2], [[1]], {}, {"a": 1}, (1, 2), np.zeros(0), np.zeros((2, 2)),
            np.array([2**31], dtype=np.int64), np.array([1.5]), np.zeros(3, np.int32), object()]
    q, k, v, qo, indptr, indices, last = small()
    good = ["causal", q, (k, v), qo, indptr, indices, last]
    allowed = (attnforge.Error, TypeError, OverflowError)
    for trial in range(400):
        args = list(good)
        for i in rng.choice(len(args), size=rng.integers(1, 3), replace=False):
            args[i] = junk[rng.integers(len(junk))]
        try:
            attnforge.reference(*args, params=junk[rng.integers(len(junk))] if trial % 3 == 0 else None)
        except attnforge.InternalError as e:
            raise AssertionError(f"panic for {args!r}: {e}")
        except allowed:
            pass
    for trial in range(200):
        text = "".join(chr(c) for c in rng.integers(0, 0x2FF, size=rng.integers(0, 60)))
        for t in (text, '{"name": "x", "logits": "' + text.replace('"', "") + '"}'):
            try:
                attnforge.check_spec(t)
            except attnforge.InternalError as e:
                raise AssertionError(f"panic for {t!r}: {e}")
            except allowed:
                pass
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
    plan_good = [[0, 1], [0], [4], 8, 2, 64, 16]
    for trial in range(300):
        args = list(plan_good)
        for i in rng.choice(len(args), size=rng.integers(1, 3), replace=False):
            args[i] = junk[rng.integers(len(junk))]
        try:
            w.plan(*args)
        except attnforge.InternalError as e:
            raise AssertionError(f"panic for {args!r}: {e}")
        except allowed:
            pass
