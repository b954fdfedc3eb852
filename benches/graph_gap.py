#!/usr/bin/env python3
"""Why the serving loop's graph mode can be slower than its eager mode for attnforge's decode
(BENCHMARKS.md, issue 16): one decode step of the loop's shape (Llama-3-8B attention, 32 layers,
32/8 heads, d 128, bf16, page 16; `--batch` requests of 150..1200 tokens, permuted pages) timed
as wall time from the first call to the end of the GPU work, median of `--reps`, for

- eager: `plan` + 32 x `run`;
- graph, exact: a graph wrapper of capacity `batch`, 32 runs captured, `plan` + replay;
- graph, bucket: capacity `--bucket`, the batch padded to it with one-token requests on a
  reserved page (as the loop pads), `plan` + replay;
- graph, bucket unpadded (attnforge only): capacity `--bucket`, the batch as it is.

FlashInfer 0.7.2 (tensor-core decode) runs eager, graph exact and graph bucket in the same call.

Usage (device): PYTHONPATH=/tmp/afpy:/tmp/site python3 benches/graph_gap.py [--batch 40 --bucket 64]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

QO, KV, D, PAGE, LAYERS = 32, 8, 128, 16, 32
DEV, DT = torch.device("cuda"), torch.bfloat16


def wall(fn, reps):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--bucket", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--engines", default="attnforge,flashinfer")
    args = ap.parse_args()
    b, bb = args.batch, args.bucket
    rng = np.random.default_rng(3)
    lens = rng.integers(150, 1200, b)
    per = (lens + PAGE - 1) // PAGE
    pages = 1 + rng.permutation(int(per.sum()))  # page 0: the padding requests'
    npages = int(pages.max()) + 1

    def tables(pad):
        indptr = np.concatenate([[0], np.cumsum(per)]).tolist()
        indices = pages.tolist()
        last = (lens - (per - 1) * PAGE).tolist()
        for _ in range(pad):
            indices.append(0)
            indptr.append(len(indices))
            last.append(1)
        return tuple(torch.tensor(x, dtype=torch.int32) for x in (indptr, indices, last))

    caches = torch.randn((LAYERS, npages, 2, PAGE, KV, D), dtype=DT, device=DEV) * 0.5
    q = torch.randn((bb, QO, D), dtype=DT, device=DEV)
    o = torch.empty((bb, QO, D), dtype=DT, device=DEV)
    lse = torch.empty((bb, QO), dtype=torch.float32, device=DEV)
    print(f"batch {b} (kv {lens.min()}..{lens.max()}, mean {lens.mean():.0f}), bucket {bb}, {LAYERS} layers; wall µs per step, median of {args.reps}")

    def graph_case(name, w, plan, n, run):
        plan()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for l in range(LAYERS):
                run(w, q[:n], caches[l], o[:n], lse[:n])
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for l in range(LAYERS):
                run(w, q[:n], caches[l], o[:n], lse[:n])

        def step():
            plan()
            g.replay()

        print(f"  {name}: {wall(step, args.reps):.0f}", flush=True)

    if "attnforge" in args.engines:
        import attnforge as af

        run = lambda w, q_, c, o_, l_: w.run(q_, c, out=o_, lse=l_)  # noqa: E731
        pl = lambda w, t: (lambda: w.plan(*t, QO, KV, D, PAGE, q_data_type=DT))  # noqa: E731
        w = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
        t = tables(0)

        def eager():
            w.plan(*t, QO, KV, D, PAGE, q_data_type=DT)
            for l in range(LAYERS):
                run(w, q[:b], caches[l], o[:b], lse[:b])

        eager()
        print(f"  attnforge eager: {wall(eager, args.reps):.0f}", flush=True)
        ge = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=b, max_pages=1 << 17)
        graph_case("attnforge graph exact", ge, pl(ge, t), b, run)
        gb = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=bb, max_pages=1 << 17)
        graph_case("attnforge graph bucket, padded", gb, pl(gb, tables(bb - b)), bb, run)
        gu = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=bb, max_pages=1 << 17)
        graph_case("attnforge graph bucket, unpadded", gu, pl(gu, t), bb, run)
    if "flashinfer" in args.engines:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from flashinfer_decode import import_flashinfer

        fi, _ = import_flashinfer()
        run = lambda w, q_, c, o_, l_: w.run(q_, c, out=o_)  # noqa: E731
        i32 = lambda n: torch.empty(n, dtype=torch.int32, device=DEV)  # noqa: E731
        ws = lambda: torch.empty(256 << 20, dtype=torch.uint8, device=DEV)  # noqa: E731
        pl = lambda w, t: (lambda: w.plan(*t, QO, KV, D, PAGE, q_data_type=DT, kv_data_type=DT))  # noqa: E731
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws(), "NHD", use_tensor_cores=True)
        t = tables(0)

        def feager():
            w.plan(*t, QO, KV, D, PAGE, q_data_type=DT, kv_data_type=DT)
            for l in range(LAYERS):
                run(w, q[:b], caches[l], o[:b], None)

        feager()
        print(f"  flashinfer eager: {wall(feager, args.reps):.0f}", flush=True)
        for name, n, pad in [("exact", b, 0), ("bucket, padded", bb, bb - b)]:
            g = fi.BatchDecodeWithPagedKVCacheWrapper(ws(), "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=i32(n + 1), paged_kv_indices_buffer=i32(1 << 17), paged_kv_last_page_len_buffer=i32(n))
            graph_case(f"flashinfer graph {name}", g, pl(g, tables(pad)), n, run)


if __name__ == "__main__":
    main()
