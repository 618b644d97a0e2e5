"""The repository root must not shadow installed packages.

``make demo`` and ``make test`` run ``python -m ...`` from the repository root, which puts the root
first on ``sys.path``: any folder there with an ``__init__.py`` (or any ``.py`` file) is imported in
place of an installed distribution of the same name. A root folder named ``kernels`` did exactly
that to transformers 5.25, which imports the ``kernels`` package from the package index.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_only_fastrome_is_importable_from_the_repository_root():
    packages = sorted(p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    modules = sorted(p.stem for p in REPO.glob("*.py"))
    assert packages == ["fastrome"], f"importable folders at the repository root: {packages}"
    assert modules == ["setup"], f"importable modules at the repository root: {modules}"


def test_transformers_and_fastrome_import_from_the_repository_root():
    # exactly what `python -m fastrome demo` does before anything else: the root on sys.path, then
    # transformers' activations (which import the package index's `kernels`) and every fastrome part
    code = "import transformers.activations, fastrome, fastrome.kernels, fastrome.cli; print(fastrome.kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).parent.parent.name == "fastrome"
