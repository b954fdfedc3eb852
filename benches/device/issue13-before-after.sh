#!/usr/bin/env bash
# Issue 13 device check: the refactor against the commit before it (4654d86), in one call.
export ATTNFORGE_REQUIRE_GPU=1 ATTNFORGE_REQUIRE_NVRTC=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(timeout 420 bash .device/run-tests.sh > $OUT/tests.log 2>&1; echo "tests rc=$?" >> $OUT/tests.log) &
(ATTNFORGE_BIN=./.device/bin/attnforge timeout 420 bash tests/memcheck.sh > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?" >> $OUT/memcheck.log) &
# SASS of every shipped kernel, before and after: decode GQA 4 (tensor cores) and 1 (CUDA cores),
# its wide tile (GQA 4 at 8 warps), prefill GQA 4, and d64/d256.
for b in old bin; do
  for args in "--op decode --group 4" "--op decode --group 1" "--op prefill --group 4" "--op decode --group 8 --head-dim 64 --head-dim 256" "--op prefill --group 2 --head-dim 64 --head-dim 256"; do
    ATTNFORGE_CACHE_DIR=/tmp/sass_$b ./.device/$b/attnforge compile all --arch sm_90a $args > /dev/null
  done
done
python3 benches/sass_count.py /tmp/sass_old /tmp/sass_bin > $OUT/sass.txt 2>&1
wait
tail -1 $OUT/tests.log; tail -1 $OUT/memcheck.log
for i in 1 2; do
  timeout 120 ./.device/old/attnforge bench --suite decode --suite prefill > $OUT/bench_old$i.log 2>&1; echo "bench old rc=$?"
  timeout 120 ./.device/bin/attnforge bench --suite decode --suite prefill > $OUT/bench_new$i.log 2>&1; echo "bench new rc=$?"
done
for ex in decode prefill; do ./.device/bin/$ex 2>&1 | tail -1; done
grep -E "test result|FAILED|panicked" $OUT/tests.log
grep -E "ERROR SUMMARY" $OUT/memcheck.log | sort | uniq -c
awk 'NR > 1 && $NF != "+0.0%"' $OUT/sass.txt | head -40
