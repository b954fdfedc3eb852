#!/usr/bin/env python3
"""Instruction-by-instruction SASS diff of the kernels in two attnforge cache directories
(device only: needs cuobjdump); addresses and immediates are masked. FILTER keeps the entries
whose name contains it (e.g. gemma2.decode).

    python3 benches/sass_diff.py OLD_DIR NEW_DIR [FILTER]
"""
import os, re, subprocess, sys, tempfile, difflib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_count import payload  # noqa: E402

FILTER = sys.argv[3] if len(sys.argv) > 3 else ""
def sass(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".afk") or FILTER not in f: continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as t:
            t.write(payload(os.path.join(d, f))); t.flush()
            s = subprocess.run(["cuobjdump", "-sass", t.name], capture_output=True, text=True).stdout
        lines = []
        for l in s.splitlines():
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?);", l)
            if m: lines.append(re.sub(r"0x[0-9a-f]+", "X", m.group(1)).strip())
        out[f.split("-")[0] if "-" in f else f] = lines
    return out
a, b = sass(sys.argv[1]), sass(sys.argv[2])
for k in a:
    kb = [x for x in b if x.split(".sm_")[0] == k.split(".sm_")[0]]
    print(k, len(a[k]), [len(b[x]) for x in kb])
    for x in kb:
        d = list(difflib.unified_diff(a[k], b[x], lineterm="", n=0))
        print(" diff lines", len(d)); print("\n".join(d[:40]))
