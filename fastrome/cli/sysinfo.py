"""``fastrome info``: versions, build, and which backend serves each op.

(Not named ``info.py``: ``fastrome.cli.info`` is the function below, re-exported by the package.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any, Dict, Optional

from fastrome.cli.common import echo


def info() -> Dict[str, Any]:
    """Versions, build and backend choices, as a dict."""
    import importlib.metadata as md

    import torch

    from fastrome import __version__, _extension, ops
    from fastrome.cache import cache_dir

    def version(name: str) -> Optional[str]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    try:
        from fastrome.models import default_model_file

        default_model = str(default_model_file())
    except FileNotFoundError as exc:
        default_model = f"not installed ({exc})"
    return {
        "fastrome": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "triton": version("triton"),
        "extension": _extension.build_info() or {"error": _extension.load_error()},
        "forced_backend": os.environ.get(ops.ENV_BACKEND),
        "backends": ops.backend_table(),
        "cache_dir": str(cache_dir()),
        "default_model": default_model,
    }


def cmd_info(args: argparse.Namespace) -> int:
    from fastrome import cli

    data = cli.info()  # through the package, where callers and tests may replace it
    if args.json:
        echo(json.dumps(data, indent=2, default=str))
        return 0
    for key in ("fastrome", "python", "platform", "torch", "torch_cuda", "cuda_available", "cuda_device", "threads",
                "transformers", "safetensors", "triton", "forced_backend", "cache_dir", "default_model"):
        echo(f"{key:16} {data[key]}")
    echo(f"{'extension':16} {data['extension']}")
    echo("\nop                        device  backend")
    for row in data["backends"]:
        why = "; ".join(f"{k}: {v}" for k, v in row["skipped"].items())
        echo(f"{row['op']:25} {row['device']:7} {row['backend']}" + (f"   (skipped {why})" if why else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``info`` command."""
    p = sub.add_parser("info", help="versions, build, and which backend serves each op")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
