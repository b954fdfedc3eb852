#!/usr/bin/env bash
# Issue 13: the gemma2 B64 L4096 graph shape ran 1.4% slower after the refactor; is it the kernel?
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
for b in old bin; do ATTNFORGE_CACHE_DIR=/tmp/g2_$b ./.device/$b/attnforge compile gemma2 --op decode --group 4 --dtype bf16 --arch sm_90a > /dev/null; done
python3 benches/sass_diff.py /tmp/g2_old /tmp/g2_bin gemma2.decode > $OUT/sassdiff.txt 2>&1; head -60 $OUT/sassdiff.txt
for i in 1 2 3; do
  for b in old bin; do
    timeout 100 ./.device/$b/attnforge bench --suite decode > $OUT/dec_${b}$i.log 2>&1
    echo "$b$i $(grep -E 'gemma2|B64 L4096|B1 L1024 ' $OUT/dec_${b}$i.log | tr -s ' ' | cut -c1-60 | tr '\n' '|')"
  done
done
