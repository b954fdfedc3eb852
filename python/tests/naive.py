"""A NumPy attention written for the tests, independent of attnforge: paged K/V gathered by
hand, the variants' formulas spelled out, float64 throughout."""

import numpy as np


def random_table(rng, kv_lens, page_size, spare_pages=3):
    """A page table for requests of ``kv_lens`` tokens over permuted pages (plus unused ones)."""
    counts = [(n + page_size - 1) // page_size for n in kv_lens]
    total = sum(counts) + spare_pages
    perm = rng.permutation(total)
    indptr = np.zeros(len(kv_lens) + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(counts)
    indices = perm[: indptr[-1]].astype(np.int32)
    last = np.array([(n - (c - 1) * page_size) if c else 0 for n, c in zip(kv_lens, counts)], dtype=np.int32)
    return total, indptr, indices, last


def gather(cache_k, cache_v, indptr, indices, kv_len, b, page_size, layout="NHD"):
    """Keys and values of request ``b`` as ``(kv_len, heads, dim)`` float64."""
    pages = indices[indptr[b]:indptr[b + 1]]
    ks, vs = [], []
    for p in pages:
        k, v = cache_k[p], cache_v[p]
        if layout == "HND":
            k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        ks.append(k)
        vs.append(v)
    if not ks:
        h, d = cache_k.shape[2 if layout == "NHD" else 1], cache_k.shape[3]
        return np.zeros((0, h, d)), np.zeros((0, h, cache_v.shape[3]))
    return np.concatenate(ks)[:kv_len].astype(np.float64), np.concatenate(vs)[:kv_len].astype(np.float64)


def attention(kind, q, cache_k, cache_v, qo_indptr, indptr, indices, last, page_size, params=None, sm_scale=None, layout="NHD"):
    """``(o, lse)`` float64 for variant ``kind`` in {default, causal, soft_cap, sliding_window,
    gemma2, alibi}; a request's queries are the last ``q_len`` of its ``kv_len`` positions."""
    params = params or {}
    total_q, qo_heads, d = q.shape
    kv_heads = cache_k.shape[2 if layout == "NHD" else 1]
    group = qo_heads // kv_heads
    scale = sm_scale if sm_scale is not None else 1.0 / np.sqrt(d)
    dv = cache_v.shape[3]
    o = np.zeros((total_q, qo_heads, dv))
    lse = np.full((total_q, qo_heads), -np.inf)
    for b in range(len(qo_indptr) - 1):
        n_pages = indptr[b + 1] - indptr[b]
        kv_len = 0 if n_pages == 0 else (n_pages - 1) * page_size + last[b]
        k, v = gather(cache_k, cache_v, indptr, indices, kv_len, b, page_size, layout)
        q_len = qo_indptr[b + 1] - qo_indptr[b]
        for i in range(q_len):
            row = qo_indptr[b] + i
            q_pos = kv_len - q_len + i
            kv_pos = np.arange(kv_len)
            for h in range(qo_heads):
                s = k[:, h // group, :] @ q[row, h].astype(np.float64)
                x = s * scale
                visible = np.ones(kv_len, dtype=bool)
                if kind != "default":
                    visible &= kv_pos <= q_pos
                if kind in ("soft_cap", "gemma2"):
                    cap = params.get("soft_cap", 30.0 if kind == "soft_cap" else 50.0)
                    x = cap * np.tanh(s * scale / cap)
                if kind in ("sliding_window", "gemma2"):
                    visible &= q_pos - kv_pos < params.get("window", 4096)
                if kind == "alibi":
                    x = x - params["slopes"][h] * (q_pos - kv_pos)
                if not visible.any():
                    continue
                x = np.where(visible, x, -np.inf)
                m = x.max()
                w = np.exp(x - m)
                lse[row, h] = m + np.log(w.sum())
                o[row, h] = (w / w.sum()) @ v[:, h // group, :]
    return o, lse
