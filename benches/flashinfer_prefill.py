#!/usr/bin/env python3
"""FlashInfer 0.7.2's batch prefill timed the way `attnforge bench --suite prefill` times ours.

`BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD", backend="fa3")` (its Hopper
kernels; `--fa2` for backend="fa2"), planned once per shape from host (CPU) index arrays, then
`run` with `out=` given. bf16 q/kv/o, page 16, NHD interleaved K/V (one `[pages, 2, 16, kv, d]`
tensor), pages permuted (a seeded shuffle, as attnforge's bench), random data. Timing: CUDA
events, two warm-up `run`s (the first also JIT-compiles), then the median of 7 timings of 3
back-to-back `run`s, per call, as attnforge's bench does ("median of 7 x 3 launches").
Each shape is first checked against torch (f32) on a few query rows of request 0.

FLOPs for TFLOP/s: sum over requests of 4 * qo_heads * d * visible (q, k) pairs; causal, with the
q_len queries at the end of kv_len keys: sum_{i<q_len} (kv_len - q_len + i + 1); non-causal:
q_len * kv_len.

Shapes (names as `attnforge bench --suite prefill` where it has them): single 4096 / 16384 MHA 32,
batch 16 x 2048 32/8, skewed 16384 + 32 x 512 32/8, append q8 kv4096 B64 32/8 (µs is the number
there), non-causal 16384 MHA 32, soft cap 30 causal 16384, and d 64 / d 256 at 16384 32/8. A shape
FlashInfer rejects (plan or first run raises) is reported as unsupported and skipped.

The first use of each fa3 kernel variant JIT-compiles (80+ s each on 16 cores with MAX_JOBS=16):
here one for d 128 (causal and non-causal share it), one for the soft cap, one for d 64 and one
for d 256 - about 6 minutes cold; `--only` splits the work over calls. Progress is printed before
each shape, so a timeout says which one it was in.

Run in the same device call as `attnforge bench --suite prefill` (BENCHMARKS.md, "against
FlashInfer on the same card": FlashInfer trimmed under .whl/ by benches/fetch-flashinfer.sh,
untarred into /tmp/site with the apache-tvm-ffi wheel):

Usage (device): PYTHONPATH=/tmp/site MAX_JOBS=16 python3 benches/flashinfer_prefill.py --json out.json
                [--only NAME_SUBSTRING ...] [--fa2]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashinfer_cascade import timed  # noqa: E402  (CUDA-event median, shared with the cascade script)

PAGE = 16
DEV, DT = torch.device("cuda"), torch.bfloat16


def shapes():
    """(name, [(q_len, kv_len) per request], qo heads, kv heads, head dim, causal, soft cap)."""
    skewed = [(16384, 16384)] + [(512, 512)] * 32
    return [
        ("single 4096, MHA 32", [(4096, 4096)], 32, 32, 128, True, None),
        ("single 16384, MHA 32", [(16384, 16384)], 32, 32, 128, True, None),
        ("batch 16 x 2048, 32/8", [(2048, 2048)] * 16, 32, 8, 128, True, None),
        ("skewed 16384 + 32 x 512, 32/8", skewed, 32, 8, 128, True, None),
        ("append q8 kv4096 B64, 32/8", [(8, 4096)] * 64, 32, 8, 128, True, None),
        ("non-causal 16384, MHA 32", [(16384, 16384)], 32, 32, 128, False, None),
        ("soft cap 30, causal 16384", [(16384, 16384)], 32, 32, 128, True, 30.0),
        ("single 16384 d64, 32/8", [(16384, 16384)], 32, 8, 64, True, None),
        ("single 16384 d256, 32/8", [(16384, 16384)], 32, 8, 256, True, None),
    ]


def flops(lens, qo_heads, d, causal):
    if causal:
        visible = sum(sum(kv - q + i + 1 for i in range(q)) for q, kv in lens)
    else:
        visible = sum(q * kv for q, kv in lens)
    return 4.0 * qo_heads * d * visible


def reference(q, cache, pages, q_len, kv_len, kv_heads, d, causal, cap, rows):
    """f32 attention of request 0's query rows `rows` (q [q_len, QO, d]) over its pages, in torch."""
    qo = q.shape[1]
    k = cache[pages.long(), 0].reshape(-1, kv_heads, d)[:kv_len].float()
    v = cache[pages.long(), 1].reshape(-1, kv_heads, d)[:kv_len].float()
    g = qo // kv_heads
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("rhd,nhd->hrn", q[rows].float(), k) / d**0.5
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if causal:
        # Query i (of q_len, at the end of kv_len keys) sees keys < kv_len - q_len + i + 1.
        lim = (kv_len - q_len + rows + 1).view(1, -1, 1)
        s = s.masked_fill(torch.arange(kv_len, device=s.device).view(1, 1, -1) >= lim, float("-inf"))
    return torch.einsum("hrn,nhd->rhd", torch.softmax(s, dim=-1), v)


def bench_shape(fi, ws, backend, lens, qo_heads, kv_heads, d, causal, cap):
    """Plans, checks and times one shape; raises `Unsupported` if FlashInfer rejects it."""
    n_pages = [-(-kv // PAGE) for _, kv in lens]
    total_pages = sum(n_pages)
    total_q = sum(q for q, _ in lens)
    gen = torch.Generator(device=DEV).manual_seed(2)
    cache = torch.empty(total_pages, 2, PAGE, kv_heads, d, dtype=DT, device=DEV).uniform_(-1, 1, generator=gen)
    q = torch.empty(total_q, qo_heads, d, dtype=DT, device=DEV).uniform_(-1, 1, generator=gen)
    out = torch.empty_like(q)
    # Host index arrays: each request's pages taken in order from one seeded permutation.
    order = torch.randperm(total_pages, generator=torch.Generator().manual_seed(2)).to(torch.int32)
    qo_indptr, kv_indptr, last = [0], [0], []
    for (ql, kv), np_ in zip(lens, n_pages):
        qo_indptr.append(qo_indptr[-1] + ql)
        kv_indptr.append(kv_indptr[-1] + np_)
        last.append(kv - (np_ - 1) * PAGE)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    kw = dict(causal=causal, q_data_type=DT, kv_data_type=DT)
    if cap is not None:
        kw["logits_soft_cap"] = cap
    try:
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout="NHD", backend=backend)
        w.plan(i32(qo_indptr), i32(kv_indptr), order, i32(last), qo_heads, kv_heads, d, PAGE, **kw)
        w.run(q, cache, out=out)
        torch.cuda.synchronize()
    except Exception as e:  # a shape or variant this backend does not build or accept
        raise Unsupported(f"{type(e).__name__}: {e}") from e
    # Check request 0 on its first and last 16 query rows (all of them for a short request).
    q0, kv0 = lens[0]
    rows = torch.unique(torch.cat([torch.arange(min(16, q0)), torch.arange(max(0, q0 - 16), q0)])).to(DEV)
    ref = reference(q[:q0], cache, order[: n_pages[0]].to(DEV), q0, kv0, kv_heads, d, causal, cap, rows)
    got = out[:q0][rows].float()
    err = ((got - ref).norm() / ref.norm()).item()
    del ref, got
    if not err < 2e-2:
        raise RuntimeError(f"FlashInfer output differs from torch (relative L2 {err:.3g})")
    us = timed(lambda: w.run(q, cache, out=out), 3)  # as attnforge's bench: 7 × 3 launches
    return us, err


class Unsupported(Exception):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", metavar="PATH", help="write the rows (name, us, tflops, ...) as a JSON list")
    ap.add_argument("--only", action="append", default=[], metavar="NAME_SUBSTRING",
                    help="run only the shapes whose name contains this (repeatable), e.g. '16384'")
    ap.add_argument("--fa2", action="store_true", help='backend="fa2" instead of "fa3"')
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flashinfer_decode import import_flashinfer

    fi, stubbed = import_flashinfer()
    backend = "fa2" if args.fa2 else "fa3"
    card = torch.cuda.get_device_name()
    print(f"card: {card}; flashinfer {fi.__version__}; backend {backend}; stubbed modules: {stubbed or 'none'}", flush=True)
    print("prefill: bf16, page 16, NHD, permuted pages; CUDA events, median of 7 x 3 launches after 2 warm-up", flush=True)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    todo = [s for s in shapes() if not args.only or any(o in s[0] for o in args.only)]
    rows = []
    for i, (name, lens, qo_heads, kv_heads, d, causal, cap) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}: plan + first run (a new {backend} kernel variant JIT-compiles, 80+ s) ...", flush=True)
        t0 = time.time()
        try:
            us, err = bench_shape(fi, ws, backend, lens, qo_heads, kv_heads, d, causal, cap)
        except Unsupported as e:
            print(f"  {name:34} FlashInfer {fi.__version__} ({backend}) does not support this shape: {e}", flush=True)
            rows.append(dict(name=name, us=None, tflops=None, backend=backend, unsupported=str(e)))
            continue
        except Exception as e:  # report and go on: one shape's failure is a result too
            print(f"  {name:34} FAILED {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            torch.cuda.empty_cache()
        tf = flops(lens, qo_heads, d, causal) / (us * 1e-6) / 1e12
        rows.append(dict(name=name, us=us, tflops=tf, backend=backend, flashinfer=fi.__version__, card=card,
                         qo_heads=qo_heads, kv_heads=kv_heads, head_dim=d, causal=causal, logits_soft_cap=cap,
                         requests=len(lens), check_rel_l2=err))
        print(f"  {name:34} {us:10.1f} µs {tf:8.1f} TFLOP/s  (check {err:.1e}, {time.time() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
