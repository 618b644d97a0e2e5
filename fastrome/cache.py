"""Where fastrome keeps what it computes once (statistics, context templates), written atomically.

The directory is ``$FASTROME_CACHE`` if set, else ``$XDG_CACHE_HOME/fastrome``, else
``~/.cache/fastrome``. Files are written to a temporary name in the same directory and renamed,
so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

from safetensors.torch import save_file
from torch import Tensor

PathLike = Union[str, os.PathLike]


def cache_dir(override: Optional[PathLike] = None) -> Path:
    """The cache root (created on demand)."""
    if override is not None:
        root = Path(override)
    elif os.environ.get("FASTROME_CACHE"):
        root = Path(os.environ["FASTROME_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "fastrome"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic(path: PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return _atomic(path, write)


def write_safetensors(path: PathLike, tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
