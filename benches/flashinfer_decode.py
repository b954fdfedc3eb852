#!/usr/bin/env python3
"""FlashInfer's batch decode timed the way `attnforge bench --suite decode` times ours.

ANCHORS.md's FlashInfer numbers were measured on an H100; when the device machine is another card
(an H200, say), this script measures FlashInfer on that card, in the same call as attnforge, so
that the comparison is same card, same shapes, same timing method:

- bf16, 32 qo / 8 kv heads, d128, page 16, NHD, pages permuted, every request of length L;
- graph: 20 calls captured in one CUDA graph, rotating over enough copies of the cache (each with
  its own page table) that one graph touches at least 128 MB; median of 7 timings of 5 replays;
- eager: plan (CPU index arrays) + run per call, 40 calls back to back, median of 5 rounds;
- both of FlashInfer's decode kernels (CUDA cores and `use_tensor_cores=True`); the faster one is
  the number to beat.

FlashInfer is not installed on the device machine: `benches/fetch-flashinfer.sh` (run here, with
network) puts a trimmed copy of the 0.7.2 wheel and its one compiled dependency under `.whl/`,
which the device call carries. Its heavy optional dependencies (CUTLASS DSL, cuDNN frontend, NCCL
bindings) are stubbed at import: the decode path never calls them, and a stub that were called
would fail loudly rather than compute anything.

Usage (device): python3 benches/flashinfer_decode.py [--json FILE] [--quick] [--only SHAPE] [--kernel tc]
"""
import argparse
import importlib.abc
import importlib.machinery
import json
import os
import statistics
import sys
import time
import types


class _Stub(types.ModuleType):
    """A module whose every attribute is a callable stub (for decorators at import time)."""

    def __init__(self, name):
        super().__init__(name)
        self.__path__ = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubValue(f"{self.__name__}.{attr}")


class _StubValue:
    def __init__(self, name):
        self._name = name

    def __call__(self, *a, **k):
        # A decorator stub returns what it decorates; anything else is a stub again.
        if len(a) == 1 and callable(a[0]) and not k:
            return a[0]
        return _StubValue(self._name + "()")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubValue(f"{self._name}.{attr}")

    def __getitem__(self, key):
        return _StubValue(self._name + "[]")

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):
        return (object,)

    def __bool__(self):
        return False


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path, target=None):
        if any(name == r or name.startswith(r + ".") for r in self.roots):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def import_flashinfer():
    """Imports flashinfer, stubbing each missing optional dependency it names, and says which."""
    stubbed = []
    finder = _StubFinder([])
    sys.meta_path.append(finder)
    for _ in range(40):
        try:
            import flashinfer  # noqa: F401

            return flashinfer, stubbed
        except ModuleNotFoundError as e:
            root = e.name or ""
            if not root or root.split(".")[0] in ("flashinfer", "torch") or root in finder.roots:
                raise
            finder.roots.add(root)
            stubbed.append(root)
            for m in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
                del sys.modules[m]
    raise RuntimeError(f"flashinfer did not import; stubbed {stubbed}")


QO, KV, D, PAGE, CALLS = 32, 8, 128, 16, 20


def shapes(quick, suite="decode"):
    """(label, batch, kv_len, variant, qo heads); variant None or (soft cap or None, window)."""
    if suite == "latency":
        # Issue 17's shapes (`attnforge bench --suite latency` prints the same labels).
        s = []
        for qo in (32, 64):
            h = "" if qo == QO else f" H{qo}/{KV}"
            for b, l in ((1, 1024), (1, 16384), (16, 4096), (1, 131072), (4, 32768), (64, 4096), (256, 4096)):
                s.append((f"B{b} L{l}{h}", b, l, None, qo))
            s.append((f"sliding_window B1 L131072{h} (window 4096)", 1, 131072, (None, 4096), qo))
        return s
    s = [
        ("B1 L1024", 1, 1024, None, QO),
        ("B1 L16384", 1, 16384, None, QO),
        ("B16 L4096", 16, 4096, None, QO),
        ("B64 L4096", 64, 4096, None, QO),
        ("B128 L2048", 128, 2048, None, QO),
        ("B256 L4096", 256, 4096, None, QO),
        ("gemma2 B64 L4096 (soft cap 30, window 1024)", 64, 4096, (30.0, 1024), QO),
    ]
    return s[:3] if quick else s


def bench_shape(torch, fi, label, batch, kv_len, variant, tensor_cores, QO=QO):
    dev = torch.device("cuda")
    pages_per_req = -(-kv_len // PAGE)
    pages_per_copy = pages_per_req * batch
    kv_bytes = pages_per_copy * PAGE * KV * D * 2 * 2
    copies = max(2, min(CALLS, -(-int(128e6) // kv_bytes)))
    gen = torch.Generator(device=dev).manual_seed(1)
    cache = torch.empty(pages_per_copy * copies, 2, PAGE, KV, D, dtype=torch.bfloat16, device=dev)
    cache.uniform_(-1, 1, generator=gen)
    q = torch.empty(batch, QO, D, dtype=torch.bfloat16, device=dev).uniform_(-1, 1, generator=gen)
    last = kv_len - (pages_per_req - 1) * PAGE
    indptr = torch.arange(0, batch + 1, dtype=torch.int32) * pages_per_req
    last_len = torch.full((batch,), last, dtype=torch.int32)
    cpu_gen = torch.Generator().manual_seed(1)
    tables = [(torch.randperm(pages_per_copy, generator=cpu_gen).to(torch.int32) + c * pages_per_copy) for c in range(copies)]
    kw = dict(pos_encoding_mode="NONE", q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    if variant is not None:
        if variant[0] is not None:
            kw["logits_soft_cap"] = variant[0]
        kw["window_left"] = variant[1] - 1

    def wrapper(graph):
        ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
        if graph:
            return fi.BatchDecodeWithPagedKVCacheWrapper(
                ws, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=torch.empty(batch + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.empty(pages_per_copy, dtype=torch.int32, device=dev),
                paged_kv_last_page_len_buffer=torch.empty(batch, dtype=torch.int32, device=dev))
        return fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)

    # Graph: one wrapper per copy (its own page table), planned before capture.
    wrappers = []
    outs = []
    for c in range(copies):
        w = wrapper(True)
        w.plan(indptr.to(dev), tables[c].to(dev), last_len.to(dev), QO, KV, D, PAGE, **kw)
        wrappers.append(w)
        outs.append(w.run(q, cache))
    torch.cuda.synchronize()
    # A sanity check of FlashInfer itself on copy 0 against torch, first request.
    ref = reference(torch, q[0], cache, tables[0][:pages_per_req], kv_len, variant, QO)
    err = ((outs[0][0].float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        raise RuntimeError(f"{label}: FlashInfer output differs from torch (relative L2 {err:.3g})")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(CALLS):
            wrappers[i % copies].run(q, cache)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            wrappers[i % copies].run(q, cache)
    for _ in range(3):
        g.replay()
    samples = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(5):
            g.replay()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e3 / (5 * CALLS))
    graph_us = statistics.median(samples)
    del g

    # Eager: plan from CPU index arrays + run, per call.
    ew = [wrapper(False) for _ in range(1)][0]
    dev_tables = [t.to(dev) for t in tables]
    eager = []
    for rnd in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(2 * CALLS):
            c = i % copies
            ew.plan(indptr, dev_tables[c], last_len, QO, KV, D, PAGE, **kw)
            ew.run(q, cache)
        torch.cuda.synchronize()
        if rnd:
            eager.append((time.perf_counter() - t0) * 1e6 / (2 * CALLS))
    visible = min(kv_len, variant[1]) if variant else kv_len
    bytes_moved = batch * visible * KV * D * 2 * 2 + 2 * batch * QO * D * 2
    return dict(shape=label, tensor_cores=tensor_cores, graph_us=graph_us, eager_us=statistics.median(eager),
                gbps_visible=bytes_moved / (graph_us * 1e-6) / 1e9, copies=copies, check_rel_l2=err)


def reference(torch, q, cache, pages, kv_len, variant, QO=QO):
    """f32 decode of one request in torch: q [QO, D], pages of `cache`, GQA QO / KV."""
    k = cache[pages.long(), 0].reshape(-1, KV, D)[:kv_len].float()
    v = cache[pages.long(), 1].reshape(-1, KV, D)[:kv_len].float()
    g = QO // KV
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("hd,nhd->hn", q.float(), k) / D**0.5
    if variant is not None:
        cap, window = variant
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        s[:, : max(0, kv_len - window)] = float("-inf")
    return torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)


def copy_ceiling(torch):
    """Device-to-device copy GB/s (bytes read + written), 1 GiB copies, median of 20."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    samples = []
    for _ in range(20):
        x, y = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x.record()
        b.copy_(a)
        y.record()
        y.synchronize()
        samples.append(2 * a.numel() / (x.elapsed_time(y) * 1e-3) / 1e9)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="the first three shapes only")
    ap.add_argument("--suite", choices=["decode", "latency"], default="decode",
                    help="decode: ANCHORS.md's shapes; latency: issue 17's (few requests, long caches, 32/8 and 64/8 heads)")
    ap.add_argument("--only", action="append", default=[], metavar="SHAPE",
                    help="run only the shapes whose label starts with this (repeatable), e.g. 'B64 L4096'")
    ap.add_argument("--kernel", choices=["both", "tc", "cuda-cores"], default="both",
                    help="which of FlashInfer's decode kernels to time (e.g. 'tc' under a profiler)")
    args = ap.parse_args()
    import torch

    fi, stubbed = import_flashinfer()
    card = torch.cuda.get_device_name()
    ceiling = copy_ceiling(torch)
    print(f"card: {card}; flashinfer {fi.__version__}; stubbed modules: {stubbed or 'none'}")
    print(f"device-to-device copy: {ceiling:.0f} GB/s")
    rows = []
    kernels = {"both": (False, True), "tc": (True,), "cuda-cores": (False,)}[args.kernel]
    for label, batch, kv_len, variant, qo in shapes(args.quick, args.suite):
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        for tc in kernels:
            t0 = time.time()
            try:
                r = bench_shape(torch, fi, label, batch, kv_len, variant, tc, qo)
            except Exception as e:  # report and go on: one kernel's failure is a result too
                print(f"{label:46} tensor_cores={tc}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            r["pct_copy"] = 100 * r["gbps_visible"] / ceiling
            rows.append(r)
            print(f"{label:46} tc={int(tc)} graph {r['graph_us']:8.1f} us  eager {r['eager_us']:8.1f} us  "
                  f"{r['gbps_visible']:6.0f} GB/s {r['pct_copy']:5.1f}%  (check {r['check_rel_l2']:.1e}, {time.time() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=card, flashinfer=fi.__version__, copy_gbps=ceiling, stubbed=stubbed, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
