#!/usr/bin/env bash
# compute-sanitizer memcheck over a representative set of decode and prefill runs (device only:
# needs a GPU and compute-sanitizer). Each `attnforge run` also checks against the CPU reference.
# Covers the wide decode tile (B16, B1 split, d256), merges with a sink, windows, normalize none,
# page sizes 1/64, HND, deterministic plans, a split prefill, and the Hopper prefill loop (memcheck
# and racecheck, with tensor copies and with gathers; on sm_90a). Usage: bash tests/memcheck.sh
set -u
cd "$(dirname "$0")/.."
B=${ATTNFORGE_BIN:-./.device/bin/attnforge}
CS="timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9"
status=0
run() { echo "=== $*"; $CS $B run "$@" 2>&1 | grep -E "plan:|GPU vs|ERROR SUMMARY|error|Error" ; rc=${PIPESTATUS[0]}; echo "rc=$rc"; [[ $rc == 0 ]] || status=1; }
run default --batch 16 --kv-len 4096
run sink --batch 1 --kv-len 16384 --param sinks=1.5
run gemma2 --batch 3 --kv-len 9000 --param window=3000 --param soft_cap=30
slopes=$(seq -s, 1 64 | awk -F, '{for (i = 1; i <= NF; i++) printf "%s%.6f", (i > 1 ? "," : ""), 2 ^ (-8 * i / 64)}')
run alibi --batch 12 --kv-len 3000 --head-dim 256 --dtype f16 --qo-heads 64 --kv-heads 8 --param slopes=$slopes
run sigmoid --batch 16 --kv-len 2000 --layout hnd --page-size 1
run tree_mask --batch 16 --kv-len 3000 --page-size 64
run default --batch 16 --kv-len 4096 --deterministic
run causal --op prefill --batch 2 --kv-len 3000 --q-len 1000
# The Hopper prefill loop (sm_90a only: the engine's choice there, also forced by --tile below):
# ragged split prompts, a soft cap, page size 1, and a cascade's group items.
if [[ $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1) != 9.0 ]]; then
  echo "=== the sm90 prefill runs skipped: not an sm_90 GPU"
  exit $status
fi
run causal --op prefill --batch 2 --kv-len 3000 --q-len 1000 --head-dim 256
run soft_cap --op prefill --batch 3 --kv-len 2000 --q-len 700 --tile sm90,128,2 --page-size 1
run gemma2 --op prefill --batch 4 --kv-len 1500 --q-len 40 --tile sm90,128,2 --shared-prefix 1024 --param window=700
# Both producers (auto takes tensor copies wherever the cache does), and tensor-copy runs of 64
# keys (pages of 64) and of 8.
ATTNFORGE_SM90_KV_COPY=tma run causal --op prefill --batch 2 --kv-len 1700 --q-len 900 --head-dim 256 --layout hnd
ATTNFORGE_SM90_KV_COPY=gather run prefix_lm --op prefill --batch 2 --kv-len 1700 --q-len 900 --tile sm90,128,2 --page-size 64 --param prefix_len=1200,300
ATTNFORGE_SM90_TMA_RUN=64 run sliding_window --op prefill --batch 3 --kv-len 1900 --q-len 500 --page-size 64 --param window=333
ATTNFORGE_SM90_TMA_RUN=8 run causal --op prefill --batch 2 --kv-len 1100 --q-len 1100 --head-dim 64
# Shared-memory races in the sm90 loop's mbarrier ring (producer copies vs consumers' wgmma).
CS="timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9"
run causal --op prefill --batch 1 --kv-len 2000 --q-len 600 --tile sm90,128,2
ATTNFORGE_SM90_KV_COPY=gather run causal --op prefill --batch 1 --kv-len 2000 --q-len 600 --tile sm90,128,2
exit $status
