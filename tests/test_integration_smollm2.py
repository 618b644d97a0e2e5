"""The real model: three CounterFact dev records edited in sequence in SmolLM2-135M-Instruct (CPU).

Asserts that each new target becomes the model's top continuation of its prompt (teacher-forced
argmax at every target token), that locality prompts keep their answers, and that the mean
perplexity on ME-PPL_50 moves by less than 5%. Rephrase success is reported. The numbers are
printed, and written as JSON to $FASTROME_RESULTS when set.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import data_file
from fastrome import Editor
from fastrome.metrics import mean_perplexity, score_targets
from fastrome.models import greedy_complete

pytestmark = pytest.mark.integration

N_RECORDS = 3


def first_token(model, tok, prompt: str) -> str:
    return greedy_complete(model, tok, prompt, max_new_tokens=1).strip()


def test_three_counterfact_edits(smollm2):
    model, tok = smollm2
    records = json.loads(data_file("counterfact", "counterfact_dev.json").read_text())[:N_RECORDS]
    ppl_texts = [r["Text"] for r in json.loads(data_file("me_ppl", "ME-PPL_50.json").read_text())]

    ppl_before = mean_perplexity(model, tok, ppl_texts)
    locality_before = [first_token(model, tok, r["locality_prompt"]) for r in records]
    prompts = [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in records]
    new_targets = [r["requested_rewrite"]["target_new"]["str"] for r in records]
    efficacy_before = [s.is_top for s in score_targets(model, tok, prompts, new_targets)]

    editor = Editor(model, tok)  # default layer, consistent keys, bundled-corpus statistics
    report = editor.edit(records)
    print("\n" + report.table())
    assert report.applied == N_RECORDS, report.table()

    efficacy = score_targets(model, tok, prompts, new_targets)
    rephrase = score_targets(model, tok, [r["rephrase_prompt"] for r in records], new_targets)
    locality_after = [first_token(model, tok, r["locality_prompt"]) for r in records]
    ppl_after = mean_perplexity(model, tok, ppl_texts)
    results = {
        "case_ids": [r["case_id"] for r in records],
        "layer": editor.layer,
        "mode": editor.config.mode,
        "stats": editor.stats_source(),
        "efficacy_before": efficacy_before,
        "efficacy": [s.is_top for s in efficacy],
        "efficacy_target_prob": [round(2.718281828 ** -s.mean_nll, 4) for s in efficacy],
        "rephrase_success": [s.is_top for s in rephrase],
        "rephrase_target_prob": [round(2.718281828 ** -s.mean_nll, 4) for s in rephrase],
        "locality_before": locality_before,
        "locality_after": locality_after,
        "me_ppl50_before": ppl_before,
        "me_ppl50_after": ppl_after,
        "me_ppl50_change": ppl_after / ppl_before - 1,
        "seconds_by_phase": {p: sum(r.seconds[p] for r in report) for p in report[0].seconds},
        "edits": [r.to_dict() for r in report],
    }
    print(json.dumps({k: v for k, v in results.items() if k != "edits"}, indent=2))
    if os.environ.get("FASTROME_RESULTS"):
        with open(os.environ["FASTROME_RESULTS"], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)

    assert not any(efficacy_before), "the new targets should not already be the model's answers"
    assert all(s.is_top for s in efficacy), results["efficacy_target_prob"]
    assert locality_after == locality_before
    assert abs(results["me_ppl50_change"]) < 0.05, results["me_ppl50_change"]
