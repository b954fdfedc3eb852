#!/usr/bin/env bash
# Issue 16 on the device: the Python package's GPU tests, then the serving loop for attnforge and
# FlashInfer 0.7.2 in the same call. Carry [".device", ".whl"]: the attnforge wheel in
# .device/wheels (maturin build), FlashInfer trimmed (benches/fetch-flashinfer.sh) and pytest's
# wheels in .whl/py. Usage: bash benches/device/issue16.sh [tests|host|loop|gap|all] [serving_loop args…]
# (host: benches/host_overhead.py, each call of an eager decode step timed alone; gap:
# benches/graph_gap.py, graph against eager decode steps at B 40 / 100 / 24, buckets 64 / 128 / 32)
set -uo pipefail
what=${1:-all}; shift || true
export CUDA_HOME=/usr/local/cuda MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST=9.0a
rm -rf /tmp/afpy /tmp/site && mkdir -p /tmp/afpy /tmp/site
python3 -m zipfile -e .device/wheels/attnforge-*.whl /tmp/afpy
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/afpy .whl/py/*.whl
tar -C /tmp/site -xJf .whl/flashinfer-0.7.2-trimmed.tar.xz
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/apache_tvm_ffi-*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
status=0
if [[ $what == tests || $what == all ]]; then
  PYTHONPATH=/tmp/afpy python3 -m pytest -q -p no:cacheprovider python/tests 2>&1 | tail -40 || status=1
fi
if [[ $what == host || $what == all ]]; then
  PYTHONPATH=/tmp/afpy:/tmp/site python3 benches/host_overhead.py --json "${OUT:-/tmp}/host.json" || status=1
fi
if [[ $what == loop || $what == all ]]; then
  PYTHONPATH=/tmp/afpy:/tmp/site python3 benches/serving_loop.py --json "${OUT:-/tmp}/serving.json" "$@" || status=1
fi
if [[ $what == gap ]]; then
  for bb in "40 64" "100 128" "24 32"; do
    read -r b c <<< "$bb"
    PYTHONPATH=/tmp/afpy:/tmp/site timeout 150 python3 benches/graph_gap.py --batch $b --bucket $c 2>&1 | grep -v INFO | tail -n 12 || status=1
  done
fi
exit $status
