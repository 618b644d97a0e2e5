"""The CUDA sources compile (scripts/check_cuda_build.sh), on any machine that has nvcc.

No GPU is needed: the script only runs `nvcc -c` for sm_90a and sm_80 against the installed torch's
headers. It takes about two minutes on a 2-core machine (3 files, 2 at a time), so it stays in the
default suite. What it does not cover (linking, loading, running the kernels) is left to
the CUDA cases of tests/test_kernels.py on a machine with a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_cuda_build.sh"


def _nvcc():
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


@pytest.mark.skipif(
    _nvcc() is None, reason="nvcc is not on PATH (nor in $CUDA_HOME/bin): the CUDA sources cannot be compiled here"
)
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed to run scripts/check_cuda_build.sh")
def test_cuda_sources_compile():
    env = dict(os.environ, PYTHON=sys.executable, NVCC=_nvcc())
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL
    )
    output = proc.stdout + proc.stderr
    if proc.returncode == 2:  # the script's "cannot check here" (e.g. a torch without c10/cuda headers)
        pytest.skip(f"scripts/check_cuda_build.sh cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, output
    assert "check_cuda_build: OK" in proc.stdout, output
    sources = sorted(p.name for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources found"
    for name in sources:
        line = next((ln for ln in proc.stdout.splitlines() if f"csrc/cuda/{name}" in ln), "")
        assert " ok" in line, f"{name} not reported as compiled:\n{output}"
