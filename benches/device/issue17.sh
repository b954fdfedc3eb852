#!/usr/bin/env bash
# Issue 17 on the device: latency-bound decode. `attnforge bench --suite latency` (issue 17's
# shapes, each against the read ceiling measured in the same process), FlashInfer 0.7.2's
# tensor-core decode on the same shapes in the same call, and Nsight Compute's per-kernel view
# (decode and merge durations, DRAM throughput, occupancy, stalls) of a few of them.
# Carry [".device", ".whl"] (FlashInfer trimmed in .whl, benches/fetch-flashinfer.sh).
# Usage: bash benches/device/issue17.sh [tests|bench|ncu|all] [extra `attnforge bench` args]
set -uo pipefail
what=${1:-all}
shift || true
export CUDA_HOME=/usr/local/cuda MAX_JOBS=16 FLASHINFER_CUDA_ARCH_LIST=9.0a ATTNFORGE_REQUIRE_GPU=1 ATTNFORGE_REQUIRE_NVRTC=1
out=${OUT:-/tmp}
status=0
if [[ $what == tests || $what == all ]]; then
  ./.device/tests/tier2-* 2>&1 | tail -n 30 || status=1
fi
if [[ $what == bench || $what == all ]]; then
  ./.device/bin/attnforge bench --suite latency --json "$out/latency.json" "$@" || status=1
  rm -rf /tmp/site && mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/flashinfer-0.7.2-trimmed.tar.xz
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/apache_tvm_ffi-*.whl
  PYTHONPATH=/tmp/site python3 benches/flashinfer_decode.py --suite latency --kernel tc --json "$out/fi_latency.json" 2>&1 | grep -v INFO | tail -n 20 || status=1
fi
if [[ $what == ncu || $what == all ]]; then
  for shape in "1 1024" "1 16384" "1 131072"; do
    set -- $shape
    echo "== ncu B$1 L$2"
    ncu --clock-control none --kernel-name regex:'attnforge_(decode|merge)' --launch-count 2 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      ./.device/bin/attnforge run default --op decode --batch "$1" --kv-len "$2" --qo-heads 32 --kv-heads 8 --head-dim 128 --dtype bf16 >"$out/ncu-B$1-L$2.txt" 2>&1
    grep -E "attnforge_(decode|merge)|Duration|DRAM Throughput|Achieved Occupancy|Grid Size|Block Size|Registers Per|Waves Per" "$out/ncu-B$1-L$2.txt" | head -30
  done
fi
exit $status
