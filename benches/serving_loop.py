#!/usr/bin/env python3
"""Serving-loop benchmark: the attention of a continuously batched Llama-3-8B-shaped model,
driven through attnforge's Python package and through FlashInfer 0.7.2 by the same loop (same
requests, same batches, same paged cache, same page tables).

Model: 32 layers, 32 query / 8 KV heads, head dim 128, bf16, pages of 16 tokens, NHD, K and V
interleaved per page (`[pages, 2, 16, 8, 128]` per layer). Attention only: no weights.

Workload (seeded): requests arrive as a Poisson process of `rate` requests per step; prompt and
output lengths are log-normal, ShareGPT-like -- prompt median 245 tokens (sigma 0.9, clipped to
16..2048), output median 150 tokens (sigma 0.8, clipped to 8..1024). Each step:

1. admits arrivals, allocates pages, and appends the step's new K/V for all 32 layers (one
   indexed write, the same for both engines and outside the timing);
2. one `plan` of the decode batch (every request past its prompt, one token each) and, when
   prompts are waiting, one `plan` of a chunked-prefill batch (at most 512 prompt tokens a step,
   FIFO, a prompt may span steps);
3. 32 layers x (`run` prefill, `run` decode), each layer over its own cache.

Timed per step, from the first `plan` until the GPU has finished the last layer (host wall
clock, the stream synchronised at the end): this is the attention share of the inter-token
latency (ITL). Reported: median and p99 of it, attention time per generated token, and host
overhead (plan calls plus launch calls, measured on the host before the synchronisation).

Modes: eager (plan + 32 x run per step), and graph -- the 32 decode layers captured once per
batch-size bucket (1, 2, 4, ... 256; the batch padded to the bucket with one-token requests on a
reserved page, identically for both engines), `plan` between replays; prefill stays eager in both
(as serving engines run it). Captures happen on a bucket's first use and those steps are left out.

Scenarios: `llama` (causal), `gemma2` (Gemma-2 local layers: soft cap 50, window 4096), and
`prefix` (every request starts with the same 4096-token system prompt, whose pages all requests
share, as a radix cache gives; its prefill is not repeated). attnforge's decode wrappers find the
shared prefix and run it as a decode cascade, eager and (`cascade=True`) under graphs; FlashInfer's
decode wrapper reads it once per request.

Usage (device): PYTHONPATH=/tmp/site:python-build python3 benches/serving_loop.py --json out.json
  [--engines attnforge,flashinfer] [--modes eager,graph] [--scenarios llama,gemma2,prefix]
  [--rates 0.05,0.2,0.6] [--steps 300] [--warmup 150] [--budget-s S]

A configuration that fails (an error from either engine) is recorded as failed and the rest run.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

LAYERS, QO, KV, D, PAGE = 32, 32, 8, 128, 16
PREFILL_BUDGET = 512
BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# Page-table entries a graph wrapper holds (shared prefix pages count once per request).
GRAPH_INDICES = 1 << 17
DEV = torch.device("cuda")
DT = torch.bfloat16


class Request:
    __slots__ = ("rid", "prompt", "output", "prefilled", "generated", "pages", "shared")

    def __init__(self, rid, prompt, output, shared=0):
        self.rid, self.prompt, self.output = rid, prompt, output
        self.prefilled, self.generated, self.pages, self.shared = 0, 0, [], shared

    def kv_len(self):
        return self.shared + self.prefilled + self.generated


def workload(seed, rate, steps):
    """Arrivals per step and each request's (prompt, output) lengths."""
    rng = np.random.default_rng(seed)
    arrivals = rng.poisson(rate, size=steps)
    n = int(arrivals.sum()) + 1
    prompts = np.clip(np.round(np.exp(rng.normal(math.log(245), 0.9, n))), 16, 2048).astype(int)
    outputs = np.clip(np.round(np.exp(rng.normal(math.log(150), 0.8, n))), 8, 1024).astype(int)
    return arrivals, list(zip(prompts.tolist(), outputs.tolist()))


class Pool:
    def __init__(self, pages, reserved):
        self.free = list(range(pages - 1, reserved - 1, -1))

    def take(self):
        if not self.free:
            raise RuntimeError("out of KV pages: raise --pages")
        return self.free.pop()

    def give(self, ps):
        self.free.extend(ps)


class Sim:
    """The scheduler: the same decisions whatever engine runs the attention."""

    def __init__(self, args, rate, scenario):
        self.arrivals, self.lengths = workload(args.seed, rate, args.warmup + args.steps)
        self.shared = 4096 if scenario == "prefix" else 0
        shared_pages = self.shared // PAGE
        # Page 0: the padding requests' page; then the shared prefix's pages.
        self.prefix_pages = list(range(1, 1 + shared_pages))
        self.pool = Pool(args.pages, 1 + shared_pages)
        self.waiting, self.running, self.next = [], [], 0

    def step(self, t):
        for _ in range(int(self.arrivals[t])):
            p, o = self.lengths[self.next]
            r = Request(self.next, p, o, self.shared)
            r.pages = list(self.prefix_pages)
            self.waiting.append(r)
            self.next += 1
        # Decode: every running request gets one token.
        new_tokens = []  # (page, slot) of every K/V row appended this step
        decode = [r for r in self.running]
        for r in decode:
            pos = r.kv_len()
            if pos % PAGE == 0:
                r.pages.append(self.pool.take())
            new_tokens.append((r.pages[pos // PAGE], pos % PAGE))
            r.generated += 1
        # Chunked prefill, FIFO, within the budget.
        prefill, budget = [], PREFILL_BUDGET
        for r in self.waiting:
            if budget == 0:
                break
            n = min(budget, r.prompt - r.prefilled)
            for i in range(n):
                pos = r.kv_len() + i
                if pos % PAGE == 0:
                    r.pages.append(self.pool.take())
                new_tokens.append((r.pages[pos // PAGE], pos % PAGE))
            r.prefilled += n
            prefill.append((r, n))
            budget -= n
        return decode, prefill, new_tokens

    def finish_step(self, decode, prefill):
        for r, _ in prefill:
            if r.prefilled == r.prompt:
                self.waiting.remove(r)
                self.running.append(r)
        done = [r for r in decode if r.generated >= r.output]
        for r in done:
            self.running.remove(r)
            self.pool.give(r.pages[len(self.prefix_pages):])


def table(reqs, pad_to=None):
    indptr, indices, last = [0], [], []
    for r in reqs:
        n = r.kv_len()
        np_ = (n + PAGE - 1) // PAGE
        indices.extend(r.pages[:np_])
        indptr.append(len(indices))
        last.append(n - (np_ - 1) * PAGE)
    if pad_to is not None:
        for _ in range(pad_to - len(reqs)):
            indices.append(0)
            indptr.append(len(indices))
            last.append(1)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return i32(indptr), i32(indices), i32(last)


def bucket(n):
    for b in BUCKETS:
        if n <= b:
            return b
    raise RuntimeError(f"batch {n} over the largest bucket")


class AttnForge:
    name = "attnforge"

    def __init__(self, af, scenario, max_pages):
        self.af, self.max_pages = af, max_pages
        # Under graphs the decode cascade is opt-in (each replay pays an idle prefill launch);
        # the prefix scenario turns it on, as a serving engine with a radix cache would.
        self.cascade = scenario == "prefix"
        self.variant, self.params = ("gemma2", {"soft_cap": 50.0, "window": 4096}) if scenario == "gemma2" else ("causal", None)
        self.decode = af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD")
        self.prefill = af.BatchPrefillWithPagedKVCacheWrapper(None, "NHD")
        self.graphs = {}

    def plan_decode(self, w, t):
        w.plan(t[0], t[1], t[2], QO, KV, D, PAGE, q_data_type=DT, variant=self.variant, params=self.params)

    def plan_prefill(self, qo, t):
        self.prefill.plan(qo, t[0], t[1], t[2], QO, KV, D, PAGE, q_data_type=DT, variant=self.variant, params=self.params)

    def run(self, w, q, cache, out, lse):
        w.run(q, cache, out=out, lse=lse)

    def graph_wrapper(self, b):
        return self.af.BatchDecodeWithPagedKVCacheWrapper(None, "NHD", use_cuda_graph=True, max_batch_size=b, max_pages=GRAPH_INDICES, cascade=self.cascade)


class FlashInfer:
    name = "flashinfer"

    def __init__(self, fi, scenario, max_pages):
        self.fi, self.max_pages = fi, max_pages
        self.kw = dict(logits_soft_cap=50.0, window_left=4095) if scenario == "gemma2" else {}
        self.ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
        self.decode = fi.BatchDecodeWithPagedKVCacheWrapper(self.ws, "NHD", use_tensor_cores=True)
        self.prefill_backend = os.environ.get("FI_PREFILL_BACKEND", "fa3")
        self.prefill = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=DEV), "NHD", backend=self.prefill_backend)
        self.graphs = {}

    def plan_decode(self, w, t):
        w.plan(t[0], t[1], t[2], QO, KV, D, PAGE, q_data_type=DT, kv_data_type=DT, **self.kw)

    def plan_prefill(self, qo, t):
        self.prefill.plan(qo, t[0], t[1], t[2], QO, KV, D, PAGE, causal=True, q_data_type=DT, kv_data_type=DT, **self.kw)

    def run(self, w, q, cache, out, lse):
        w.run(q, cache, out=out)

    def graph_wrapper(self, b):
        i32 = lambda n: torch.empty(n, dtype=torch.int32, device=DEV)  # noqa: E731
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=i32(b + 1), paged_kv_indices_buffer=i32(GRAPH_INDICES), paged_kv_last_page_len_buffer=i32(b))


def run_loop(engine, args, scenario, rate, mode, caches, qbuf, obuf, lbuf):
    sim = Sim(args, rate, scenario)
    gen = torch.Generator(device=DEV).manual_seed(args.seed)  # the same K/V for every engine
    kv_src = torch.randn((LAYERS, 4096, 2, KV, D), dtype=DT, device=DEV, generator=gen) * 0.5
    rows = []
    torch.cuda.synchronize()
    for t in range(args.warmup + args.steps):
        decode, prefill, new = sim.step(t)
        if new:
            p = torch.tensor([x[0] for x in new], device=DEV)
            s = torch.tensor([x[1] for x in new], device=DEV)
            n = len(new)
            src = kv_src[:, torch.arange(n, device=DEV) % kv_src.shape[1]]  # [L, n, 2, KV, D]
            caches[:, p, :, s] = src.permute(1, 0, 2, 3, 4)
        captured = False
        tables = None
        if decode:
            b = len(decode)
            if mode == "graph":
                bb = bucket(b)
                tables = table(decode, pad_to=bb)
            else:
                tables = table(decode)
        if prefill:
            qo = [0]
            for r, n in prefill:
                qo.append(qo[-1] + n)
            ptables = table([r for r, _ in prefill])
            qo_t = torch.tensor(qo, dtype=torch.int32)
        if mode == "graph" and decode and bb not in engine.graphs:
            # Capture this bucket (outside the timing; this step is left out).
            w = engine.graph_wrapper(bb)
            engine.plan_decode(w, tables)
            q, o, lse = qbuf[:bb], obuf[:bb], lbuf[:bb]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for l in range(LAYERS):
                    engine.run(w, q, caches[l], o, lse)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for l in range(LAYERS):
                    engine.run(w, q, caches[l], o, lse)
            engine.graphs[bb] = (w, g)
            captured = True
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if prefill:
            engine.plan_prefill(qo_t, ptables)
        if decode:
            if mode == "graph":
                w, g = engine.graphs[bb]
                engine.plan_decode(w, tables)
            else:
                engine.plan_decode(engine.decode, tables)
        t_plan = time.perf_counter() - t0
        ntok = qo[-1] if prefill else 0
        if mode == "graph" and decode:
            for l in range(LAYERS) if prefill else ():
                engine.run(engine.prefill, qbuf[:ntok], caches[l], obuf[:ntok], lbuf[:ntok])
            g.replay()
        else:
            for l in range(LAYERS):
                if prefill:
                    engine.run(engine.prefill, qbuf[:ntok], caches[l], obuf[:ntok], lbuf[:ntok])
                if decode:
                    engine.run(engine.decode, qbuf[: len(decode)], caches[l], obuf[: len(decode)], lbuf[: len(decode)])
        t_host = time.perf_counter() - t0
        torch.cuda.synchronize()
        t_step = time.perf_counter() - t0
        sim.finish_step(decode, prefill)
        if t >= args.warmup and not captured and decode:
            rows.append(dict(step=t, batch=len(decode), prefill_tokens=ntok, t_step=t_step, t_plan=t_plan, t_host=t_host))
    return rows


def summarise(rows):
    ts = sorted(r["t_step"] for r in rows)
    p99 = ts[min(len(ts) - 1, int(math.ceil(0.99 * len(ts))) - 1)]
    toks = sum(r["batch"] for r in rows)
    return dict(
        steps=len(rows),
        mean_batch=statistics.mean(r["batch"] for r in rows),
        prefill_steps=sum(1 for r in rows if r["prefill_tokens"]),
        itl_median_us=statistics.median(ts) * 1e6,
        itl_p99_us=p99 * 1e6,
        attn_per_token_us=sum(ts) / toks * 1e6,
        host_plan_us=statistics.mean(r["t_plan"] for r in rows) * 1e6,
        host_launch_us=statistics.mean(r["t_host"] - r["t_plan"] for r in rows) * 1e6,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="attnforge,flashinfer")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--scenarios", default="llama,gemma2,prefix")
    ap.add_argument("--rates", default="0.05,0.2,0.6")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--pages", type=int, default=12288)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new runs after this many seconds (0: no limit)")
    args = ap.parse_args()
    started = time.time()
    caches = torch.zeros((LAYERS, args.pages, 2, PAGE, KV, D), dtype=DT, device=DEV)
    maxq = max(PREFILL_BUDGET, BUCKETS[-1])
    qbuf = torch.randn((maxq, QO, D), dtype=DT, device=DEV)
    obuf = torch.empty((maxq, QO, D), dtype=DT, device=DEV)
    lbuf = torch.empty((maxq, QO), dtype=torch.float32, device=DEV)
    mods = {}
    for e in args.engines.split(","):
        if e == "attnforge":
            import attnforge

            mods[e] = attnforge
        elif e == "flashinfer":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from flashinfer_decode import import_flashinfer

            mods[e], stubbed = import_flashinfer()
            print(f"flashinfer {mods[e].__version__} (stubbed: {stubbed})", flush=True)
    results = []
    for scenario in args.scenarios.split(","):
        for rate in [float(x) for x in args.rates.split(",")]:
            for mode in args.modes.split(","):
                for e in args.engines.split(","):
                    if args.budget_s and time.time() - started > args.budget_s:
                        print(f"time budget of {args.budget_s} s spent: skipping {scenario} {rate} {mode} {e}", flush=True)
                        continue
                    t0 = time.time()
                    try:
                        eng = (AttnForge if e == "attnforge" else FlashInfer)(mods[e], scenario, args.pages)
                        rows = run_loop(eng, args, scenario, rate, mode, caches, qbuf, obuf, lbuf)
                        s = summarise(rows)
                        if e == "flashinfer":
                            s["prefill_backend"] = eng.prefill_backend
                        del eng
                    except Exception as err:  # one failed configuration must not lose the others
                        torch.cuda.synchronize()
                        s = dict(error=f"{type(err).__name__}: {err}")
                    s.update(engine=e, scenario=scenario, rate=rate, mode=mode, wall_s=time.time() - t0)
                    results.append(s)
                    print(json.dumps(s), flush=True)
                    if args.json:  # after every run, so a cut-short call keeps what it measured
                        with open(args.json, "w") as f:
                            json.dump(results, f, indent=1)
    print("\n| scenario | rate | mode | mean batch | engine | ITL median µs | ITL p99 µs | µs / token | host plan µs | host launch µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in results:
        if "error" in s:
            print(f"| {s['scenario']} | {s['rate']} | {s['mode']} | — | {s['engine']} | failed: {s['error'][:120]} | | | | |")
            continue
        print(f"| {s['scenario']} | {s['rate']} | {s['mode']} | {s['mean_batch']:.1f} | {s['engine']} | {s['itl_median_us']:.0f} | {s['itl_p99_us']:.0f} | {s['attn_per_token_us']:.1f} | {s['host_plan_us']:.0f} | {s['host_launch_us']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
