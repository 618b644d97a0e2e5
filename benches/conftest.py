"""Shared benchmark harness: device choice, synchronised timing, provenance in the JSON output.

Run: ``python -m pytest benches --benchmark-only --benchmark-json=benches/results/ops_<device>.json``
then ``python benches/render.py benches/results/ops_<device>.json`` for the tables.
"""

from __future__ import annotations

import platform
import subprocess
import time

import pytest
import torch
from harness import DEVICE, sync


@pytest.fixture
def timed(benchmark):
    """timed(fn, setup=None, rounds=..., **info): benchmark ``fn`` with device synchronisation and
    record ``info`` (op, impl, shape, dtype, flop or bytes) next to the timings."""

    def run(fn, *, setup=None, rounds=None, **info):
        def target():
            fn()
            sync()

        benchmark.extra_info.update(info, device=DEVICE)
        rounds = rounds or (20 if DEVICE == "cuda" else 5)
        if setup is None:
            benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import fastrome
    from fastrome import _extension

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    output_json["fastrome"] = {
        "version": fastrome.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "extension": _extension.build_info(),
    }
