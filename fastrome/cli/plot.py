"""``fastrome plot``: the figures of one or more sequential runs, as PNG files."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastrome.cli.common import UsageError, check_writable, echo


def cmd_plot(args: argparse.Namespace) -> int:
    from fastrome.evaluation.plots import plot_runs

    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise UsageError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    for run in args.runs:
        if not Path(run).is_dir():
            raise UsageError(f"runs: {run!r} is not a folder")
    check_writable(args.out, "--out", folder=True)
    if args.max_edits is not None and args.max_edits < 1:
        raise UsageError(f"--max-edits: expected a positive number of edits, got {args.max_edits}")
    files = plot_runs(dict(zip(labels, args.runs)), args.out, title=args.title, max_edits=args.max_edits)
    for f in files:
        echo(str(f))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``plot`` command."""
    p = sub.add_parser("plot", help="plot sequential runs (checkpoints and per-edit figures) as PNG")
    p.add_argument("runs", nargs="+", help="run folders (with checkpoints.jsonl / edits.jsonl)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per run")
    p.add_argument("--title", default=None)
    p.add_argument("--max-edits", type=int, default=None, help="plot each run up to this many edits")
    p.set_defaults(func=cmd_plot)
