#!/usr/bin/env sh
# Builds the fastrome wheel, installs it into a fresh virtual environment and runs the smoke tests
# there, from outside the source tree, so they exercise the installed wheel (its compiled extension,
# package data and command) rather than the checkout.
#   scripts/wheel_smoke.sh            (CPU build; FASTROME_BUILD_CUDA=1 adds the CUDA extension)
# The build must compile every extension it is asked for (FASTROME_REQUIRE_EXT=1), and the wheel
# must hold them: a compile that fails quietly would otherwise ship a wheel without kernels.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
TORCH_VERSION=${FASTROME_TORCH_VERSION:-2.13.0}
WORK=${FASTROME_WHEEL_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
echo "[wheel] building in $WORK"
rm -rf "$WORK/dist"
# pip builds in the source tree, and the wheel takes everything under build/lib: an extension left
# there by an earlier build (a CUDA one, another torch) would ship in this wheel
rm -rf "$ROOT/build"
FASTROME_REQUIRE_EXT=1 "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" . >"$WORK/build.log" 2>&1 \
  || { grep -m 20 -E "error|Error" "$WORK/build.log"; tail -30 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/fastrome-*.whl)
EXPECT="fastrome/_C\\."
case "${FASTROME_BUILD_CUDA:-auto}" in 1|true|yes) EXPECT="$EXPECT fastrome/_C_cuda\\." ;; esac
LISTING=$("$PY" -m zipfile -l "$WHEEL")
for ext in $EXPECT; do
  echo "$LISTING" | grep -q "$ext" || { echo "[wheel] $(basename "$WHEEL") holds no $ext*.so" >&2; exit 1; }
done
echo "[wheel] built $(basename "$WHEEL"): $(echo "$LISTING" | grep -o 'fastrome/_C[a-z_]*\.[^ ]*\.so' | tr '\n' ' ')"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
# the same torch as the build environment: the extension is compiled against its ABI. The
# distribution's version, not torch.__version__: a wheel from PyPI reports e.g. 2.14.1+cu130 there
# but is published as 2.14.1
TORCH_BUILT=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')
"$VPY" -m pip install -q --no-index --no-deps "torch==$TORCH_BUILT" 2>/dev/null \
  || "$VPY" -m pip install -q --no-deps "torch==$TORCH_BUILT" 2>/dev/null \
  || "$VPY" -m pip install -q --no-deps "torch==$TORCH_BUILT" --index-url https://download.pytorch.org/whl/cpu
"$VPY" -m pip install -q "torch==$TORCH_BUILT" "$WHEEL[test]"
cd "$WORK"
TESTS="$ROOT/tests/test_wheel_smoke.py"
case "${FASTROME_BUILD_CUDA:-auto}" in
  # a CUDA build also runs the CUDA kernel suite: without a device every test there must skip cleanly
  1|true|yes) export FASTROME_EXPECT_CUDA=1 FASTROME_TEST_BACKENDS=cuda; TESTS="$TESTS $ROOT/tests/test_kernels.py" ;;
esac
# shellcheck disable=SC2086
FASTROME_SOURCE="$ROOT" FASTROME_REQUIRE_EXT=1 "$VPY" -m pytest -q -rs -p no:cacheprovider \
  --rootdir "$WORK" -c /dev/null -o "markers=gpu: needs a CUDA device" -p no:randomly $TESTS
"$WORK/venv/bin/fastrome" info | tail -5
