#!/usr/bin/env bash
# Issue 14 on the device. Carry [".device", ".whl"] (../shared/tools/device-pack; FlashInfer by
# benches/fetch-flashinfer.sh). Parts:
#   probes: tier 2 `hopper::` (the warpgroup MMA in both forms, the bulk-copy ring with mbarriers
#           and setmaxnreg, one attention tile at d 64 and 128, the paged cp.async gather ring)
#   tests:  tier 2 `both_main_loops` (the same random batches on the sm90 loop, the portable loop
#           and the engine's choice) and the random cascades (group items on the sm90 loop)
#   bench:  `attnforge bench --suite prefill`, the engine's choice and the portable loop forced
#   fi:     FlashInfer 0.7.2 fa3 on the same shapes (benches/flashinfer_prefill.py; the first
#           use of each kernel JIT-compiles for 80+ s; FI_ONLY="MHA 32|batch 16" limits it)
# Usage: bash benches/device/issue14.sh [probes|tests|bench|fi|all] (default all); logs in $OUT.
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp}
export ATTNFORGE_REQUIRE_GPU=1 ATTNFORGE_REQUIRE_NVRTC=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t2=$(ls ./.device/tests/tier2-*)
status=0
if [[ $what == probes || $what == all ]]; then
  $t2 hopper 2>&1 | tail -n 30 || status=1
fi
if [[ $what == tests || $what == all ]]; then
  ATTNFORGE_NVRTC_FLAGS="-DAF_MBAR_SPIN_LIMIT=67108864" timeout 200 $t2 both_main_loops > "$out/loops.log" 2>&1 || status=1
  grep -E "test result|panicked|FAIL" "$out/loops.log"
  timeout 120 $t2 cascades_match > "$out/cascades.log" 2>&1 || status=1
  grep -E "test result|panicked|FAIL" "$out/cascades.log"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 200 ./.device/bin/attnforge bench --suite prefill --tile p,4,2,64,2,1 --json "$out/prefill.json" > "$out/prefill.log" 2>&1 || status=1
  grep -v "^note" "$out/prefill.log" | tail -n 22
fi
if [[ $what == fi || $what == all ]]; then
  rm -rf /tmp/site && mkdir -p /tmp/site
  tar -C /tmp/site -xJf .whl/flashinfer-0.7.2-trimmed.tar.xz
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/apache_tvm_ffi-*.whl
  export CUDA_HOME=/usr/local/cuda FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
  only=()
  IFS='|' read -ra parts <<< "${FI_ONLY:-}"
  for p in "${parts[@]}"; do only+=(--only "$p"); done
  PYTHONPATH=/tmp/site timeout 420 python3 benches/flashinfer_prefill.py --json "$out/fi_prefill.json" "${only[@]}" > "$out/fi_prefill.log" 2>&1 || status=1
  grep -v INFO "$out/fi_prefill.log" | tail -n 14
fi
exit $status
