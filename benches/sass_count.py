#!/usr/bin/env python3
"""SASS instruction counts of the kernels in attnforge cache directories (device only: needs
cuobjdump). Each .afk entry's payload is its CUBIN; every kernel function is counted.

    python3 benches/sass_count.py DIR [DIR ...]

prints one line per (entry, function) with the count in each directory, and the change against
the first directory, so before/after builds compiled into two caches compare side by side.
"""
import os
import re
import struct
import subprocess
import sys
import tempfile


def payload(path):
    b = open(path, "rb").read()
    assert b[:4] == b"AFKC", path
    meta_len = struct.unpack_from("<I", b, 40)[0]
    at = 44 + meta_len
    n = struct.unpack_from("<Q", b, at)[0]
    return b[at + 8 : at + 8 + n]


def counts(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".afk"):
            continue
        name = f.rsplit("-", 1)[0]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as t:
            t.write(payload(os.path.join(d, f)))
            t.flush()
            sass = subprocess.run(["cuobjdump", "-sass", t.name], capture_output=True, text=True, check=True).stdout
        fn = None
        for line in sass.splitlines():
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                fn = m.group(1)
                out[(name, fn)] = 0
            elif fn and re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line):
                out[(name, fn)] += 1
    return out


dirs = sys.argv[1:]
all_counts = [counts(d) for d in dirs]
keys = sorted(set().union(*all_counts))
print("entry function " + " ".join(os.path.basename(d.rstrip("/")) for d in dirs) + " change")
for k in keys:
    row = [c.get(k) for c in all_counts]
    base = row[0]
    change = "" if base in (None, 0) or row[-1] is None else f"{100.0 * (row[-1] - base) / base:+.1f}%"
    print(f"{k[0]} {k[1]} " + " ".join("-" if x is None else str(x) for x in row) + f" {change}")
