"""The ``fastrome`` command: ``edit``, ``demo``, ``eval``, ``stats``, ``plot`` and ``info``.

Bad input ends a command with one line on stderr, ``fastrome <cmd>: error: ...``, and exit status
2; the flags are checked before a model is loaded, so a typo costs no model load and no work.

One module per command (``edit`` with ``demo``, ``stats``, ``eval``, ``plot``, ``sysinfo`` for
``info``), each a thin layer over the library; ``common`` holds the checks and flags they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from fastrome.cli import edit, eval, plot, stats, sysinfo
from fastrome.cli.common import UsageError, echo
from fastrome.cli.stats import parse_layers
from fastrome.cli.sysinfo import info

__all__ = ["DEBUG_ENV", "UsageError", "build_parser", "info", "main", "parse_layers"]

DEBUG_ENV = "FASTROME_DEBUG"  # =1: unexpected errors propagate with their traceback


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each one's ``func`` runs it."""
    parser = argparse.ArgumentParser(prog="fastrome", description="Fast, guarded rank-one model editing (ROME).")
    sub = parser.add_subparsers(dest="command", required=True)
    edit.add_parsers(sub)
    stats.add_parser(sub)
    eval.add_parser(sub)
    plot.add_parser(sub)
    sysinfo.add_parser(sub)
    return parser


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _report_error(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {_one_line(message)}\n")
    sys.stderr.flush()


def _show_log() -> None:
    """The library's operational messages on stderr, one line each, unless logging is configured
    already (an application calling main() keeps its own setup)."""
    import logging

    log = logging.getLogger("fastrome")
    if logging.getLogger().handlers or any(not isinstance(h, logging.NullHandler) for h in log.handlers):
        return
    class Stderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is when a message comes (it may be replaced after main starts)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    handler = Stderr()
    handler.setFormatter(logging.Formatter("[fastrome] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command in ``argv``; returns its exit status. Bad input, whether found on the
    command line or by the library while the command runs (a ``ValueError``), is printed as one
    line and raises :class:`UsageError` (status 2), as argparse does for the flags it checks. Any
    other error is printed as one line too and the status is 1; ``FASTROME_DEBUG=1`` lets it
    propagate with its traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    _show_log()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        echo("interrupted")
        return 130
    except UsageError as exc:
        _report_error(prog, str(exc))
        raise
    except ValueError as exc:
        _report_error(prog, str(exc))
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # anything else (a file that cannot be written, a bug): one line, status 1
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        _report_error(prog, f"{type(exc).__name__}: {exc} ({DEBUG_ENV}=1 shows where it happened)")
        return 1
