"""Loads fastrome's compiled extensions if they were built; importing fastrome never needs them.

- ``fastrome._C``: the C++ CPU kernels of the four ops, as plain functions.
- ``fastrome._C_cuda``: their CUDA kernels. It is built and loaded apart from ``_C``, so a CUDA
  build that failed, or a CUDA runtime missing here, leaves the CPU kernels served.

The ops themselves are declared once, in :mod:`fastrome.ops` (``torch.ops.fastrome``), whose kernel
calls these functions for the backend it picks.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

_state: Dict[str, Any] = {}


def _import(name: str) -> None:
    if name in _state:
        return
    try:
        module = importlib.import_module(name)
        _state[name] = (module, None)
    except ImportError as exc:  # not built, or built against another torch / CUDA runtime
        _state[name] = (None, f"{type(exc).__name__}: {exc}")


def _cpu() -> tuple:
    _import("fastrome._C")
    return _state["fastrome._C"]


def _cuda() -> tuple:
    _import("fastrome._C_cuda")
    return _state["fastrome._C_cuda"]


def cpu_kernels() -> Optional[Any]:
    """The module ``fastrome._C`` (the C++ CPU kernels), or None when it is not loaded."""
    return _cpu()[0]


def cuda_kernels() -> Optional[Any]:
    """The module ``fastrome._C_cuda`` (the CUDA kernels), or None when it is not loaded."""
    return _cuda()[0]


def load_error() -> Optional[str]:
    """None if the CPU extension ``fastrome._C`` is loaded, else why it could not be."""
    return _cpu()[1]


def cuda_load_error() -> Optional[str]:
    """None if the CUDA extension ``fastrome._C_cuda`` is loaded, else why it could not be."""
    return _cuda()[1]


def build_info() -> Dict[str, Any]:
    """What the extensions were built with: ``_C``'s details, ``cuda`` (whether ``_C_cuda`` is
    loaded) and, when it is, its details under ``cuda_build``, else why not under ``cuda_error``.
    Empty when ``_C`` is not built."""
    module, _ = _cpu()
    if module is None:
        return {}
    info = dict(module.build_info())
    cuda, why = _cuda()
    info["cuda"] = cuda is not None
    if cuda is not None:
        info["cuda_build"] = dict(cuda.build_info())
    else:
        info["cuda_error"] = why
    return info


def built_with_cuda() -> bool:
    """Whether the CUDA kernels are loaded (``fastrome._C_cuda``)."""
    return _cuda()[0] is not None
