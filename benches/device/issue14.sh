#!/usr/bin/env bash
# Issue 14 on the device. Carry [".device", ".whl"] (../shared/tools/device-pack; FlashInfer by
# benches/fetch-flashinfer.sh). Parts:
#   probes: tier 2 `hopper::` (the warpgroup MMA in both forms, the bulk-copy ring with mbarriers
#           and setmaxnreg, one attention tile at d 64 and 128, the paged cp.async gather ring)
#   tests:  tier 2 `both_main_loops` (the same random batches on the sm90 loop, the portable loop
#           and the engine's choice) and the random cascades (group items on the sm90 loop)
#   bench:  `attnforge bench --suite prefill`: the engine's choice (the sm90 loop on Hopper) and
#           the portable default tile up to d 128 forced (4w x 2, 64-key tiles; BENCH_TILES
#           replaces the forced tiles)
#   ab:     the sm90 rows with tensor copies of 8 and 16 keys (ATTNFORGE_SM90_TMA_RUN) and with
#           gathers, and with each of the producer's developer flags of prefill_sm90.cuh turned
#           back off (K issued a tile ahead of V, the pages looked up a tile ahead, the copies
#           over 4 producer warps: 2 instead)
#   diag:   (tuning) the sm90 loop's ring shapes at d 128, then a timing-only build whose
#           gathers copy nothing (wrong results), to see what bounds it
#   ncu:    Nsight Compute on one sm90 launch (causal 16K d 128), tensor copies and gathers
#   prof:   Nsight Compute's full set on one sm90 launch of each PROF_ONLY shape (default causal
#           16K and soft cap 16K): pipe utilisation, issue slots, stall reasons, and the SASS with
#           its stall samples (prof_<n>_source.csv)
#   owed:   the Python package's prefill GPU tests (the wheel in .device/wheels),
#           tests/memcheck.sh, `bench --suite compile` (owed by the eleventh session; all run
#           and passed in the twelfth)
#   (ab takes AB_ONLY="shape|shape…" and AB_ENTRIES="RUN COPY FLAGS|…")
#   fi:     FlashInfer 0.7.2 fa3 on the same shapes (benches/flashinfer_prefill.py; the first
#           use of each kernel JIT-compiles for 80+ s; FI_ONLY="MHA 32|batch 16" limits it)
# Usage: bash benches/device/issue14.sh [probes|tests|cascades|bench|ab|diag|ncu|prof|owed|fi|all] (default all); logs in $OUT.
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
if [[ $what == tests || $what == all || $what == cascades ]]; then
  if [[ $what != cascades ]]; then
    ATTNFORGE_NVRTC_FLAGS="-DAF_MBAR_SPIN_LIMIT=67108864" timeout ${LOOPS_TIMEOUT:-400} $t2 both_main_loops > "$out/loops.log" 2>&1 || status=1
    grep -E "test result|panicked|FAIL" "$out/loops.log"
  fi
  timeout ${CASCADES_TIMEOUT:-240} $t2 cascades_match > "$out/cascades.log" 2>&1 || status=1
  grep -E "test result|panicked|FAIL" "$out/cascades.log"
fi
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_TIMEOUT:-200} ./.device/bin/attnforge bench --suite prefill ${BENCH_TILES:---tile p,4,2,64,2,1} --json "$out/prefill.json" > "$out/prefill.log" 2>&1 || status=1
  grep -v "^note" "$out/prefill.log" | tail -n 30
fi
if [[ $what == ab || $what == all ]]; then
  # The sm90 rows under each developer flag of prefill_sm90.cuh (one build each), same call.
  # Each entry: "RUN COPY FLAGS": ATTNFORGE_SM90_TMA_RUN (keys per tensor copy),
  # ATTNFORGE_SM90_KV_COPY and NVRTC flags (AF_PLAIN is no flag: the default code).
  # AB_ONLY names the shapes ('|' between names; default four), AB_ENTRIES the entries.
  ab_only=()
  IFS='|' read -ra parts <<< "${AB_ONLY:-single 16384, MHA|batch 16|single 4096|d256}"
  for p in "${parts[@]}"; do ab_only+=(--only "$p"); done
  # AB_ENTRIES overrides the list ('|' between entries).
  IFS='|' read -ra entries <<< "${AB_ENTRIES:-16 tma -DAF_PLAIN=1|16 tma -DAF_K_AHEAD=0|16 tma -DAF_TMA_LOOKAHEAD=0|16 tma -DAF_TMA_WARPS=2|8 tma -DAF_PLAIN=1|16 gather -DAF_PLAIN=1}"
  for e in "${entries[@]}"; do
    read -r run copy f <<< "$e"
    echo "== run $run $copy $f"
    ATTNFORGE_SM90_TMA_RUN=$run ATTNFORGE_SM90_KV_COPY=$copy ATTNFORGE_NVRTC_FLAGS="$f" timeout 120 ./.device/bin/attnforge bench --suite prefill "${ab_only[@]}" --tile p,sm90,128,2 > "$out/prefill_ab.log" 2>&1 || status=1
    grep "sm90" "$out/prefill_ab.log" | grep -v "not timed"
  done
fi
if [[ $what == diag ]]; then
  b=./.device/bin/attnforge
  only=(--only "single 16384, MHA" --only "batch 16")
  timeout 150 $b bench --suite prefill "${only[@]}" --tile p,sm90,128,2 --tile p,sm90,64,2 --tile p,sm90,64,3 --tile p,sm90,64,4 > "$out/diag_tiles.log" 2>&1
  grep sm90 "$out/diag_tiles.log"
  for f in "-DAF_DIAG_NOCOPY=1"; do
    echo "== $f"
    ATTNFORGE_SM90_KV_COPY=gather ATTNFORGE_NVRTC_FLAGS="$f" timeout 100 $b bench --suite prefill "${only[@]}" --tile p,sm90,128,2 --tile p,sm90,64,4 > "$out/diag.log" 2>&1
    grep sm90 "$out/diag.log" | grep "\["
  done
fi
if [[ $what == ncu ]]; then
  # One sm90 launch (causal 16K d128, after 3 warm-up launches) under Nsight Compute, with the
  # tensor-copy producer and with gathers: L2 throughput and hit rate, the warps' stall reasons.
  for copy in tma gather; do
    ATTNFORGE_SM90_KV_COPY=$copy timeout 240 ncu --clock-control none -k regex:attnforge_prefill -s 3 -c 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
      -f -o "$out/sm90_$copy" ./.device/bin/attnforge bench --suite prefill --only "single 16384, MHA" --tile p,sm90,128,2 --tile-only > "$out/ncu_$copy.log" 2>&1 || status=1
    ncu -i "$out/sm90_$copy.ncu-rep" --page details > "$out/sm90_$copy.txt" 2>&1
    grep -E "Duration|Throughput|Hit Rate|Stall|Warp Cycles|Issued" "$out/sm90_$copy.txt" | head -40
  done
fi
if [[ $what == prof ]]; then
  IFS='|' read -ra parts <<< "${PROF_ONLY:-single 16384, MHA|soft cap}"
  n=0
  for shape in "${parts[@]}"; do
    n=$((n + 1))
    echo "== prof $n: $shape"
    timeout 300 ncu --clock-control none --set full --import-source no -k regex:attnforge_prefill -s 2 -c 1 \
      -f -o "$out/prof_$n" ./.device/bin/attnforge bench --suite prefill --only "$shape" --tile p,sm90,128,2 --tile-only > "$out/prof_$n.log" 2>&1 || status=1
    ncu -i "$out/prof_$n.ncu-rep" --page details > "$out/prof_${n}_details.txt" 2>&1
    ncu -i "$out/prof_$n.ncu-rep" --page raw --csv > "$out/prof_${n}_raw.csv" 2>&1
    ncu -i "$out/prof_$n.ncu-rep" --page source --csv --print-source sass > "$out/prof_${n}_source.csv" 2>&1
    grep -E "Duration|Issue Slots Busy|Issued Ipc|Executed Ipc|Pipe|Warp Cycles Per Issued|No Eligible|Registers" "$out/prof_${n}_details.txt" | head -30
    rm -f "$out/prof_$n.ncu-rep"
  done
fi
if [[ $what == owed ]]; then
  rm -rf /tmp/afpy && mkdir -p /tmp/afpy && python3 -m zipfile -e .device/wheels/attnforge-*.whl /tmp/afpy
  python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/afpy .whl/py/*.whl
  CUDA_HOME=/usr/local/cuda PYTHONPATH=/tmp/afpy timeout 200 python3 -m pytest -q -p no:cacheprovider python/tests/test_gpu.py -k prefill 2>&1 | tail -8 || status=1
  timeout 400 bash tests/memcheck.sh > "$out/memcheck.log" 2>&1 || status=1
  grep -E "^===|ERROR SUMMARY|rc=" "$out/memcheck.log" | tail -48
  timeout 120 ./.device/bin/attnforge bench --suite compile 2>&1 | grep -v "^note" | tail -12 || status=1
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
