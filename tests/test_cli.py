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


def test_edit_spread_over_layers(capsys, model_dir):
    code, out = run(
        capsys, "edit", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in",
        "--subject", "The Eiffel Tower", "--target", "Rome", "--layer", "2", "--spread", "2", "--stats", "identity",
        "--json", "--device", "cpu",
    )
    data = json.loads(out)
    assert code == 0 and data["edits"][0]["status"] == "applied"
    assert [p["layer"] for p in data["edits"][0]["parts"]] == [1, 2]
    with pytest.raises(ValueError, match="config.spread: 2 layers ending at layer 0"):
        run(capsys, "edit", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in",
            "--subject", "The Eiffel Tower", "--target", "Rome", "--layer", "0", "--spread", "2",
            "--stats", "identity", "--json", "--device", "cpu")


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


def _cf_file(tmp_path):
    def rec(i, subject, prompt, new, true):
        return {"case_id": i, "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new},
                "target_true": {"str": true}}, "rephrase_prompt": prompt.replace("{}", subject) + " indeed",
                "locality_prompt": "The Louvre is located in", "locality_ground_truth": "Paris"}

    path = tmp_path / "cf.json"
    path.write_text(json.dumps([
        rec(1, "The Eiffel Tower", "{} is located in", "Rome", "Paris"),
        rec(2, "LeBron James", "{} plays the sport of", "chess", "basketball"),
        rec(3, "Rome", "{} is the capital of", "Italy", "Italy"),  # bad: new == true
        {"case_id": 4, "requested_rewrite": {"prompt": "{} plays"}},  # bad: fields missing
    ]))
    return path


def test_eval_edits_each_case(capsys, model_dir, tmp_path):
    data, rows = _cf_file(tmp_path), tmp_path / "cases.jsonl"
    code, out = run(capsys, "eval", str(data), "--model", str(model_dir), "--layer", "1", "--stats", "identity",
                    "--out", str(rows), "--prefixes", "2", "--plot", str(tmp_path / "eval.png"), "--json",
                    "--device", "cpu")
    summary = json.loads(out)
    assert code == 0 and summary["n_cases"] == 2 and summary["format"] == "counterfact"
    assert summary["edited"] and len(summary["prefixes"]) == 2
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_score_prefixed"):
        assert 0 <= summary[key] <= 1, key
    cases = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [c["case_id"] for c in cases] == [1, 2] and all(c["edit_status"] == "applied" for c in cases)
    assert (tmp_path / "eval.png").stat().st_size > 1000
    code, out = run(capsys, "eval", str(data), "--model", str(model_dir), "--no-edit", "--json", "--device", "cpu",
                    "--limit", "1")
    unedited = json.loads(out)
    assert code == 0 and unedited["n_cases"] == 1 and not unedited["edited"]


def test_eval_sequential_and_plot(capsys, model_dir, tmp_path):
    data, run_dir, ppl = _cf_file(tmp_path), tmp_path / "run", tmp_path / "ppl.txt"
    ppl.write_text("The cat sat on the mat.\nParis is the capital of France.\n")
    code, out = run(capsys, "eval", str(data), "--model", str(model_dir), "--layer", "1", "--stats", "identity",
                    "--sequential", str(run_dir), "--every", "1", "--ppl-texts", str(ppl), "--wikitext", str(ppl),
                    "--on-collapse", "record", "--plot", "--json", "--device", "cpu")
    result = json.loads(out)
    assert code == 0 and result["applied"] == 2
    assert result["last_checkpoint"]["edits"] == 2 and result["last_checkpoint"]["wikitext_ppl"] > 1
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == ["checkpoints.png", "per_edit.png"]
    code, out = run(capsys, "plot", str(run_dir), str(run_dir), "--labels", "a,b", "--out", str(tmp_path / "cmp"))
    assert code == 0 and "checkpoints.png" in out
    with pytest.raises(SystemExit, match="--labels"):
        main(["plot", str(run_dir), "--labels", "a,b", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="neither checkpoints.jsonl"):
        main(["plot", str(tmp_path), "--out", str(tmp_path / "x")])


def test_eval_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        main(["eval", str(tmp_path / "missing.json")])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(SystemExit, match="no usable cases"):
        main(["eval", str(empty)])
    with pytest.raises(SystemExit, match="--limit"):
        main(["eval", str(empty), "--limit", "0"])


def test_eval_detects_zsre(capsys, model_dir):
    from conftest import data_file

    path = data_file("zsre", "zsre_mend_train-1k.json")
    code, out = run(capsys, "eval", str(path), "--model", str(model_dir), "--no-edit", "--limit", "3", "--json",
                    "--device", "cpu")
    summary = json.loads(out)
    assert code == 0 and summary["format"] == "zsre" and summary["n_cases"] == 3
    for key in ("efficacy", "paraphrase", "specificity"):
        assert 0 <= summary[key] <= 1, key
