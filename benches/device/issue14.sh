#!/usr/bin/env bash
# Issue 14 on the device: the Hopper primitives' probes (tier 2 `hopper::`: the warpgroup MMA
# in both forms, the bulk-copy ring with mbarriers and setmaxnreg, one attention tile at d 64 and
# 128, the paged cp.async gather ring feeding the MMA), each against the CPU. Carry [".device"]
# (../shared/tools/device-pack).
# Usage: bash benches/device/issue14.sh
set -uo pipefail
export ATTNFORGE_REQUIRE_GPU=1 ATTNFORGE_REQUIRE_NVRTC=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
./.device/tests/tier2-* hopper 2>&1 | tail -n 30
