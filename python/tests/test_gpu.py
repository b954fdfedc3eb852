"""On the device: the wrappers against torch's SDPA in float64 (variants it can express) and
against attnforge.reference (the rest), bad tensors, CUDA-graph capture and replay with changing
lengths, and two threads on two streams. Skipped, saying why, without torch or a GPU."""

import os
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import naive  # noqa: E402

import attnforge  # noqa: E402

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available() or not attnforge.gpu_available():
    pytest.skip("no GPU (or no NVRTC): the GPU tests need one", allow_module_level=True)

DEV = torch.device("cuda:0")


def table(rng, kv_lens, page_size):
    total, indptr, indices, last = naive.random_table(rng, kv_lens, page_size)
    return total, indptr, indices, last


def cache(total, page_size, kv_heads, d, dtype, layout="NHD", dv=None):
    shape = lambda dim: (total, page_size, kv_heads, dim) if layout == "NHD" else (total, kv_heads, page_size, dim)  # noqa: E731
    k = torch.randn(shape(d), dtype=dtype, device=DEV)
    v = torch.randn(shape(dv or d), dtype=dtype, device=DEV)
    return k, v


def sdpa(q, k_rows, v_rows, causal_offset, scale):
    """float64 SDPA of one request: q (q_len, H, d), k/v (kv_len, Hkv, d)."""
    qh, kvh = q.shape[1], k_rows.shape[1]
    k = k_rows.repeat_interleave(qh // kvh, dim=1)
    v = v_rows.repeat_interleave(qh // kvh, dim=1)
    q_len, kv_len = q.shape[0], k.shape[0]
    mask = None
    if causal_offset is not None:
        qp = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= qp
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None].double(), k.transpose(0, 1)[None].double(), v.transpose(0, 1)[None].double(), attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1)


def rows_of(kc, vc, indptr, indices, last, b, page_size, layout):
    pages = indices[indptr[b]:indptr[b + 1]]
    if len(pages) == 0:
        return None, None
    kl = (len(pages) - 1) * page_size + last[b]
    idx = torch.as_tensor(pages, device=DEV, dtype=torch.long)
    k, v = kc[idx], vc[idx]
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k.reshape(-1, k.shape[2], k.shape[3])[:kl], v.reshape(-1, v.shape[2], v.shape[3])[:kl]


def tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,page_size,layout", [(64, 1, "NHD"), (128, 16, "NHD"), (128, 16, "HND"), (256, 5, "NHD")])
def test_decode_matches_sdpa(dtype, d, page_size, layout):
    rng = np.random.default_rng(d * 7 + page_size)
    kv_lens = [1, 0, 37, 300, 16, 1029]
    total, indptr, indices, last = table(rng, kv_lens, page_size)
    kc, vc = cache(total, page_size, 2, d, dtype, layout)
    q = torch.randn((len(kv_lens), 8, d), dtype=dtype, device=DEV)
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, layout)
    w.plan(indptr, indices, last, 8, 2, d, page_size, q_data_type=dtype)
    out, lse = w.run(q, (kc, vc), return_lse=True)
    torch.cuda.synchronize()
    for b in range(len(kv_lens)):
        k, v = rows_of(kc, vc, indptr, indices, last, b, page_size, layout)
        if k is None:
            assert torch.all(torch.isneginf(lse[b])), "an empty request has lse = -inf"
            continue
        want = sdpa(q[b:b + 1], k, v, None, 1 / d**0.5)
        torch.testing.assert_close(out[b:b + 1].double(), want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("form", ["pair", "interleaved", "halves"])
def test_prefill_matches_sdpa(dtype, d, form):
    rng = np.random.default_rng(d + len(form))
    kv_lens, q_lens = [200, 0, 17, 64, 513], [200, 0, 3, 1, 100]
    ps = 16
    total, indptr, indices, last = table(rng, kv_lens, ps)
    kc, vc = cache(total, ps, 4, d, dtype)
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = torch.randn((int(qo[-1]), 8, d), dtype=dtype, device=DEV)
    kv = (kc, vc)
    if form != "pair":
        both = torch.stack([kc, vc], dim=1).contiguous()
        kv = both if form == "interleaved" else (both[:, 0], both[:, 1])
    w = attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD")
    w.plan(qo, indptr, indices, last, 8, 4, d, ps, causal=True, q_data_type=dtype)
    out = w.run(q, kv)
    torch.cuda.synchronize()
    for b in range(len(kv_lens)):
        k, v = rows_of(kc, vc, indptr, indices, last, b, ps, "NHD")
        if k is None or q_lens[b] == 0:
            continue
        want = sdpa(q[qo[b]:qo[b + 1]], k, v, 0, 1 / d**0.5)
        torch.testing.assert_close(out[qo[b]:qo[b + 1]].double(), want, **tol(dtype))


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_prefill_on_either_main_loop_matches_sdpa(backend):
    # backend="fa3" is the Hopper loop: sm_90a only (elsewhere plan says it needs sm_90a).
    if backend == "fa3" and torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(attnforge.UnsupportedError, match="sm_90a"):
            w = attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD", backend=backend)
            w.plan(np.array([0, 4], np.int32), np.array([0, 1], np.int32), np.array([0], np.int32), np.array([4], np.int32), 8, 4, 128, 16, causal=True, q_data_type=torch.bfloat16)
        return
    rng = np.random.default_rng(7)
    kv_lens, q_lens, ps, d = [700, 130, 5], [300, 130, 5], 16, 128
    total, indptr, indices, last = table(rng, kv_lens, ps)
    kc, vc = cache(total, ps, 4, d, torch.bfloat16)
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = torch.randn((int(qo[-1]), 8, d), dtype=torch.bfloat16, device=DEV)
    w = attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD", backend=backend)
    w.plan(qo, indptr, indices, last, 8, 4, d, ps, causal=True, q_data_type=torch.bfloat16)
    out = w.run(q, (kc, vc))
    torch.cuda.synchronize()
    for b in range(len(kv_lens)):
        k, v = rows_of(kc, vc, indptr, indices, last, b, ps, "NHD")
        want = sdpa(q[qo[b]:qo[b + 1]], k, v, 0, 1 / d**0.5)
        torch.testing.assert_close(out[qo[b]:qo[b + 1]].double(), want, **tol(torch.bfloat16))


def test_ragged_prefill_matches_sdpa():
    kv_lens, q_lens = [100, 7, 64], [100, 7, 10]
    kvi = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    k = torch.randn((int(kvi[-1]), 2, 128), dtype=torch.bfloat16, device=DEV)
    v = torch.randn_like(k)
    q = torch.randn((int(qo[-1]), 8, 128), dtype=torch.bfloat16, device=DEV)
    w = attnforge.BatchPrefillWithRaggedKVCacheWrapper(None, "NHD")
    w.plan(qo, kvi, 8, 2, 128, causal=True, q_data_type=torch.bfloat16)
    out = w.run(q, k, v)
    torch.cuda.synchronize()
    for b in range(3):
        want = sdpa(q[qo[b]:qo[b + 1]], k[kvi[b]:kvi[b + 1]], v[kvi[b]:kvi[b + 1]], 0, 128**-0.5)
        torch.testing.assert_close(out[qo[b]:qo[b + 1]].double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name,params", [("soft_cap", {"soft_cap": 5.0}), ("gemma2", {"soft_cap": 4.0, "window": 33}), ("alibi", {"slopes": [2.0 ** -(i + 1) for i in range(8)]}), ("sink", {"sinks": [0.5 * i - 1.0 for i in range(8)]}), ("sigmoid", None), ("chunked", {"chunk": 16})])
def test_variants_match_the_reference(name, params):
    rng = np.random.default_rng(len(name))
    kv_lens, q_lens = [90, 1, 40], [30, 1, 1]
    ps = 8
    total, indptr, indices, last = table(rng, kv_lens, ps)
    kc, vc = cache(total, ps, 2, 64, torch.float16)
    qo = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = torch.randn((int(qo[-1]), 8, 64), dtype=torch.float16, device=DEV)
    w = attnforge.BatchPrefillWithPagedKVCacheWrapper(None, "NHD")
    w.plan(qo, indptr, indices, last, 8, 2, 64, ps, q_data_type="float16", variant=name, params=params)
    out, lse = w.run(q, (kc, vc), return_lse=True)
    want_o, want_lse = attnforge.reference(name, q.cpu().numpy(), (kc.cpu().numpy(), vc.cpu().numpy()), qo, indptr, indices, last, params=params)
    np.testing.assert_allclose(out.float().cpu().numpy(), want_o, rtol=5e-3, atol=5e-3)
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse.cpu().numpy()[fin], want_lse[fin], rtol=1e-3, atol=1e-3)


def test_bad_tensors_name_the_argument():
    rng = np.random.default_rng(0)
    total, indptr, indices, last = table(rng, [20, 5], 16)
    kc, vc = cache(total, 16, 2, 64, torch.float16)
    q = torch.randn((2, 8, 64), dtype=torch.float16, device=DEV)
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type=torch.float16)
    with pytest.raises(attnforge.TensorError, match=r"^q: in CPU memory"):
        w.run(q.cpu(), (kc, vc))
    with pytest.raises(attnforge.TensorError, match=r"^q: dtype bfloat16"):
        w.run(q.bfloat16(), (kc, vc))
    with pytest.raises(attnforge.TensorError, match=r"^q: shape"):
        w.run(q[:, :4], (kc, vc))
    with pytest.raises(attnforge.TensorError, match=r"^q: not contiguous"):
        w.run(torch.randn((2, 8, 128), dtype=torch.float16, device=DEV)[:, :, ::2], (kc, vc))
    with pytest.raises(attnforge.TensorError, match=r"^q: 3 tokens"):
        w.run(torch.randn((3, 8, 64), dtype=torch.float16, device=DEV), (kc, vc))
    with pytest.raises(attnforge.TensorError, match=r"pages, but the page table indexes"):
        w.run(q, (kc[:1].contiguous(), vc[:1].contiguous()))
    with pytest.raises(attnforge.TensorError, match=r"^out: shape"):
        w.run(q, (kc, vc), out=torch.empty((2, 8, 32), dtype=torch.float16, device=DEV))
    with pytest.raises(attnforge.TensorError, match=r"^lse: dtype float16"):
        w.run(q, (kc, vc), lse=torch.empty((2, 8), dtype=torch.float16, device=DEV))
    with pytest.raises(attnforge.TensorError, match=r"page_size, num_kv_heads"):
        w.run(q, cache(total, 8, 2, 64, torch.float16))
    odd = torch.empty(2 * 8 * 64 + 1, dtype=torch.float16, device=DEV)[1:].view(2, 8, 64)
    with pytest.raises(attnforge.TensorError, match=r"^q: at address .* not a multiple of 16 bytes"):
        w.run(odd, (kc, vc))


def test_capturing_an_eager_wrapper_is_an_error():
    total, indptr, indices, last = table(np.random.default_rng(1), [20], 16)
    kc, vc = cache(total, 16, 2, 64, torch.float16)
    q = torch.randn((1, 8, 64), dtype=torch.float16, device=DEV)
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type="float16")
    w.run(q, (kc, vc))
    g = torch.cuda.CUDAGraph()
    with pytest.raises(attnforge.PlanError, match="graph"):
        with torch.cuda.graph(g):
            w.run(q, (kc, vc))


def test_cuda_graph_replays_new_plans():
    B, ps, d = 8, 16, 128
    max_pages = 512
    kc, vc = cache(max_pages, ps, 8, d, torch.bfloat16)
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=B, max_pages=max_pages)
    rng = np.random.default_rng(2)
    q = torch.randn((B, 32, d), dtype=torch.bfloat16, device=DEV)
    out = torch.empty((B, 32, d), dtype=torch.bfloat16, device=DEV)
    lse = torch.empty((B, 32), dtype=torch.float32, device=DEV)

    def plan(lens):
        total, indptr, indices, last = naive.random_table(rng, lens, ps, spare_pages=max_pages - sum((n + ps - 1) // ps for n in lens))
        w.plan(indptr, indices, last, 32, 8, d, ps, q_data_type=torch.bfloat16)
        return indptr, indices, last

    plan([100] * B)
    w.run(q, (kc, vc), out=out, lse=lse)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, (kc, vc), out=out, lse=lse)
    for step, lens in enumerate([[5] * B, [1000, 1, 300, 7, 64, 900, 16, 2], [17, 0, 33, 1, 1, 500, 250, 129]]):
        indptr, indices, last = plan(lens)
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        for b in range(B):
            k, v = rows_of(kc, vc, indptr, indices, last, b, ps, "NHD")
            if k is None:
                assert torch.all(torch.isneginf(lse[b])), f"step {step}: empty request"
                continue
            torch.testing.assert_close(out[b:b + 1].double(), sdpa(q[b:b + 1], k, v, None, d**-0.5), rtol=2e-2, atol=2e-2, msg=f"step {step}, request {b}")
    with pytest.raises(attnforge.PlanError):
        plan([100] * (B + 1))  # over the capacity
    # A replay reads the cache it was captured on: a table past its pages is refused at plan.
    with pytest.raises(attnforge.TensorError, match="the graph was captured on holds 512 pages"):
        w.plan([0, 1], [600], [1], 32, 8, d, ps, q_data_type=torch.bfloat16)


def test_two_threads_on_two_streams():
    errors = []

    def worker(seed):
        try:
            s = torch.cuda.Stream()
            rng = np.random.default_rng(seed)
            w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
            with torch.cuda.stream(s):
                for it in range(10):
                    lens = list(rng.integers(1, 600, size=4))
                    total, indptr, indices, last = naive.random_table(rng, lens, 16)
                    kc, vc = cache(total, 16, 2, 64, torch.float16)
                    q = torch.randn((4, 8, 64), dtype=torch.float16, device=DEV)
                    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type="float16")
                    out = w.run(q, (kc, vc))
                    s.synchronize()
                    for b in range(4):
                        k, v = rows_of(kc, vc, indptr, indices, last, b, 16, "NHD")
                        torch.testing.assert_close(out[b:b + 1].double(), sdpa(q[b:b + 1], k, v, None, 0.125), rtol=5e-3, atol=5e-3)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["causal", "gemma2", "sink"])
def test_decode_with_a_shared_prefix_runs_as_a_cascade(dtype, variant):
    """32 requests share a 4096-token prefix (the same pages, as a prefix cache gives): the
    decode wrapper plans a cascade by itself; the result is the reference's and the same as with
    cascade=False."""
    rng = np.random.default_rng(3)
    ps, kvh, qh, d = 16, 2, 8, 128
    shared = list(range(1, 1 + 4096 // ps))
    nxt = 1 + len(shared)
    indptr, indices, last = [0], [], []
    for b in range(32):
        extra = int(rng.integers(1, 300))
        own = list(range(nxt, nxt + (extra + ps - 1) // ps))
        nxt += len(own)
        indices += shared + own
        indptr.append(len(indices))
        last.append(extra - (len(own) - 1) * ps)
    kc, vc = cache(nxt, ps, kvh, d, dtype)
    q = torch.randn((32, qh, d), dtype=dtype, device=DEV)
    params = {"sink": {"sinks": [0.5] * qh}, "gemma2": {"soft_cap": 30.0, "window": 1000}}.get(variant)
    outs = []
    for cascade in (True, False):
        w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", cascade=cascade)
        w.plan(indptr, indices, last, qh, kvh, d, ps, q_data_type=dtype, variant=variant, params=params)
        assert w.is_cascade == cascade
        outs.append(w.run(q, (kc, vc), return_lse=True))
    # Deterministic plans never cascade (the levels depend on the whole batch).
    det = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", deterministic=True)
    det.plan(indptr, indices, last, qh, kvh, d, ps, q_data_type=dtype, variant=variant, params=params)
    assert not det.is_cascade
    torch.cuda.synchronize()
    (o1, l1), (o2, l2) = outs
    torch.testing.assert_close(o1.float(), o2.float(), **tol(dtype))
    torch.testing.assert_close(l1, l2, rtol=1e-3, atol=1e-3)
    f32 = lambda t: t.float().cpu().numpy()  # noqa: E731
    want_o, want_lse = attnforge.reference(variant, f32(q), (f32(kc), f32(vc)), list(range(33)), indptr, indices, last, params=params)
    np.testing.assert_allclose(f32(o1), want_o, **tol(dtype))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(l1.cpu().numpy()[fin], want_lse[fin], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_device_merges_match_the_host_merge(dtype):
    g = torch.Generator(device="cpu").manual_seed(7)
    t, n, h, d = 37, 5, 4, 128
    v = torch.randn((t, n, h, d), generator=g).to(dtype)
    s = torch.empty((t, n, h)).uniform_(-20, 20, generator=g)
    s[torch.rand((t, n, h), generator=g) < 0.2] = float("-inf")
    s[3] = float("-inf")  # a row with no visible key anywhere
    v[torch.isinf(s)] = float("nan")  # never read
    s[5, 1, 2] = float("nan")
    want_v, want_s = attnforge.merge_states(v.double().numpy(), s.double().numpy())
    got_v, got_s = attnforge.merge_states(v.to(DEV), s.to(DEV))
    assert got_v.dtype == dtype and got_v.shape == (t, h, d) and got_s.dtype == torch.float32
    t_ = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got_v.double().cpu().numpy(), want_v, equal_nan=True, **t_)
    np.testing.assert_allclose(got_s.double().cpu().numpy(), want_s, equal_nan=True, rtol=1e-5, atol=1e-4)
    assert torch.all(got_v[3] == 0) and torch.all(torch.isneginf(got_s[3]))
    # The pair on strided views (states 0 and 2 of the same tensors), then in place with a mask.
    vd, sd = v.to(DEV), s.to(DEV)
    pv, ps = attnforge.merge_state(vd[:, 0], sd[:, 0], vd[:, 2], sd[:, 2])
    wv, ws = attnforge.merge_states(v[:, [0, 2]].double().numpy(), s[:, [0, 2]].double().numpy())
    np.testing.assert_allclose(pv.double().cpu().numpy(), wv, equal_nan=True, **t_)
    np.testing.assert_allclose(ps.double().cpu().numpy(), ws, equal_nan=True, rtol=1e-5, atol=1e-4)
    a_v, a_s = vd[:, 0].clone(), sd[:, 0].clone()
    mask = torch.rand(t, generator=g).to(DEV) < 0.5
    attnforge.merge_state_in_place(a_v, a_s, vd[:, 2], sd[:, 2], mask=mask)
    keep = mask.cpu().numpy()
    np.testing.assert_allclose(a_v[mask].double().cpu().numpy(), wv[keep], equal_nan=True, **t_)
    np.testing.assert_allclose(a_s[mask].double().cpu().numpy(), ws[keep], equal_nan=True, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.nan_to_num(a_s[~mask]), torch.nan_to_num(sd[:, 0][~mask]))
    untouched = ~mask
    assert torch.equal(torch.nan_to_num(a_v[untouched]), torch.nan_to_num(vd[:, 0][untouched]))
    # Bad arguments name themselves.
    with pytest.raises(attnforge.TensorError, match="s_a"):
        attnforge.merge_state(vd[:, 0], sd[:, 0].double(), vd[:, 2], sd[:, 2])
    with pytest.raises(attnforge.TensorError, match="v_b"):
        attnforge.merge_state(vd[:, 0], sd[:, 0], vd[:1, 2], sd[:, 2])
    with pytest.raises(attnforge.TensorError, match="last dim"):
        attnforge.merge_states(vd.transpose(2, 3), sd)


def test_a_device_merge_replays_in_a_cuda_graph():
    t, n, h, d = 16, 3, 2, 64
    v = torch.randn((t, n, h, d), device=DEV, dtype=torch.float16)
    s = torch.randn((t, n, h), device=DEV)
    out_v, out_s = torch.empty((t, h, d), device=DEV, dtype=torch.float16), torch.empty((t, h), device=DEV)
    attnforge.merge_states(v, s)  # compile outside the capture
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out_v.copy_(v[:, 0])
            out_s.copy_(s[:, 0])
            attnforge.merge_state_in_place(out_v, out_s, v[:, 1], s[:, 1])
    for _ in range(2):
        v.copy_(torch.randn_like(v))
        s.copy_(torch.randn_like(s))
        graph.replay()
        torch.cuda.synchronize()
        want_v, want_s = attnforge.merge_states(v[:, :2].double().cpu().numpy(), s[:, :2].double().cpu().numpy())
        np.testing.assert_allclose(out_v.double().cpu().numpy(), want_v, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(out_s.double().cpu().numpy(), want_s, rtol=1e-5, atol=1e-4)


def test_a_decode_cascade_replays_in_a_cuda_graph():
    """cascade=True in CUDA-graph mode: one graph captured on a step that shares a prefix replays
    steps that share one of another length, share nothing, and share again, each against SDPA."""
    B, ps, d, qh, kvh = 12, 16, 128, 16, 4
    max_pages = 2048
    kc, vc = cache(max_pages, ps, kvh, d, torch.bfloat16)
    # The table holds every request's entries, shared pages once per request (B x (500 + 40)).
    w = attnforge.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=B, max_pages=8192, cascade=True)
    rng = np.random.default_rng(8)
    q = torch.randn((B, qh, d), dtype=torch.bfloat16, device=DEV)
    out = torch.empty((B, qh, d), dtype=torch.bfloat16, device=DEV)
    lse = torch.empty((B, qh), dtype=torch.float32, device=DEV)

    def table(n, shared_pages):
        # Request b: the shared pages (if any), then its own 1-40 pages with a partial last one.
        pages = rng.permutation(max_pages).tolist()
        shared, pages = pages[:shared_pages], pages[shared_pages:]
        indptr, indices, last = [0], [], []
        for _ in range(n):
            own = int(rng.integers(1, 40))
            indices += shared + pages[:own]
            pages = pages[own:]
            indptr.append(len(indices))
            last.append(int(rng.integers(1, ps + 1)))
        return indptr, indices, last

    def plan(n, shared_pages):
        indptr, indices, last = table(n, shared_pages)
        w.plan(indptr, indices, last, qh, kvh, d, ps, q_data_type=torch.bfloat16)
        return indptr, indices, last

    plan(B, 256)
    assert w.is_cascade
    w.run(q, (kc, vc), out=out, lse=lse)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, (kc, vc), out=out, lse=lse)
    for step, (n, shared) in enumerate([(B, 256), (B, 64), (5, 0), (B, 500), (6, 256)]):
        indptr, indices, last = plan(n, shared)
        assert w.is_cascade == (shared > 0), f"step {step}"
        q.copy_(torch.randn_like(q))
        g.replay()
        torch.cuda.synchronize()
        for b in range(n):
            k, v = rows_of(kc, vc, indptr, indices, last, b, ps, "NHD")
            torch.testing.assert_close(out[b:b + 1].double(), sdpa(q[b:b + 1], k, v, None, d**-0.5), rtol=2e-2, atol=2e-2, msg=f"step {step}, request {b}")
