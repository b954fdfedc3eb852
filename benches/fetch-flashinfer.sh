#!/usr/bin/env bash
# Puts FlashInfer 0.7.2 (the version of ANCHORS.md) under .whl/ for benches/flashinfer_decode.py on
# the device machine, which has no network: the wheel trimmed to what batch decode needs (its
# Python package and the headers and sources its decode JIT compiles, with its bundled CCCL; no CUTLASS,
# none of the large generated MoE/MLA sources), packed as one tar.xz (~10 MB), and the
# apache-tvm-ffi wheel it binds kernels with. Run here (needs PyPI); .whl/ is git-ignored.
# On the device: see the command in BENCHMARKS.md ("FlashInfer on the same card").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip_dl() {
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$@"
}
pip_dl "$tmp" flashinfer-python==0.7.2
pip_dl .whl apache-tvm-ffi==0.1.12
python3 -m zipfile -e "$tmp"/flashinfer_python-0.7.2-py3-none-any.whl "$tmp/x"
(
  cd "$tmp/x/flashinfer"
  rm -rf data/cutlass data/csrc/cake_* data/csrc/cake_sampling
  find . -type f ! -name '*.py' ! -path './data/include/*' ! -path './data/cccl/*' -size +150k -delete
)
tar -C "$tmp/x" -cJf .whl/flashinfer-0.7.2-trimmed.tar.xz flashinfer
ls -la .whl
