"""Where fastrome keeps what it computes once (statistics, context templates), written atomically.

The directory is ``$FASTROME_CACHE`` if set, else ``$XDG_CACHE_HOME/fastrome``, else
``~/.cache/fastrome``. Files are written to a temporary name in the same directory, fsynced and renamed,
so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import secrets
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
    """Write ``path`` through ``write(tmp)``: data first, fsynced, then the rename, then the folder
    fsynced, so after a crash or power loss the name holds either the old content or the new one.
    The file gets the mode the umask gives (0666 & ~umask), like any other file the user creates:
    a cache shared by a team stays readable by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777  # what the umask gave
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors does) makes it 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return _atomic(path, write)


def write_text(path: PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(path, write)


def write_safetensors(path: PathLike, tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
