"""PNG plots of sequential runs (:mod:`fastrome.sequential`) and of per-case evaluations.

Needs matplotlib (``pip install fastrome[plot]``); it is imported only when a plot is drawn and
always with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]

# (key in checkpoints.jsonl, label); drawn when present in any checkpoint
CHECKPOINT_PANELS: Tuple[Tuple[str, Tuple[Tuple[str, str], ...]], ...] = (
    ("retention", (("retention_score", "efficacy score"), ("retention", "top-1"),
                   ("retention_score_prefixed", "efficacy score, prefixed"),
                   ("retention_prefixed", "top-1, prefixed"))),
    ("specificity", (("specificity", "locality prompts keeping their answer"),)),
    ("perplexity / unedited", (("ppl", "ME-PPL_50"), ("wikitext_ppl", "WikiText-2"))),
    ("generation entropy", (("entropy_norm", "n-gram entropy / unedited"),)),
    ("weight drift", (("weight_drift", "largest ‖W − W₀‖ / ‖W₀‖ over the edited layers"),)),
)
# checkpoint metrics drawn relative to the run's unedited checkpoint
RELATIVE_KEYS = frozenset({"ppl", "wikitext_ppl"})
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
EDIT_PANELS: Tuple[Tuple[str, str, bool], ...] = (
    ("denominator_rel", "uᵀk / (‖u‖‖k‖)", True),
    ("update_ratio", "‖ΔW‖ / ‖W‖", True),
    ("interference", "‖Λ‖²·uᵀCu", True),
    ("final_loss", "final value loss", True),
    ("steps", "optimisation steps", False),
    ("sentinel_ppl", "sentinel perplexity", True),
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fastrome[plot]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: PathLike) -> List[Dict[str, Any]]:
    """The JSON objects of a JSON-lines file, skipping a torn last line."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_run(run_dir: PathLike) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(checkpoints, per-edit entries of applied edits in order) of a sequential run folder."""
    run = Path(run_dir)
    ckpt, edits = run / "checkpoints.jsonl", run / "edits.jsonl"
    if not ckpt.is_file() and not edits.is_file():
        raise ValueError(f"run_dir: {str(run)!r} holds neither checkpoints.jsonl nor edits.jsonl")
    points = read_jsonl(ckpt) if ckpt.is_file() else []
    entries = [e for e in (read_jsonl(edits) if edits.is_file() else []) if e.get("status") in ("applied", "forced")]
    return points, entries


def _finite(values: Sequence[Any]) -> List[float]:
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def _legend(ax: Any) -> None:
    """A legend inside the axes when it is short, beside them when it would hide the curves."""
    if len(ax.get_legend_handles_labels()[1]) > 4:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=7, loc="best")


# edits per running median in the per-edit figure of a comparison
EDIT_WINDOW = 25


def running_median(values: Sequence[float], window: int) -> List[float]:
    """Median of each value and the ``window - 1`` before it (fewer at the start), NaNs left out."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1): i + 1] if v == v]
        out.append(statistics.median(part) if part else math.nan)
    return out


def _run_legend(axes: Any) -> None:
    """One legend of the runs, beside the top panel (every panel draws the runs in the same colours)."""
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _spans_decades(ax: Any) -> bool:
    """Whether the curves drawn on ``ax`` reach ten times their smallest positive value."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y == y and y > 0]
    return bool(ys) and max(ys) >= 10 * min(ys)


def _finish(plt: Any, fig: Any, axes: Any, xlabel: str, title: str, path: Path) -> Path:
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title)
    # keep about 0.4 inch above the panels for the title, whatever the figure's height
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def trim_run(points: List[Dict[str, Any]], entries: List[Dict[str, Any]],
             max_edits: Optional[int]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """A run read by :func:`read_run` cut at ``max_edits`` edits (``None``: all of it)."""
    if max_edits is None:
        return points, entries
    return [p for p in points if p.get("edits", 0) <= max_edits], entries[:max_edits]


# From this many runs on, the checkpoint figure gets one panel per metric with one colour per run:
# the few-runs layout (colour = metric, line style = run) runs out of line styles and its legends
# outgrow the panels.
COMPARISON_RUNS = 3


def checkpoint_panels(data: Mapping[str, Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]]
                      ) -> List[Tuple[str, Tuple[Tuple[str, str], ...]]]:
    """The checkpoint figure's panels, ``[(y label, ((key, metric label), ...)), ...]``: grouped as in
    :data:`CHECKPOINT_PANELS` for up to :data:`COMPARISON_RUNS` - 1 runs, one metric per panel beyond."""
    def present(key: str) -> bool:
        return any(key in point for points, _ in data.values() for point in points)

    groups = [(name, tuple((k, w) for k, w in keys if present(k))) for name, keys in CHECKPOINT_PANELS]
    groups = [(name, keys) for name, keys in groups if keys]
    if len(data) < COMPARISON_RUNS:
        return groups
    return [(f"{what} / unedited" if key in RELATIVE_KEYS else what, ((key, what),))
            for name, keys in groups for key, what in keys]


def plot_runs(runs: Mapping[str, PathLike], out_dir: PathLike, title: Optional[str] = None,
              max_edits: Optional[int] = None) -> List[Path]:
    """Plot one or more runs (``{label: run folder}``) on shared axes: ``checkpoints.png`` (every
    tracked checkpoint metric against the number of edits) and ``per_edit.png`` (the per-edit
    denominator, update norm, loss, steps and sentinel perplexity), each run up to ``max_edits``
    edits (``None``: all). With a few runs a panel groups related metrics (colour = metric, line
    style = run); with :data:`COMPARISON_RUNS` or more each metric has its own panel and each run its
    colour, named once in a shared legend. Returns the files written."""
    if not runs:
        raise ValueError("runs: expected at least one run folder")
    if max_edits is not None and (isinstance(max_edits, bool) or not isinstance(max_edits, int) or max_edits < 1):
        raise ValueError(f"max_edits: expected a positive number of edits or None, got {max_edits!r}")
    plt = _pyplot()
    data = {label: trim_run(*read_run(path), max_edits) for label, path in runs.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    compare = len(data) >= COMPARISON_RUNS

    panels = checkpoint_panels(data)
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, (2.2 if compare else 2.6) * len(panels)),
                                 sharex=True, squeeze=False)
        for ax, (name, keys) in zip(axes[:, 0], panels):
            for r, (label, (points, _)) in enumerate(data.items()):
                for j, (key, what) in enumerate(keys):
                    pts = [p for p in points if key in p and "edits" in p]
                    if not pts:
                        continue
                    ys = _finite([p[key] for p in pts])
                    if key in RELATIVE_KEYS:  # relative to the run's first (unedited) checkpoint
                        ys = [y / ys[0] for y in ys] if ys[0] and pts[0]["edits"] == 0 else [math.nan] * len(ys)
                    if compare:  # one colour per run (line styles once the colours are used up)
                        style = {"color": f"C{r % 10}", "ls": LINESTYLES[(r // 10) % len(LINESTYLES)], "label": label}
                    else:  # one colour per metric, one line style per run
                        style = {"color": f"C{j}", "ls": LINESTYLES[r % len(LINESTYLES)],
                                 "label": f"{label}: {what}" if len(data) > 1 else what}
                    ax.plot([p["edits"] for p in pts], ys, marker=".", **style)
            if compare and any(k in RELATIVE_KEYS for k, _ in keys) and _spans_decades(ax):
                ax.set_yscale("log")
            ax.set_ylabel(name, fontsize=8 if compare else None)
            ax.grid(alpha=0.3)
            if not compare:
                _legend(ax)
        if compare:
            _run_legend(axes)
        written.append(_finish(plt, fig, axes, "edits applied", title or "sequential edits", out / "checkpoints.png"))
    edit_panels = [p for p in EDIT_PANELS if any(p[0] in e for _, entries in data.values() for e in entries)]
    if edit_panels:
        fig, axes = plt.subplots(len(edit_panels), 1, figsize=(8, 2.2 * len(edit_panels)), sharex=True,
                                 squeeze=False)
        for ax, (key, what, log) in zip(axes[:, 0], edit_panels):
            for r, (label, (_, entries)) in enumerate(data.items()):
                ys = _finite([e.get(key) for e in entries])
                if key == "denominator_rel":
                    ys = [abs(y) for y in ys]
                if compare:  # single edits of many runs hide each other: their running median
                    ys = running_median(ys, EDIT_WINDOW)
                ax.plot(range(1, len(ys) + 1), ys, lw=1.0 if compare else 0.6, color=f"C{r % 10}",
                        ls=LINESTYLES[(r // 10) % len(LINESTYLES)], label=label)
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(f"{what}\n(median of {EDIT_WINDOW})" if compare else what, fontsize=8)
            ax.grid(alpha=0.3)
            if len(data) > 1 and not compare:
                _legend(ax)
        if compare:
            _run_legend(axes)
        written.append(_finish(plt, fig, axes, "edit number", title or "per edit", out / "per_edit.png"))
    return written


def plot_cases(results: Sequence[Mapping[str, Any]], path: PathLike, title: Optional[str] = None) -> Path:
    """Per-case evaluation figures (one edit per case): each ``*_score`` as a running mean over cases."""
    if not results:
        raise ValueError("results: expected at least one per-case result")
    plt = _pyplot()
    keys = [k for k in results[0] if k.endswith("_score") or k.endswith("_score_prefixed") or k == "locality_top1"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key in keys:
        vals = _finite([r.get(key) for r in results])
        running, total, n = [], 0.0, 0
        for v in vals:
            if not math.isnan(v):
                total, n = total + v, n + 1
            running.append(total / n if n else math.nan)
        ax.plot(range(1, len(running) + 1), running, label=key)
    ax.set_xlabel("cases")
    ax.set_ylabel("running mean")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "per-case evaluation")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
