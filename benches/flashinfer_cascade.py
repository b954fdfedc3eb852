#!/usr/bin/env python3
"""FlashInfer 0.7.2 on `attnforge bench --suite cascade`'s shapes, timed the same way (CUDA
events, median of 7 runs of 10 back-to-back steps), for a same-call comparison: plain decode
(`BatchDecodeWithPagedKVCacheWrapper`, tensor cores) and the two-level cascade
(`MultiLevelCascadeAttentionWrapper`: level 0 the shared prompt for all queries, level 1 each
request's own pages). causal, bf16, 32/8 heads, d 128, page 16, NHD interleaved K/V. The shapes
(lengths drawn with the same seed) are read from the attnforge JSON (`--from`), so both engines
time the same batches.

Usage (device): PYTHONPATH=/tmp/site python3 benches/flashinfer_cascade.py --from ours.json [--json fi.json]
"""
import argparse
import json
import os
import statistics
import sys

import torch

QO, KV, D, PAGE = 32, 8, 128, 16
DEV, DT = torch.device("cuda"), torch.bfloat16


def timed(fn, per=10):
    """µs per call: two warm-up calls, then the median of 7 CUDA-event timings of `per` calls."""
    fn()
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(7):
        start.record()
        for _ in range(per):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / per)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flashinfer_decode import import_flashinfer

    fi, stubbed = import_flashinfer()
    print(f"flashinfer {fi.__version__} (stubbed: {stubbed})", flush=True)
    shapes = [r for r in json.load(open(args.src))["results"] if r["suite"] == "cascade"]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEV)  # noqa: E731
    out = []
    for s in shapes:
        prefix, suffix = s["prefix"], s["suffix"]
        n, shared = len(suffix), prefix // PAGE
        own_pages, nxt = [], shared
        for x in suffix:
            k = (shared * PAGE + x + PAGE - 1) // PAGE - shared
            own_pages.append(list(range(nxt, nxt + k)))
            nxt += k
        cache = torch.randn((max(nxt, 1), 2, PAGE, KV, D), dtype=DT, device=DEV) * 0.5
        q = torch.randn((n, QO, D), dtype=DT, device=DEV)
        o = torch.empty_like(q)
        # Plain: every request's whole table.
        indptr, indices, last = [0], [], []
        for x, own in zip(suffix, own_pages):
            length = shared * PAGE + x
            indices += list(range(shared)) + own
            indptr.append(len(indices))
            last.append(length - ((length + PAGE - 1) // PAGE - 1) * PAGE)
        ws = torch.empty(512 << 20, dtype=torch.uint8, device=DEV)
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        w.plan(i32(indptr), i32(indices), i32(last), QO, KV, D, PAGE, q_data_type=DT, kv_data_type=DT)
        plain = timed(lambda: w.run(q, cache, out=o))
        ref = o.clone()
        # Two levels: the prompt's full pages for all n queries; then each request's own pages
        # (its partial last page included; a request whose tokens are all shared has none).
        c = fi.MultiLevelCascadeAttentionWrapper(2, torch.empty(512 << 20, dtype=torch.uint8, device=DEV), "NHD")
        qo = [i32([0, n]), i32(list(range(n + 1)))]
        kv_indptr = [i32([0, shared]), None]
        kv_indices = [i32(list(range(shared))), None]
        kv_last = [i32([PAGE]), None]
        ip, ix, la = [0], [], []
        for x, own in zip(suffix, own_pages):
            ix += own
            ip.append(len(ix))
            la.append(x - (len(own) - 1) * PAGE if own else 0)
        kv_indptr[1], kv_indices[1], kv_last[1] = i32(ip), i32(ix), i32(la)
        row = dict(workload=s["workload"], flashinfer_plain_us=plain)
        try:
            c.plan(qo, kv_indptr, kv_indices, kv_last, QO, KV, D, PAGE, causal=True, q_data_type=DT, kv_data_type=DT)
            row["flashinfer_cascade_us"] = timed(lambda: c.run(q, cache))
            got = c.run(q, cache)
            row["max_abs_diff_vs_plain"] = float((got.float() - ref.float()).abs().max())
        except Exception as e:  # record and go on
            row["flashinfer_cascade_error"] = f"{type(e).__name__}: {e}"
        row.update(attnforge_plain_us=s["plain_us"], attnforge_cascade_us=s["cascade_us"])
        print(json.dumps(row), flush=True)
        out.append(row)
    print("\n| workload | FI plain µs | FI cascade µs | attnforge plain µs | attnforge cascade µs | ours vs FI cascade |")
    print("|---|---|---|---|---|---|")
    for r in out:
        fc = r.get("flashinfer_cascade_us")
        ratio = f"{fc / r['attnforge_cascade_us']:.2f}×" if fc else "—"
        print(f"| {r['workload']} | {r['flashinfer_plain_us']:.1f} | {fc if fc is None else round(fc, 1)} | {r['attnforge_plain_us']:.1f} | {r['attnforge_cascade_us']:.1f} | {ratio} |")
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
