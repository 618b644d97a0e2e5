#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/cuda/*.cu, *.cpp) on a machine without a GPU.
#
# Run:   bash scripts/check_cuda_build.sh            (python/torch from $PYTHON, else python3)
#        JOBS=1 bash scripts/check_cuda_build.sh     (files one at a time; default: one per core)
#        NVCC=/path/to/nvcc KEEP=1 VERBOSE=1 ...     (KEEP keeps the temp dir, VERBOSE prints logs)
#
# Each source is compiled with `nvcc -c` into a temp dir with the flags torch's CUDAExtension
# would use (torch's include dirs, Python's, TORCH_EXTENSION_NAME=_C, TORCH_API_INCLUDE_EXTENSION_H,
# _GLIBCXX_USE_CXX11_ABI=<torch's>, --expt-relaxed-constexpr, the __CUDA_NO_HALF_OPERATORS__
# family, -fPIC) plus setup.py's CUDA flags (-O3 -lineinfo, the arch-list macro), the C++ standard
# torch's build helper would pick (C++20; torch 2.14's headers require it), and
# device code for sm_90a and sm_80. ptxas is asked to warn about register spills and local
# memory. It prints the seconds each file took and exits non-zero on any error, and on any
# warning it considers serious: a warning located in this repository's sources, any ptxas
# warning (spills, local memory, ...) and any nvcc driver warning. Warnings inside torch's own
# headers are counted, not fatal.
#
# What it proves: the sources are valid C++/CUDA against these torch headers and this toolkit,
# every kernel template instantiated by the host code compiles for both architectures, and none
# spills registers. What it does not prove: that the kernels are correct or fast, that the
# extension links and loads (no link step: a CPU-only torch has no libtorch_cuda to link
# against), or that the ops register and dispatch. The CUDA cases of tests/test_kernels.py check those on a
# machine with a GPU.
#
# A CPU-only torch still ships the ATen/cuda and c10/cuda headers, but not the CMake-generated
# c10/cuda/impl/cuda_cmake_macros.h (whose only content is the Windows DLL-export switch
# C10_CUDA_BUILD_SHARED_LIBS). When it is missing the script defines
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE, the switch c10 provides to skip it; on Linux that changes
# nothing. The kernels avoid ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE/cuSOLVER
# headers that a bare toolkit lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC=$(command -v nvcc)
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC=$CUDA_HOME/bin/nvcc
  else
    echo "check_cuda_build: nvcc not found (PATH or \$CUDA_HOME/bin)" >&2
    exit 2
  fi
fi

# Include dirs and ABI of the torch that setup.py would build against (one line each).
mapfile -t TORCH_INFO < <("$PY" - <<'EOF'
import os, sysconfig
import torch
from torch.utils import cpp_extension
print(" ".join(cpp_extension.include_paths()))
print(sysconfig.get_paths()["include"])
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__)
print(os.path.join(os.path.dirname(torch.__file__), "include"))
EOF
)
read -r -a TORCH_INCLUDES <<<"${TORCH_INFO[0]}"
PY_INCLUDE=${TORCH_INFO[1]}
CXX11_ABI=${TORCH_INFO[2]}
TORCH_VERSION=${TORCH_INFO[3]}
TORCH_ROOT_INCLUDE=${TORCH_INFO[4]}

INCLUDES=()
for dir in "${TORCH_INCLUDES[@]}"; do INCLUDES+=("-I$dir"); done
INCLUDES+=("-I$PY_INCLUDE")
# Headers every kernel includes must be in torch's include dir even on a CPU build.
for header in ATen/cuda/CUDAContextLight.h c10/cuda/CUDAGuard.h c10/cuda/CUDAStream.h c10/cuda/CUDAException.h; do
  if [ ! -f "$TORCH_ROOT_INCLUDE/$header" ]; then
    echo "check_cuda_build: torch $TORCH_VERSION has no $header; a CUDA build of torch is needed" >&2
    exit 2
  fi
done

DEFINES=(
  -DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
  '-DFASTROME_CUDA_ARCH_LIST="8.0;9.0a"'
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__
)
NOTE=""
if [ ! -f "$TORCH_ROOT_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  DEFINES+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  NOTE=" (CPU torch: c10/cuda/impl/cuda_cmake_macros.h absent, C10_CUDA_NO_CMAKE_CONFIGURE_FILE defined)"
fi

# Keep in step with setup.py's CUDA section (nvcc flags and the default arch list).
NVCC_FLAGS=(
  -O3 -std=c++20 -lineinfo --expt-relaxed-constexpr -Xcompiler -fPIC
  -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80
  -Xptxas=-warn-spills,-warn-lmem-usage --resource-usage
)
CXX_FLAGS=(-O3 -std=c++20 -fPIC -Wall)

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu csrc/cuda/*.cpp)
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "check_cuda_build: no sources in csrc/cuda" >&2
  exit 2
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/fastrome-cuda-check.XXXXXX")
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$TMP"' EXIT; fi
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 1)}
# The toolkit's headers, for the host-compiled .cpp sources: CUDA_HOME's, else those of the root nvcc
# reports in a dry run (nvcc may be a link or a wrapper script away from its toolkit)
CUDA_INCLUDE=${CUDA_HOME:+$CUDA_HOME/include}
if [ -z "$CUDA_INCLUDE" ] || [ ! -f "$CUDA_INCLUDE/cuda_runtime_api.h" ]; then
  TOP=$("$NVCC" -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  CUDA_INCLUDE=${TOP:-$(dirname "$(dirname "$NVCC")")}/include
fi
NVCC_VERSION=$("$NVCC" --version | tail -n 1)
echo "check_cuda_build: $NVCC ($NVCC_VERSION), torch $TORCH_VERSION, CXX11 ABI $CXX11_ABI, $JOBS job(s)$NOTE"

# Compiles one source; writes its log, exit status and seconds next to the object.
compile_one() {
  local src=$1 base
  base=$TMP/$(basename "$src")
  local start end rc=0
  start=$(date +%s.%N)
  if [[ $src == *.cu ]]; then
    "$NVCC" -c "$src" -o "$base.o" "${NVCC_FLAGS[@]}" "${DEFINES[@]}" "${INCLUDES[@]}" >"$base.log" 2>&1 || rc=$?
  else
    "${CXX:-c++}" -c "$src" -o "$base.o" "${CXX_FLAGS[@]}" "${DEFINES[@]}" "${INCLUDES[@]}" "-I$CUDA_INCLUDE" \
      >"$base.log" 2>&1 || rc=$?
  fi
  end=$(date +%s.%N)
  echo "$rc" >"$base.rc"
  awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f\n", e - s }' >"$base.sec"
}

total_start=$(date +%s.%N)
running=0
for src in "${SOURCES[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true
total_end=$(date +%s.%N)

failed=0
repo=$(pwd)
for src in "${SOURCES[@]}"; do
  base=$TMP/$(basename "$src")
  rc=$(cat "$base.rc")
  secs=$(cat "$base.sec")
  # Serious warnings: ours (a path in this repo's csrc/), ptxas, or the nvcc driver itself.
  serious=$(grep -E "warning" "$base.log" | grep -E "^(\./)?csrc/|^$repo/csrc/|ptxas|^nvcc warning" || true)
  header_warnings=$(grep -cE "warning( #[0-9]+-D)?:" "$base.log" || true)
  # ptxas --resource-usage: kernels compiled (all archs), most registers, any spill bytes.
  usage=$(awk '/Compiling entry function/ { k++ }
               /Used [0-9]+ registers/ { for (i = 1; i < NF; i++) if ($(i + 1) == "registers,") r = ($i > r ? $i : r) }
               /spill stores/ { s += $5 + $9 }
               END { printf "%d kernel(s), <= %d registers, %d spill bytes", k, r, s }' "$base.log")
  errors=$(grep -cE "error( #[0-9]+-D)?:|fatal error" "$base.log" || true)
  status=ok
  if [ "$rc" != 0 ] || [ "$errors" != 0 ]; then
    status="FAILED (exit $rc, $errors error line(s))"
  elif [ -n "$serious" ]; then
    status="FAILED (serious warnings)"
  fi
  printf '  %-34s %6ss  %s' "$src" "$secs" "$status"
  if [[ $src == *.cu ]]; then printf '  [%s]' "$usage"; fi
  if [ "$status" = ok ] && [ "$header_warnings" != 0 ]; then
    printf '  (%s warning line(s), all in torch headers)' "$header_warnings"
  fi
  printf '\n'
  if [ "$status" != ok ]; then
    failed=1
    if [ -n "$serious" ]; then printf '%s\n' "$serious" | sed 's/^/      /'; fi
    grep -E -B2 -A3 "error( #[0-9]+-D)?:|fatal error" "$base.log" | head -n 60 | sed 's/^/      /' || true
  elif [ -n "${VERBOSE:-}" ]; then
    sed 's/^/      /' "$base.log"
  fi
done
awk -v s="$total_start" -v e="$total_end" -v n="${#SOURCES[@]}" \
  'BEGIN { printf "check_cuda_build: %d file(s) in %.1fs wall\n", n, e - s }'
if [ -n "${KEEP:-}" ]; then echo "check_cuda_build: objects and logs kept in $TMP"; fi
if [ "$failed" != 0 ]; then
  echo "check_cuda_build: FAILED" >&2
  exit 1
fi
echo "check_cuda_build: OK"
