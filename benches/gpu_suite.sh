#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build the CUDA extension, run the kernel tests on the
# GPU, benchmark every op against torch's equivalents and the measured ceilings, and collect the
# logs and JSON in $OUT (default benches/results). From the repository root:
#   OUT=/tmp/out bash benches/gpu_suite.sh
# Needs torch with CUDA and Triton installed; installs nothing from the network.
set -uo pipefail
OUT=${OUT:-benches/results}
mkdir -p "$OUT"
export FASTROME_BUILD_CUDA=1 FASTROME_REQUIRE_EXT=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
start=$(date +%s)
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
"$PY" -m fastrome info --json >"$OUT/info.json" && "$PY" -m fastrome info | tail -8
"$PY" -m pytest tests/test_kernels.py tests/test_ops.py -q -x \
  2>&1 | tee "$OUT/tests.log" | tail -6
"$PY" -m pytest benches --benchmark-only --benchmark-json="$OUT/ops_cuda.json" -q 2>&1 | tail -3
"$PY" benches/render.py "$OUT/ops_cuda.json" | tee "$OUT/ops_cuda.md"
