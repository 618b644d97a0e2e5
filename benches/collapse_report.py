"""Markdown summary of collapse-study runs: checkpoints, and per-edit figures split by prompt shape.

    python benches/collapse_report.py benches/results/collapse/consistent_gentle \
        benches/results/collapse/original_gentle > benches/results/collapse/summary.md
    python benches/collapse_report.py --compare RUN_DIR...   # one row per run, at a common checkpoint
    python benches/collapse_report.py --compare --at 500 RUN_DIR...   # each at its last checkpoint <= 500
    python benches/collapse_report.py --compare --labels a,b RUN_A RUN_B   # rows named a and b

For every run folder (``collapse_study.py --out``): its settings and wall time, a table of the
checkpoints (perplexities relative to the unedited model, retention with and without a test-time
prefix, specificity, generation entropy), and the per-edit denominator cosine uᵀk/(‖u‖‖k‖),
‖ΔW‖/‖W‖ and interference ‖Λ‖²·uᵀCu for subject-first prompts (the subject is the prompt's first
token, where unprefixed keys are unlike the prefixed ones) against the others.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Optional


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []


def _pct(value: float, base: float) -> str:
    return f"{value:.1f} ({100 * (value / base - 1):+.0f}%)"


def _spread(values: list, digits: int = 3) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def report(run_dir: Path) -> str:
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    points = _jsonl(run_dir / "checkpoints.jsonl")
    edits = _jsonl(run_dir / "edits.jsonl")
    applied = [e for e in edits if e.get("status") in ("applied", "forced")]
    lines = [f"## {run_dir.name}", ""]
    secs = [sum(e["seconds"].values()) for e in applied if "seconds" in e]
    if not run:
        return "\n".join(lines + ["no run.json yet: the run has not reached its first checkpoint."])
    lines.append(
        f"mode `{run.get('mode')}`, settings {run.get('overrides') or 'defaults'}, statistics: {run.get('stats')}; "
        f"{len(applied)} edits applied, {len(edits) - len(applied)} not; "
        f"wall time {run.get('wall_seconds', 0) / 3600:.2f} h over {len(run.get('sessions', []))} session(s), "
        f"median {statistics.median(secs) if secs else float('nan'):.1f} s per edit."
    )
    base = next((p for p in points if p.get("edits") == 0), None)
    if base and len(points) > 1:
        lines += ["", "| edits | ME-PPL_50 | WikiText-2 | retention score / top-1 | prefixed score / top-1 "
                  "| specificity | entropy / unedited |", "|---|---|---|---|---|---|---|"]
        for p in points:
            if p.get("edits") == 0:
                continue
            g = {k: p.get(k, float("nan")) for k in ("retention_score", "retention", "retention_score_prefixed",
                                                     "retention_prefixed", "specificity", "entropy_norm")}
            lines.append(
                f"| {p['edits']} | {_pct(p['ppl'], base['ppl'])} | {_pct(p['wikitext_ppl'], base['wikitext_ppl'])} "
                f"| {g['retention_score']:.2f} / {g['retention']:.2f} "
                f"| {g['retention_score_prefixed']:.2f} / {g['retention_prefixed']:.2f} "
                f"| {g['specificity']:.2f} | {g['entropy_norm']:.3f} |"
            )
        lines.append(f"\nUnedited: ME-PPL_50 {base['ppl']:.1f}, WikiText-2 {base['wikitext_ppl']:.2f}.")
    if applied:
        lines += ["", "| prompts | edits | uᵀk/(‖u‖‖k‖) min / median / max | ‖ΔW‖/‖W‖ min / median / max "
                  "| interference min / median / max | flagged |", "|---|---|---|---|---|---|"]
        for name, first in (("subject first", True), ("subject later", False)):
            group = [e for e in applied if e.get("prompt", "").startswith(e.get("subject", "\0")) == first]
            if not group:
                continue
            flagged = sum(bool(e.get("collapse")) for e in group)
            lines.append(
                f"| {name} | {len(group)} | {_spread([e['denominator_rel'] for e in group], 2)} "
                f"| {_spread([e['update_ratio'] for e in group])} "
                f"| {_spread([e.get('interference', float('nan')) for e in group], 2)} | {flagged} |"
            )
    return "\n".join(lines)


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def _f(value: float, fmt: str = ".2f") -> str:
    return "–" if value != value else format(value, fmt)


def compare(dirs: list, at: Optional[int] = None, labels: Optional[list] = None) -> str:
    """One row per run: perplexities, retention (own prompt, test-time prefix, paraphrase),
    specificity, efficacy at edit time, drift, steps, write size and seconds per edit (and of them
    the edit memory's update). Without ``at``, at the last checkpoint every run has reached; with it,
    each run at its own last checkpoint up to ``at`` edits (runs stopped early show fewer). Rows are
    named by ``labels`` (default: the folders' names)."""
    names = labels or [d.name for d in dirs]
    if len(names) != len(dirs):
        raise SystemExit(f"--labels: {len(names)} labels for {len(dirs)} runs")
    runs = [(d, _jsonl(d / "checkpoints.jsonl"), _jsonl(d / "edits.jsonl")) for d in dirs]
    reached = [max((p["edits"] for p in points), default=0) for _, points, _ in runs]
    common = min(reached) if reached else 0
    head = ("| setting | edits | ME-PPL_50 | WikiText-2 | retention score / top-1 | prefixed score / top-1 "
            "| paraphrase score / top-1 | specificity | at edit time score / top-1 | ‖W − W₀‖/‖W₀‖ | steps "
            "| median ‖ΔW‖/‖W‖ | s / edit | memory s / edit |")
    title = (f"Figures at {common} edits" if at is None
             else f"Figures at each run's last checkpoint up to {at} edits")
    lines = [f"{title} (– where a run predates the figure).", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, (_, points, edits) in zip(names, runs):
        base = next((p for p in points if p.get("edits") == 0), None)
        here = common if at is None else max((p["edits"] for p in points if 0 < p["edits"] <= at), default=0)
        point = next((p for p in points if p.get("edits") == here), None)
        applied = [e for e in edits if e.get("status") in ("applied", "forced")][:here]
        if base is None or point is None or not applied:
            lines.append(f"| {name} | " + " | ".join(["–"] * (head.count("|") - 2)) + " |")
            continue
        g = {k: point.get(k, float("nan")) for k in (
            "retention_score", "retention", "retention_score_prefixed", "retention_prefixed",
            "retention_score_paraphrase", "retention_paraphrase", "specificity", "weight_drift")}
        at_edit = [e for e in applied if "edit_score" in e]
        memory = [e["seconds"].get("memory", 0.0) for e in applied if "memory" in e.get("seconds", {})]
        lines.append(
            f"| {name} | {here} | {100 * (point['ppl'] / base['ppl'] - 1):+.0f}% "
            f"| {100 * (point['wikitext_ppl'] / base['wikitext_ppl'] - 1):+.0f}% "
            f"| {_f(g['retention_score'])} / {_f(g['retention'])} "
            f"| {_f(g['retention_score_prefixed'])} / {_f(g['retention_prefixed'])} "
            f"| {_f(g['retention_score_paraphrase'])} / {_f(g['retention_paraphrase'])} | {_f(g['specificity'])} "
            f"| {_f(_mean([e['edit_score'] for e in at_edit]))} / {_f(_mean([e['edit_top'] for e in at_edit]))} "
            f"| {_f(g['weight_drift'])} | {_mean([e['steps'] for e in applied]):.1f} "
            f"| {statistics.median(e['update_ratio'] for e in applied):.3f} "
            f"| {statistics.median(sum(e['seconds'].values()) for e in applied):.1f} "
            f"| {_f(statistics.median(memory) if memory else float('nan'), '.4f')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--compare"]:
        args = args[1:]
        at = None
        if args[:1] == ["--at"]:
            if len(args) < 2 or not args[1].isdigit() or int(args[1]) < 1:
                given = args[1] if len(args) > 1 else None
                raise SystemExit(f"--at: expected a positive number of edits, got {given!r}")
            at, args = int(args[1]), args[2:]
        labels = None
        if args[:1] == ["--labels"]:
            if len(args) < 2:
                raise SystemExit("--labels: expected comma-separated names, one per run")
            labels, args = args[1].split(","), args[2:]
        print(compare([Path(a) for a in args], at, labels))
        return 0
    dirs = [Path(a) for a in args]
    if not dirs:
        raise SystemExit("usage: collapse_report.py [--compare] RUN_DIR...")
    print("# Collapse study\n")
    print("\n\n".join(report(d) for d in dirs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
