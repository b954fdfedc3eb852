#!/usr/bin/env bash
# Profiles one decode launch of attnforge and, when .whl/ holds FlashInfer (benches/fetch-flashinfer.sh),
# one of FlashInfer's tensor-core decode kernel, with Nsight Compute, on the same shapes.
#
#   bash benches/ncu-decode.sh OUTDIR [B L ...]     (device machine; default shapes: 64 4096 256 4096)
#
# NCU_FULL=1 collects ncu's full set with every table printed.
# Writes OUTDIR/{ours,fi}-B<b>-L<l>.txt: the details page (speed of light, memory workload,
# occupancy, warp states, launch statistics) of the profiled launch. Clocks are left as they are
# (`--clock-control none`: the lent machines do not allow locking them).
set -uo pipefail
out=${1:?usage: ncu-decode.sh OUTDIR [B L ...]}
shift
[[ $# -gt 0 ]] || set -- 64 4096 256 4096
mkdir -p "$out"
bin=${ATTNFORGE_BIN:-.device/bin/attnforge}
if [[ ${NCU_FULL:-0} == 1 ]]; then
  sections=(--set full --print-details all)  # every section, every table (slower: ~40 replays)
else
  sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables
            --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats
            --section ComputeWorkloadAnalysis)
fi
# The headline lines of a details page.
summary() { grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Limit|Dynamic Shared|Grid Size" "$1" | head -20; }
fi_ready=0
if compgen -G ".whl/flashinfer-*-trimmed.tar.xz" >/dev/null; then
  site=/tmp/fi-site
  if [[ ! -d $site/flashinfer ]]; then
    mkdir -p "$site" && tar -C "$site" -xJf .whl/flashinfer-*-trimmed.tar.xz &&
      python3 -m pip install -q --no-index --no-deps --target "$site" .whl/apache_tvm_ffi-*.whl && fi_ready=1
  else
    fi_ready=1
  fi
fi
while [[ $# -ge 2 ]]; do
  b=$1 l=$2
  shift 2
  echo "== ours B$b L$l"
  ncu --clock-control none --kernel-name attnforge_decode --launch-count 1 "${sections[@]}" \
    "$bin" run default --op decode --batch "$b" --kv-len "$l" >"$out/ours-B$b-L$l.txt" 2>&1
  summary "$out/ours-B$b-L$l.txt"
  if [[ $fi_ready == 1 ]]; then
    echo "== FlashInfer (tensor cores) B$b L$l"
    PYTHONPATH=$site CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16 \
      ncu --clock-control none --kernel-name regex:'BatchPrefill.*Paged' --launch-count 1 "${sections[@]}" \
      python3 benches/flashinfer_decode.py --only "B$b L$l" --kernel tc >"$out/fi-B$b-L$l.txt" 2>&1
    summary "$out/fi-B$b-L$l.txt"
  fi
done
