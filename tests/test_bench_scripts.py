"""The benchmark launchers parse and name their runs (they start hours of work, so a typo must
fail at once, not after the model has loaded)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def lifelong(*args):
    return subprocess.run(["bash", str(ROOT / "benches" / "lifelong_runs.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_lifelong_runs_are_listed_with_their_settings():
    out = lifelong("--list")
    assert out.returncode == 0, out.stderr
    runs = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert runs["default"] == "(the library defaults)" and runs["classic"] == "--classic"
    assert all(value.startswith("--classic") for name, value in runs.items() if name != "default")


def test_an_unknown_run_is_refused_before_any_work():
    out = lifelong("no-such-run", "10")
    assert out.returncode == 2 and "unknown run 'no-such-run'" in out.stderr


def test_every_named_run_has_valid_settings():
    import sys

    sys.path.insert(0, str(ROOT / "benches"))
    try:
        from collapse_study import parse_overrides
    finally:
        sys.path.pop(0)
    from fastrome.config import CLASSIC, make_config

    for name, value in dict(line.split(": ", 1) for line in lifelong("--list").stdout.splitlines()).items():
        words = [] if name == "default" else value.split()
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        overrides = {**(CLASSIC if "--classic" in words else {}), **parse_overrides(sets)}
        if "--mode" in words:
            overrides["mode"] = words[words.index("--mode") + 1]
        make_config(**overrides).resolve("llama")  # raises, naming the field, on a typo or a bad value
