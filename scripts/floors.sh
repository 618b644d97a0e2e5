#!/usr/bin/env bash
# Runs the engine's tests against the oldest torch and transformers that pyproject.toml declares,
# in a fresh virtual environment, so the floors stay true. The floors are read from pyproject.toml
# (the `torch>=` and `transformers>=` requirements), installed exactly (`==`), and held there while
# fastrome and its test extra install. The C++ CPU extension is built against that torch; CUDA
# sources are left out (PyPI's torch builds target CUDA 12, this machine's nvcc may be newer).
#   scripts/floors.sh                 (python from $PYTHON, else python3; tests: $FLOOR_TESTS)
# PyPI's Linux torch wheels carry CUDA libraries: the environment is several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=${FASTROME_FLOORS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fastrome-floors.XXXXXX")}
TESTS=${FLOOR_TESTS:-tests/test_runners.py tests/test_editor.py tests/test_journal.py tests/test_sequential.py tests/test_spread.py tests/test_requests.py tests/test_ops.py tests/test_kernels.py}

read -r TORCH_FLOOR TRANSFORMERS_FLOOR < <("$PY" - <<'PYEOF'
import re
text = open("pyproject.toml", encoding="utf-8").read()
deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]  # [project] dependencies
def floor(name):
    m = re.search(rf'"{name}\s*>=\s*([0-9][0-9.]*)[^"]*"', deps)
    if not m:
        raise SystemExit(f"pyproject.toml declares no '{name}>=' floor")
    return m.group(1)
print(floor("torch"), floor("transformers"))
PYEOF
)
echo "[floors] torch==$TORCH_FLOOR transformers==$TRANSFORMERS_FLOOR in $WORK/venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# numpy<2.4: the Triton that the floor torch pins (3.4 for torch 2.8) has an interpreter that NumPy
# 2.4 breaks (a one-element array used as a loop bound); with it the Triton kernel cases run here.
printf 'torch==%s\ntransformers==%s\nnumpy<2.4\n' "$TORCH_FLOOR" "$TRANSFORMERS_FLOOR" >"$WORK/floors.txt"
"$VPY" -m pip install -q -c "$WORK/floors.txt" torch transformers "setuptools>=77" wheel ninja
# a regular (not editable) install: the tests below import the installed package, not the checkout,
# so this build of the extension never replaces the checkout's own. pip builds in the source tree and
# setuptools skips an extension whose file in build/lib is newer than its sources: one built there
# against another torch (by the wheel smoke test) would be installed as it is, so build/ goes first.
rm -rf "$ROOT/build"
FASTROME_BUILD_CUDA=0 "$VPY" -m pip install -q -c "$WORK/floors.txt" --no-build-isolation "$ROOT[test]"
cd "$WORK"  # out of the checkout, so that the installed package is the one imported
"$VPY" - <<'PYEOF'
import torch, transformers, fastrome
from fastrome import _extension
print(f"[floors] torch {torch.__version__}, transformers {transformers.__version__}, fastrome from {fastrome.__file__}")
if _extension.load_error() is not None:  # the C++ kernels must build against the floor torch, not only import
    raise SystemExit(f"[floors] the C++ extension does not load: {_extension.load_error()}")
print(f"[floors] C++ extension built against torch {_extension.build_info()['torch_version']}")
PYEOF
args=()
for t in $TESTS; do args+=("$ROOT/$t"); done
"$VPY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "${args[@]}"
