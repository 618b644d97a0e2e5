"""What the commands share: the usage error, the checks made on the command line before a model is
loaded, the flags common to several commands, and loading the model and editor they name."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fastrome.config import MODES


def echo(text: str = "") -> None:
    """``text`` and a newline on stdout, flushed at once (progress bars share the terminal)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class UsageError(SystemExit):
    """Bad command-line input; :func:`fastrome.cli.main` prints it as one line ``fastrome <cmd>: error: ...``.

    A :class:`SystemExit` with status 2, like argparse's own errors, so it ends the program
    without a traceback wherever it is raised; its text is the message, for callers of
    :func:`fastrome.cli.main` that catch it.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def flag_error(flag: str, exc: Exception) -> UsageError:
    """``exc``'s message under ``flag``, without the library's own argument name in front of it
    (``"model: '/x' is ..."`` becomes ``"--model: '/x' is ..."``)."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    if sep and head.isidentifier():
        text = rest
    return UsageError(f"{flag}: {text}")


# -- checks of the command line, all made before a model is loaded ----------------------------------

def at_least(value: Optional[int], flag: str, minimum: int) -> None:
    """Refuse an integer flag below ``minimum`` (None: not given, the default applies)."""
    if value is not None and value < minimum:
        want = "a positive number" if minimum == 1 else f"a number >= {minimum}"
        raise UsageError(f"{flag}: expected {want}, got {value}")


def parse_dtype(name: str) -> Any:
    """The torch dtype ``--dtype`` names (None for ``auto``), or a :class:`UsageError`."""
    from fastrome.models import parse_dtype as parse

    try:
        return parse(name)
    except ValueError as exc:  # "dtype: expected ..., got ..."
        raise UsageError(f"--{exc}") from None


def check_device(name: str) -> None:
    """``name`` must parse as a torch device, and a GPU one must exist here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device: {name!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {name!r}, but CUDA is not available here (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device: {name!r}, but this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device: {name!r}, but MPS is not available here (use --device cpu)")


def check_runtime(args: argparse.Namespace) -> None:
    """``--dtype`` and ``--device``."""
    parse_dtype(args.dtype)
    check_device(args.device)


def check_stats(stats: Optional[str], corpus: Optional[str]) -> None:
    """``--stats`` names statistics that exist and ``--corpus`` text that exists (a typo would
    otherwise surface only when the statistics are first needed, after the model has loaded and
    completions have run)."""
    from fastrome.stats.source import check_sources

    try:
        check_sources(stats, corpus)
    except ValueError as exc:  # its messages start with the argument's name, "stats: ..." or "corpus: ..."
        raise UsageError(f"--{exc}") from None


def check_writable(path: str, flag: str, *, folder: Optional[bool]) -> None:
    """``path`` can be written: it exists, is a folder (``folder=True``) or a file (``folder=False``)
    as asked, and is writable; or it does not exist yet and the nearest folder above it that does
    is writable (the folders in between are created). Checked up front because results are
    written only at the end of the work."""
    p = Path(path)
    if p.exists():
        if folder is True and not p.is_dir():
            raise UsageError(f"{flag}: {path!r} is an existing file; give a folder to write to (a new one or an "
                             "existing folder)")
        if folder is False and p.is_dir():
            raise UsageError(f"{flag}: {path!r} is a folder; give a file name")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag}: {path!r} is not writable")
        return
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot create {path!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot create {path!r}: the folder {str(parent)!r} is not writable")


def check_edit_flags(args: argparse.Namespace) -> None:
    """The flags of ``edit``, ``demo`` and ``eval`` that need no file read and no model."""
    at_least(args.layer, "--layer", 0)
    at_least(args.spread, "--spread", 1)
    at_least(args.tokens, "--tokens", 1)
    at_least(args.max_new_tokens, "--max-new-tokens", 0)
    if args.layer is not None and args.spread is not None and args.spread > args.layer + 1:
        raise UsageError(f"--spread: {args.spread} layers ending at --layer {args.layer} would start below layer 0 "
                         f"(at most {args.layer + 1} there)")
    check_runtime(args)
    check_stats(args.stats, args.corpus)
    settings(args)
    if args.output:
        check_writable(args.output, "--output", folder=True)


def model_depth(model: Optional[str], *, read_config: bool) -> Optional[int]:
    """Check that ``--model`` names a model that can be loaded, without loading it; with
    ``read_config``, its number of layers from its configuration (config.json or the GGUF header,
    not the weights); None when not read or not stated there."""
    from fastrome.adapter import _n_layers
    from fastrome.models import _resolve

    try:
        where, kwargs, _ = _resolve(model)
    except (ValueError, FileNotFoundError) as exc:
        raise flag_error("--model", exc) from None
    if not read_config:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True,
                                            **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model: cannot read the configuration of {model or where!r} ({exc})") from None
    return _n_layers(config)


def check_layer(args: argparse.Namespace) -> None:
    """``--model`` can be loaded and ``--layer`` is one of its layers (the last check before loading)."""
    n_layers = model_depth(args.model, read_config=args.layer is not None)
    if args.layer is not None and n_layers is not None and args.layer >= n_layers:
        raise UsageError(f"--layer: {args.layer} is not a layer of this model (it has layers 0-{n_layers - 1})")


def read_text(path: Path, flag: str) -> str:
    """The UTF-8 text of the file ``flag`` names, or a :class:`UsageError` that says why not."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag}: {str(path)!r} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {str(path)!r} ({exc.strerror or exc})") from None


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """``--set FIELD=VALUE`` pairs as EditConfig overrides (values read as JSON, else as text),
    checked by the config's own validation before any model is loaded."""
    from fastrome.config import make_config

    out: Dict[str, Any] = {}
    for item in getattr(args, "settings", None) or []:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    try:
        make_config(**out)
    except ValueError as exc:
        raise UsageError(f"--set: {exc}") from None
    return out


# -- the model and the editor the flags name ----------------------------------------------------

def load(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The model and tokenizer of ``--model``/``--dtype``/``--device``; says how long it took
    unless ``--json``."""
    from fastrome.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=parse_dtype(args.dtype), device=args.device)
    if not args.json:
        name = args.model or "the default model (SmolLM2-135M-Instruct)"
        echo(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
    return model, tok


def editor_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The editor settings of the flags: the classic-ROME ones under ``--classic`` (the base), the
    ``--set`` pairs over them, and the dedicated flags that were given over both."""
    from fastrome.config import CLASSIC

    flags = {"layer": args.layer, "mode": args.mode, "spread": args.spread, "policy": args.policy,
             "stats_tokens": args.tokens}
    classic = dict(CLASSIC) if getattr(args, "classic", False) else {}
    return {**classic, **settings(args), **{k: v for k, v in flags.items() if v is not None}}


def editor(model: Any, tok: Any, args: argparse.Namespace) -> Any:
    """A :class:`fastrome.Editor` on ``model`` with the settings and statistics of the flags."""
    from fastrome import Editor

    return Editor(model, tok, stats=args.stats, corpus=args.corpus, progress=not args.json, **editor_settings(args))


# -- flags shared by several commands -----------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--device`` and ``--json``."""
    p.add_argument("--model", default=None,
                   help="local model folder, .gguf file or model id in the local Hugging Face cache "
                        "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16, float16 or auto (the checkpoint's own)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="device to load the model on")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    """The editor's flags, shared by ``edit``, ``demo`` and ``eval``."""
    p.add_argument("--classic", action="store_true",
                   help="classic one-edit ROME: consistent keys, no edit memory, no early stopping "
                        "(the default's lifelong settings off; --mode and --set still apply on top)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="keys of the update (default dual: exact at the prefixed mean and the unprefixed key)")
    p.add_argument("--layer", type=int, default=None, help="edited layer (default: the model's measured layer)")
    p.add_argument("--spread", type=int, default=None,
                   help="share each edit among this many layers ending at --layer (default 4, fewer below "
                        "layer 3; 1 with --classic)")
    p.add_argument("--policy", choices=("raise", "skip", "force"), default=None)
    p.add_argument("--stats", default=None,
                   help="statistics: a file written by `fastrome stats`, a ROME .npz, or 'identity' (default: "
                        "computed from --corpus and cached)")
    p.add_argument("--corpus", default=None,
                   help="text the statistics are computed from: a file, a folder, hf:NAME or 'bundled' (default)")
    p.add_argument("--tokens", type=int, default=None, help="token budget when statistics are computed")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length of the greedy completions shown")
    p.add_argument("--output", default=None,
                   help="write the edited model (safetensors) with its tokenizer to this folder, and the edits in "
                        "its fastrome_edits/ subfolder")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                   help="any EditConfig field, e.g. memory_beta=0.02 or mpes_checks=2 (repeatable; values "
                        "read as JSON)")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
