#!/usr/bin/env sh
# Builds the fastrome wheel, installs it into a fresh virtual environment and runs the smoke tests
# there, from outside the source tree, so they exercise the installed wheel (its compiled extension,
# package data and command) rather than the checkout.
#   scripts/wheel_smoke.sh            (CPU build; FASTROME_BUILD_CUDA=1 adds the CUDA extension)
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
TORCH_VERSION=${FASTROME_TORCH_VERSION:-2.13.0}
WORK=${FASTROME_WHEEL_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
echo "[wheel] building in $WORK"
rm -rf "$WORK/dist"
"$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/fastrome-*.whl)
echo "[wheel] built $(basename "$WHEEL")"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
# the same torch as the build environment: the extension is compiled against its ABI
TORCH_BUILT=$("$PY" -c 'import torch; print(torch.__version__)')
"$VPY" -m pip install -q --no-index --no-deps "torch==$TORCH_BUILT" 2>/dev/null \
  || "$VPY" -m pip install -q --no-deps "torch==$TORCH_BUILT" 2>/dev/null \
  || "$VPY" -m pip install -q --no-deps "torch==$TORCH_BUILT" --index-url https://download.pytorch.org/whl/cpu
"$VPY" -m pip install -q "torch==$TORCH_BUILT" "$WHEEL[test]"
cd "$WORK"
FASTROME_SOURCE="$ROOT" FASTROME_REQUIRE_EXT=1 "$VPY" -m pytest -q -p no:cacheprovider \
  --rootdir "$WORK" -c /dev/null "$ROOT/tests/test_wheel_smoke.py"
"$WORK/venv/bin/fastrome" info | tail -5
