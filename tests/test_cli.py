"""The fastrome command on a tiny model saved to disk (safetensors) and on bad input."""

from __future__ import annotations

import json

import pytest

from fastrome import SecondMoment
from fastrome.cli import main


@pytest.fixture
def model_dir(saved_tiny_llama):
    return saved_tiny_llama


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, out


def test_info_json(capsys):
    code, out = run(capsys, "info", "--json")
    data = json.loads(out)
    assert code == 0 and data["fastrome"] and data["torch"]
    ops = {(r["op"], r["device"]): r["backend"] for r in data["backends"]}
    assert ops[("rank_one_update", "cpu")] in ("cpp", "reference")
    assert set(op for op, _ in ops) == {"second_moment_accumulate", "solve_keys", "rank_one_update"}


def test_info_table(capsys):
    code, out = run(capsys, "info")
    assert code == 0 and "solve_keys" in out and "backend" in out


def test_edit_inline_json(capsys, model_dir):
    code, out = run(
        capsys, "edit", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in",
        "--subject", "The Eiffel Tower", "--target", "Rome", "--layer", "1", "--stats", "identity",
        "--probe", "The Louvre is in", "--json", "--device", "cpu",
    )
    data = json.loads(out)
    assert code == 0
    assert data["applied"] == 1 and data["layer"] == 1 and "identity" in data["stats"]
    assert set(data["completions"]) == {"The Eiffel Tower is located in", "The Louvre is in"}
    assert data["edits"][0]["status"] == "applied"


def test_edit_requests_file_and_output(capsys, model_dir, tmp_path):
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([
        {"case_id": 1, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "LeBron James",
                                             "target_new": {"str": "chess"}, "target_true": {"str": "basketball"}}},
        {"prompt": "Rome is the capital of", "subject": "Rome", "target_new": "Spain"},
    ]))
    out_dir = tmp_path / "edited"
    code, out = run(capsys, "edit", "--model", str(model_dir), "--requests", str(reqs), "--layer", "2",
                    "--stats", "identity", "--output", str(out_dir), "--device", "cpu")
    assert code == 0
    assert "LeBron James" in out and "seconds by phase" in out and "before → after" in out
    assert any(out_dir.glob("*.safetensors"))


def test_stats_command_writes_loadable_files(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "stats"
    out_dir.mkdir()
    code, out = run(capsys, "stats", "--model", str(model_dir), "--layers", "0,2", "--tokens", "1500",
                    "--max-len", "64", "--out", str(out_dir), "--json", "--device", "cpu")
    data = json.loads(out)
    assert code == 0 and [r["layer"] for r in data["layers"]] == [0, 2]
    sm = SecondMoment.load(out_dir / "stats_L2.safetensors")
    assert sm.layer == 2 and sm.count == 1500


@pytest.mark.parametrize(
    "argv, message",
    [
        (["edit", "--prompt", "{} is in", "--subject", "Paris"], "go together"),
        (["edit", "--prompt", "The tower is tall", "--subject", "Eiffel", "--target", "x"], "requests[0].subject"),
        (["edit", "--requests", "/no/such.json"], "--requests"),
        (["edit"], "no requests"),
    ],
)
def test_edit_bad_input_exits_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert message in str(err.value)


def test_unknown_model_path(capsys):
    with pytest.raises(ValueError, match="model:"):
        main(["stats", "--model", "/no/such/model", "--device", "cpu"])
