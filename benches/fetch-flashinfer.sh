#!/usr/bin/env bash
# Puts FlashInfer 0.7.2 (the version of ANCHORS.md) under .whl/ for benches/flashinfer_decode.py and
# benches/serving_loop.py on the device machine, which has no network: the wheel trimmed to what
# batch decode and prefill need (its Python package and the headers and sources its JIT compiles,
# with its bundled CCCL and CUTLASS's headers, which the Hopper (fa3) prefill includes; none of the
# large generated MoE/MLA sources), packed as one tar.xz (~12 MB), and the
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
  rm -rf data/csrc/cake_* data/csrc/cake_sampling data/cutlass/test data/cutlass/python data/cutlass/examples \
    data/cutlass/docs data/cutlass/media
  find data/cutlass/tools -mindepth 1 -maxdepth 1 ! -name util -exec rm -rf {} +
  find . -type f ! -name '*.py' ! -path './data/include/*' ! -path './data/cccl/*' ! -path './data/cutlass/*' -size +150k -delete
)
tar -C "$tmp/x" -cJf .whl/flashinfer-0.7.2-trimmed.tar.xz flashinfer
ls -la .whl
