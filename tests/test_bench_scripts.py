"""The benchmark launchers parse and name their runs (they start hours of work, so a typo must
fail at once, not after the model has loaded)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def lifelong(*args):
    return subprocess.run(["bash", str(ROOT / "benches" / "lifelong_runs.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_lifelong_runs_are_listed_with_their_settings():
    out = lifelong("--list")
    assert out.returncode == 0, out.stderr
    runs = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert runs["default"] == "(the library defaults)" and runs["classic"] == "--classic"
    assert all(value.startswith("--classic") for name, value in runs.items() if name != "default")


def test_an_unknown_run_is_refused_before_any_work():
    out = lifelong("no-such-run", "10")
    assert out.returncode == 2 and "unknown run 'no-such-run'" in out.stderr


def _named_configs() -> dict:
    """{run name: its EditConfig resolved for Llama}, as ``lifelong_runs.sh NAME`` would make it."""
    import sys

    sys.path.insert(0, str(ROOT / "benches"))
    try:
        from collapse_study import parse_overrides
    finally:
        sys.path.pop(0)
    from fastrome.config import CLASSIC, make_config

    configs = {}
    for name, value in dict(line.split(": ", 1) for line in lifelong("--list").stdout.splitlines()).items():
        words = [] if name == "default" else value.split()
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        overrides = {**(CLASSIC if "--classic" in words else {}), **parse_overrides(sets)}
        if "--mode" in words:
            overrides["mode"] = words[words.index("--mode") + 1]
        configs[name] = make_config(**overrides).resolve("llama")  # raises, naming the field, on a bad value
    return configs


def test_every_named_run_has_valid_settings():
    assert "default" in _named_configs()


def test_every_named_run_resumes_the_journals_kept_under_its_name():
    """A run's line must keep meaning the settings its committed journals were made with, whatever
    the library's defaults have become since (a run that cannot resume loses its CPU hours)."""
    import json

    from fastrome.config import settings_that_differ

    configs = _named_configs()
    checked = 0
    for edits in sorted((ROOT / "benches" / "results" / "lifelong").glob("*/*/edits.jsonl")):
        name = edits.parent.name
        if name not in configs:
            continue
        recorded = next((json.loads(line).get("settings") for line in edits.read_text().splitlines()
                         if line.strip() and json.loads(line).get("settings")), None)
        if not recorded:
            continue
        differ = settings_that_differ(recorded, configs[name].lifelong_settings())
        assert not differ, f"{edits.parent.relative_to(ROOT)}: made with / named now {differ}"
        checked += 1
    assert checked >= 5  # the committed runs are there to check


def _fake_run(folder: Path, checkpoints: list, edits: int) -> Path:
    import json

    folder.mkdir()
    point = {"ppl": 100.0, "wikitext_ppl": 50.0, "retention_score": 1.0, "retention": 1.0, "specificity": 0.9,
             "weight_drift": 0.1}
    (folder / "checkpoints.jsonl").write_text("".join(
        json.dumps({**point, "edits": n, "ppl": 100.0 + n}) + "\n" for n in [0, *checkpoints]))
    (folder / "edits.jsonl").write_text("".join(json.dumps(
        {"status": "applied", "steps": 10 + i, "update_ratio": 0.01, "seconds": {"values": 1.0}}) + "\n"
        for i in range(edits)))
    return folder


def test_the_comparison_table_reports_each_run_where_it_stands(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "benches"))
    try:
        from collapse_report import compare, main
    finally:
        sys.path.pop(0)
    long = _fake_run(tmp_path / "long", [50, 100, 150], 160)
    short = _fake_run(tmp_path / "short", [50], 60)
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in compare([long, short], at=120).splitlines()
            if r.startswith("| long") or r.startswith("| short")}
    # each at its own last checkpoint up to 120 edits: ME-PPL_50 is 100 + edits here
    assert rows["long"][1:3] == ["100", "+100%"] and rows["short"][1:3] == ["50", "+50%"]
    assert rows["long"][10] == "59.5"  # mean steps over the first 100 edits only
    common = {r.split(" | ")[0].strip("| "): r.split(" | ")[1] for r in compare([long, short]).splitlines()
              if r.startswith("| long")}
    assert common["long"] == "50"
    named = compare([long, short], at=120, labels=["classic", "memory"]).splitlines()
    assert [r.split(" | ")[0] for r in named[-2:]] == ["| classic", "| memory"]
    with pytest.raises(SystemExit, match="--labels: 1 labels for 2 runs"):
        main(["--compare", "--labels", "a", str(long), str(short)])
    with pytest.raises(SystemExit, match="--at: expected a positive number of edits, got 'x'"):
        main(["--compare", "--at", "x", str(long)])
