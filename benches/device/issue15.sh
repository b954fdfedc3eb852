#!/usr/bin/env bash
# Issue 15 on the device: the cascade's GPU tests (tier 2, pytest), the CLI's --shared-prefix,
# `attnforge bench --suite cascade`, and FlashInfer 0.7.2's plain decode and two-level cascade
# on the same shapes in the same call. Carry [".device", ".whl"] (the attnforge wheel in
# .device/wheels; FlashInfer trimmed and pytest's wheels in .whl, benches/fetch-flashinfer.sh).
# Usage: bash benches/device/issue15.sh [tests|bench|all]
set -uo pipefail
what=${1:-all}
export CUDA_HOME=/usr/local/cuda MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST=9.0a ATTNFORGE_REQUIRE_GPU=1 ATTNFORGE_REQUIRE_NVRTC=1
out=${OUT:-/tmp}
status=0
if [[ $what == tests || $what == all ]]; then
  ./.device/tests/tier2-* cascade 2>&1 | tail -n 50 || status=1
  ./.device/bin/attnforge run causal --shared-prefix 4096 --batch 16 --kv-len 4300 --qo-heads 32 --kv-heads 8 --head-dim 128 --dtype bf16 2>&1 | tail -n 6 || status=1
  ./.device/bin/attnforge run gemma2 --op prefill --shared-prefix 1000 --batch 6 --kv-len 1400 --q-len 20 --qo-heads 16 --kv-heads 4 --head-dim 64 --param window=700 2>&1 | tail -n 6 || status=1
  rm -rf /tmp/afpy && mkdir -p /tmp/afpy && python3 -m zipfile -e .device/wheels/attnforge-*.whl /tmp/afpy
  python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/afpy .whl/py/*.whl
  PYTHONPATH=/tmp/afpy python3 -m pytest -q -p no:cacheprovider python/tests -k "cascade" 2>&1 | tail -n 15 || status=1
fi
if [[ $what == bench || $what == all ]]; then
  ./.device/bin/attnforge bench --suite cascade --json "$out/cascade.json" || status=1
  rm -rf /tmp/site && mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/flashinfer-0.7.2-trimmed.tar.xz
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/apache_tvm_ffi-*.whl
  PYTHONPATH=/tmp/site python3 benches/flashinfer_cascade.py --from "$out/cascade.json" --json "$out/fi_cascade.json" 2>&1 | grep -v "INFO" | tail -n 20 || status=1
fi
exit $status
