#!/usr/bin/env bash
# The test command (README): runs every test tier this machine can run.
#
# Tier 0 needs nothing. Tier 1 needs NVRTC and the CUDA headers: when no CUDA toolkit is found,
# this script installs the nvidia-cuda-nvrtc and nvidia-cuda-runtime wheels (the device's CUDA
# 13.0) into ./.cuda and points CUDA_HOME there. Tier 2 needs a GPU and skips, saying why, without.
set -euo pipefail
cd "$(dirname "$0")/.."
wheel_root=.cuda/nvidia/cu13
if [[ -z "${CUDA_HOME:-}" && ! -e /usr/local/cuda/include/cuda_fp16.h ]]; then
  if [[ ! -e $wheel_root/lib/libnvrtc.so.13 || ! -e $wheel_root/include/cuda_fp16.h ]]; then
    echo "tests/run.sh: no CUDA toolkit; installing NVRTC 13.0 and the CUDA headers into .cuda"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target .cuda \
      nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.88
  fi
  export CUDA_HOME="$PWD/$wheel_root"
fi
# NVRTC is installed now, so tier 1 must run: a missing NVRTC is a failure, not a skip.
export ATTNFORGE_REQUIRE_NVRTC=1
# The `ci` profile is release with overflow checks (Cargo.toml says why).
cargo test --profile ci --workspace "$@"
# The examples build; each runs one step, or, without a GPU, exits with a clear "no GPU" error
# (never a panic).
cargo build --profile ci --examples
for ex in decode prefill; do
  if out=$(target/ci/examples/$ex 2>&1); then
    echo "example $ex: $out"
  elif [[ $? -eq 1 && $out == "error: no GPU"* ]]; then
    echo "example $ex: $out (expected without a GPU)"
  else
    echo "example $ex failed: $out"
    exit 1
  fi
done
# The Python package (python/): built with maturin into a local virtual environment
# (./.venv, git-ignored) and tested with pytest; its GPU tests skip, saying so, without a GPU and
# torch. The build needs PyPI (maturin, numpy, pytest) and the Rust toolchain, nothing else.
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "numpy>=1.22" "pytest>=7"
.venv/bin/python -m pip install --quiet --disable-pip-version-check ./python
# From python/tests (not python/), so `import attnforge` finds the installed package rather than
# the source folder, which lacks the compiled extension.
(cd python/tests && ../../.venv/bin/python -m pytest -q -p no:cacheprovider .)
