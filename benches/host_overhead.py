#!/usr/bin/env python3
"""Where the host time of a serving step goes: each call of one eager decode step timed alone,
for attnforge's Python package and FlashInfer 0.7.2, in the same process and call.

The shape is the serving loop's (benches/serving_loop.py) at low load: Llama-3-8B attention (32/8
heads, d 128, bf16, page 16, interleaved K/V), a decode batch of `--batch` requests of 150..450
tokens. Every figure is host wall time per call: 32 calls in a row (the 32 layers), the stream
synchronised before each group and not inside it, median over `--reps` groups. `gpu` is the
device time of the 32 decode launches (CUDA events), for scale.

Usage (device): PYTHONPATH=/tmp/afpy:/tmp/site python3 benches/host_overhead.py [--json F]
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

QO, KV, D, PAGE, LAYERS = 32, 8, 128, 16, 32
DEV, DT = torch.device("cuda"), torch.bfloat16


def per_call(fn, reps, calls=LAYERS):
    """Median host µs per call of `fn(i)`, i = 0..calls-1, over `reps` groups."""
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        ts.append((time.perf_counter() - t0) / calls)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--engines", default="attnforge,flashinfer")
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    lens = rng.integers(150, 450, args.batch)
    pages_per = (lens + PAGE - 1) // PAGE
    perm = rng.permutation(int(pages_per.sum()) + 1)[: int(pages_per.sum())]
    indptr = np.concatenate([[0], np.cumsum(pages_per)]).astype(np.int32)
    last = (lens - (pages_per - 1) * PAGE).astype(np.int32)
    t_indptr, t_indices, t_last = (torch.from_numpy(x.astype(np.int32)) for x in (indptr, perm, last))
    l_indptr, l_indices, l_last = indptr.tolist(), perm.astype(np.int32).tolist(), last.tolist()
    npages = int(perm.max()) + 1
    caches = torch.randn((LAYERS, npages, 2, PAGE, KV, D), dtype=DT, device=DEV) * 0.5
    b = args.batch
    q = torch.randn((b, QO, D), dtype=DT, device=DEV)
    o = torch.empty((b, QO, D), dtype=DT, device=DEV)
    lse = torch.empty((b, QO), dtype=torch.float32, device=DEV)
    qbuf, obuf, lbuf = (torch.empty((256,) + tuple(x.shape[1:]), dtype=x.dtype, device=DEV) for x in (q, o, lse))
    layer = [caches[i] for i in range(LAYERS)]
    res = {"batch": b, "kv_lens": lens.tolist()}
    res["slicing"] = per_call(lambda i: (qbuf[:b], caches[i], obuf[:b], lbuf[:b]), args.reps)
    res["torch.cuda.current_stream().cuda_stream"] = per_call(lambda i: torch.cuda.current_stream().cuda_stream, args.reps)
    res["torch._C._cuda_getCurrentRawStream"] = per_call(lambda i: torch._C._cuda_getCurrentRawStream(0), args.reps)
    if "attnforge" in args.engines:
        import attnforge as af

        w = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
        plan = lambda ip, ix, la: w.plan(ip, ix, la, QO, KV, D, PAGE, q_data_type=DT)  # noqa: E731
        plan(t_indptr, t_indices, t_last)
        w.run(q, layer[0], out=o, lse=lse)
        s = torch.cuda.current_stream().cuda_stream
        res["af plan (CPU tensors)"] = per_call(lambda i: plan(t_indptr, t_indices, t_last), args.reps // 4)
        res["af plan (lists)"] = per_call(lambda i: plan(l_indptr, l_indices, l_last), args.reps // 4)
        res["af plan (numpy)"] = per_call(lambda i: plan(indptr, perm, last), args.reps // 4)
        res["af run"] = per_call(lambda i: w.run(q, layer[i], out=o, lse=lse), args.reps)
        res["af run, stream="] = per_call(lambda i: w.run(q, layer[i], out=o, lse=lse, stream=s), args.reps)
        res["af _core.run"] = per_call(lambda i: w._core.run(q, layer[i], o, lse, s), args.reps)
        res["af run, out=None"] = per_call(lambda i: w.run(q, layer[i]), args.reps)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        torch.cuda.synchronize()
        ev[0].record()
        for i in range(LAYERS):
            w.run(q, layer[i], out=o, lse=lse)
        ev[1].record()
        torch.cuda.synchronize()
        res["af gpu (32 launches, µs each)"] = ev[0].elapsed_time(ev[1]) * 1e3 / LAYERS
        # A graph wrapper's plan (the serving loop's graph mode: capacity 16 requests, 2^17 pages).
        gw = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=16, max_pages=1 << 17)
        gplan = lambda: gw.plan(t_indptr, t_indices, t_last, QO, KV, D, PAGE, q_data_type=DT)  # noqa: E731
        gplan()
        gw.run(qbuf[:16], layer[0], out=obuf[:16], lse=lbuf[:16])  # graph mode: the capacity's rows
        res["af graph plan (CPU tensors)"] = per_call(lambda i: gplan(), args.reps // 4)
        gc = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=16, max_pages=1 << 17, cascade=True)
        gcplan = lambda: gc.plan(t_indptr, t_indices, t_last, QO, KV, D, PAGE, q_data_type=DT)  # noqa: E731
        gcplan()
        gc.run(qbuf[:16], layer[0], out=obuf[:16], lse=lbuf[:16])
        res["af graph plan, cascade=True (CPU tensors)"] = per_call(lambda i: gcplan(), args.reps // 4)
    if "flashinfer" in args.engines:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from flashinfer_decode import import_flashinfer

        fi, _ = import_flashinfer()
        fw = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=DEV), "NHD", use_tensor_cores=True)
        fplan = lambda: fw.plan(t_indptr, t_indices, t_last, QO, KV, D, PAGE, q_data_type=DT, kv_data_type=DT)  # noqa: E731
        fplan()
        fw.run(q, layer[0], out=o)
        res["fi plan (CPU tensors)"] = per_call(lambda i: fplan(), args.reps // 4)
        res["fi run"] = per_call(lambda i: fw.run(q, layer[i], out=o), args.reps)
        try:
            res["fi run, return_lse"] = per_call(lambda i: fw.run(q, layer[i], out=o, lse=lse, return_lse=True), args.reps)
        except Exception as e:  # a signature this version lacks must not lose the rest
            res["fi run, return_lse"] = f"failed: {e}"
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        torch.cuda.synchronize()
        ev[0].record()
        for i in range(LAYERS):
            fw.run(q, layer[i], out=o)
        ev[1].record()
        torch.cuda.synchronize()
        res["fi gpu (32 launches, µs each)"] = ev[0].elapsed_time(ev[1]) * 1e3 / LAYERS
        i32 = lambda n: torch.empty(n, dtype=torch.int32, device=DEV)  # noqa: E731
        gfw = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=DEV), "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=i32(b + 1), paged_kv_indices_buffer=i32(1 << 17), paged_kv_last_page_len_buffer=i32(b))
        gfplan = lambda: gfw.plan(t_indptr, t_indices, t_last, QO, KV, D, PAGE, q_data_type=DT, kv_data_type=DT)  # noqa: E731
        gfplan()
        res["fi graph plan (CPU tensors)"] = per_call(lambda i: gfplan(), args.reps // 4)
    print("| call | host µs per call |\n|---|---|")
    for k, v in res.items():
        if isinstance(v, float):
            print(f"| {k} | {v:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
