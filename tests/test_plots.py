"""Plots of sequential runs: panel layout for a few runs and for a comparison of many, cutting runs
at a number of edits, and the running median of the per-edit figure."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from fastrome.evaluation.plots import (
    CHECKPOINT_PANELS,
    COMPARISON_RUNS,
    checkpoint_panels,
    plot_runs,
    read_run,
    running_median,
    trim_run,
)


def _run(folder: Path, checkpoints: list, edits: int, drift: bool = True) -> Path:
    folder.mkdir()
    rows = []
    for n in [0, *checkpoints]:
        point = {"edits": n, "ppl": 100.0 + n, "wikitext_ppl": 50.0 + n, "retention": 1 - n / 1000,
                 "specificity": 0.9}
        if drift:
            point["weight_drift"] = n / 100
        rows.append(json.dumps(point))
    (folder / "checkpoints.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "edits.jsonl").write_text("".join(json.dumps(
        {"status": "applied", "steps": 10 + i % 7, "update_ratio": 0.01 * (1 + i % 3)}) + "\n" for i in range(edits)))
    return folder


def test_a_few_runs_share_grouped_panels_and_a_comparison_gets_one_metric_per_panel(tmp_path):
    one = {"a": read_run(_run(tmp_path / "a", [50, 100], 100))}
    grouped = checkpoint_panels(one)
    assert [name for name, _ in grouped] == ["retention", "specificity", "perplexity / unedited", "weight drift"]
    assert dict(grouped)["retention"] == (("retention", "top-1"),)  # only the metrics the runs hold
    many = {name: read_run(_run(tmp_path / name, [50], 60, drift=name != "c")) for name in "bcd"[:COMPARISON_RUNS]}
    flat = checkpoint_panels(many)
    assert [name for name, _ in flat] == ["top-1", "locality prompts keeping their answer",
                                          "ME-PPL_50 / unedited", "WikiText-2 / unedited",
                                          "largest ‖W − W₀‖ / ‖W₀‖ over the edited layers"]
    assert all(len(keys) == 1 for _, keys in flat)
    assert {k for _, keys in flat for k, _ in keys} <= {k for _, keys in CHECKPOINT_PANELS for k, _ in keys}


def test_a_run_is_cut_at_the_number_of_edits_asked(tmp_path):
    points, entries = read_run(_run(tmp_path / "a", [50, 100, 150], 160))
    cut_points, cut_entries = trim_run(points, entries, 100)
    assert [p["edits"] for p in cut_points] == [0, 50, 100] and len(cut_entries) == 100
    assert trim_run(points, entries, None) == (points, entries)


def test_the_running_median_matches_the_median_of_each_window():
    rng = random.Random(7)
    values = [rng.gauss(0, 1) for _ in range(61)]
    values[5] = values[30] = math.nan
    for window in (1, 4, 25):
        got = running_median(values, window)
        for i, g in enumerate(got):
            part = [v for v in values[max(0, i - window + 1): i + 1] if v == v]
            assert (math.isnan(g) and not part) or g == statistics.median(part)
    assert math.isnan(running_median([math.nan], 3)[0])


def test_a_comparison_of_many_runs_is_drawn_to_the_edits_asked(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {f"run {i}": _run(tmp_path / f"r{i}", [50, 100, 150], 150 - 40 * i) for i in range(COMPARISON_RUNS + 1)}
    files = plot_runs(runs, tmp_path / "out", title="comparison", max_edits=100)
    assert sorted(f.name for f in files) == ["checkpoints.png", "per_edit.png"]
    assert all(f.stat().st_size > 10_000 for f in files)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"max_edits: expected a positive number of edits or None, got {bad!r}"):
            plot_runs(runs, tmp_path / "bad", max_edits=bad)


def test_the_plot_command_refuses_a_bad_edit_limit_before_drawing(tmp_path):
    from fastrome.cli import main

    run = _run(tmp_path / "a", [50], 50)
    with pytest.raises(SystemExit, match="--max-edits: expected a positive number of edits, got 0"):
        main(["plot", str(run), "--max-edits", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
