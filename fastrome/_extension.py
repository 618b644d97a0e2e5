"""Loads the compiled extension ``fastrome._C`` if it was built; importing fastrome never needs it.

Importing ``fastrome._C`` registers the ``torch.ops.fastrome_C`` kernels (C++ CPU, and CUDA when
the build had a toolkit) and exposes :func:`build_info`.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

_state: Dict[str, Any] = {}


def _load() -> None:
    if "module" in _state:
        return
    try:
        module = importlib.import_module("fastrome._C")
        _state["module"], _state["error"] = module, None
    except ImportError as exc:  # not built, or built against another torch
        _state["module"], _state["error"] = None, f"{type(exc).__name__}: {exc}"


def load_error() -> Optional[str]:
    """None if the extension is loaded, else why it could not be."""
    _load()
    return _state["error"]


def build_info() -> Dict[str, Any]:
    """What the extension was built with (empty when it is not built)."""
    _load()
    module = _state["module"]
    return dict(module.build_info()) if module is not None else {}


def built_with_cuda() -> bool:
    return bool(build_info().get("cuda", False))
