"""kill -9 at three moments of a real run (the embedded SmolLM2 model, three CounterFact edits),
then a resume: the weights end bit for bit where an uninterrupted run ends, each record applied
once and logged once. The moments: during the second edit's value optimisation (nothing of it
written), after its factor file reached the disk but before its journal line, and after its
journal line but before its run-log line. The same with the edit memory on and every edit spread
over two layers, whose inverse is rebuilt from the journal's keys on resume: any difference in it
would change the later edits' weights; and with the memory's keys re-read from the model after every
edit, which the resumed run re-reads from the replayed weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import data_file

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("kill_resume_child.py")


@pytest.fixture(scope="module")
def saved_model(smollm2, tmp_path_factory):
    """The embedded model saved as a plain folder, so each child process loads it in a second
    instead of dequantising the GGUF file again."""
    from safetensors.torch import save_model

    model, tok = smollm2
    path = tmp_path_factory.mktemp("smollm2")
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are saved dequantised
    (path / "config.json").write_text(json.dumps(config))
    save_model(model, str(path / "model.safetensors"))  # handles the tied embedding
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-inputs")
    records = json.loads(data_file("counterfact", "counterfact_dev.json").read_text())[:3]
    (root / "records.json").write_text(json.dumps(records))
    texts = [r["Text"] for r in json.loads(data_file("me_ppl", "ME-PPL_50.json").read_text())]
    (root / "corpus.txt").write_text("\n\n".join(texts), encoding="utf-8")
    return root


LIFELONG = {"mode": "dual", "memory_beta": 0.5, "spread": 2, "mpes_checks": 1}  # the default's kind, smaller
# and with the memory's keys re-read after every edit: the resumed run re-reads them from the replayed weights
REFRESHED = {**LIFELONG, "memory_refresh_every": 1}


def child(saved_model, inputs, out, result, kill_at, cache, settings=None):
    env = {**os.environ, "FASTROME_CACHE": str(cache), "PYTHONPATH": str(CHILD.parent)}
    return subprocess.run(
        [sys.executable, str(CHILD), str(saved_model), str(out), str(inputs / "records.json"),
         str(inputs / "corpus.txt"), str(result), kill_at] + ([json.dumps(settings)] if settings else []),
        env=env, capture_output=True, text=True, timeout=900,
    )


_whole = {}


def uninterrupted(saved_model, inputs, tmp_path_factory, settings):
    """The weights and summary of the run never stopped, once per settings."""
    name = json.dumps(settings, sort_keys=True) if settings else "plain"
    if name not in _whole:
        root = tmp_path_factory.mktemp("whole")
        done = child(saved_model, inputs, root / "run", root / "w.safetensors", "none",
                     root.parent / "kill-cache", settings)
        assert done.returncode == 0, done.stderr[-3000:]
        _whole[name] = load_file(root / "w.safetensors"), json.loads(done.stdout.strip().splitlines()[-1])
    return _whole[name]


@pytest.mark.parametrize("kill_at,settings", [("values", None), ("factor", None), ("log", None),
                                              ("factor", LIFELONG), ("log", LIFELONG), ("log", REFRESHED)],
                         ids=["values", "factor", "log", "factor-memory-spread", "log-memory-spread",
                              "log-memory-spread-refresh"])
def test_killed_run_resumes_to_the_uninterrupted_weights(saved_model, inputs, tmp_path_factory, tmp_path,
                                                         kill_at, settings):
    whole, summary = uninterrupted(saved_model, inputs, tmp_path_factory, settings)
    assert summary["applied"] == 3
    cache = tmp_path.parent / "kill-cache"
    killed = child(saved_model, inputs, tmp_path / "run", tmp_path / "w.safetensors", kill_at, cache, settings)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "w.safetensors").exists()
    resumed = child(saved_model, inputs, tmp_path / "run", tmp_path / "w.safetensors", "none", cache, settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["done"] == summary["done"]
    got = load_file(tmp_path / "w.safetensors")
    assert got.keys() == whole.keys()
    differ = {name: float((got[name] - whole[name]).abs().max())
              for name in whole if not torch.equal(got[name], whole[name])}
    assert not differ, f"resumed weights differ from the uninterrupted run's (largest |difference|): {differ}"
    log = [json.loads(x) for x in (tmp_path / "run" / "edits.jsonl").read_text().splitlines()]
    assert [str(e["case_id"]) for e in log] == summary["done"] and all(e["status"] == "applied" for e in log)
    journal = [json.loads(x) for x in (tmp_path / "run" / "journal" / "edits.jsonl").read_text().splitlines()]
    parts = (settings or {}).get("spread", 1)
    ids = [e["edit_id"] for e in journal]
    if parts == 1:
        assert ids == [0, 1, 2]
    else:  # a spread edit cut between its layers is dropped on resume, and its ids are not handed out again
        assert len(ids) == 3 * parts and ids == sorted(set(ids))
        for first in range(0, len(ids), parts):  # the parts of one edit have consecutive ids
            assert ids[first:first + parts] == list(range(ids[first], ids[first] + parts))
    if settings:
        assert all(e["record"]["settings"]["memory_beta"] == settings["memory_beta"] for e in journal)
