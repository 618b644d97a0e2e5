"""Scores and perplexities read from the head at scored positions, a bounded block at a time, agree
with the whole-model logits of the same batch."""

from __future__ import annotations

import math

import pytest
import torch

import fastrome.metrics as metrics
from fastrome.tokens import encode, pad_id, right_pad

TEXTS = ["The Eiffel Tower is located in Paris.", "Hi", "A", "Rome is the capital of Italy and of its Lazio region."]


@torch.no_grad()
def whole_model_perplexities(model, tok, texts):
    seqs = [encode(tok, t) for t in texts]
    ids, mask = right_pad(seqs, pad_id(tok), torch.device("cpu"))
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double()[:, :-1], -1)
    nll = -logp.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2) * mask[:, 1:]
    return [math.exp(float(n.sum() / max(1, len(s) - 1))) for n, s in zip(nll, seqs)]


@pytest.mark.parametrize("budget", [1, 7 * 97, 1 << 24])  # one position at a time, a few, all
def test_blocked_perplexities_match_the_whole_model(tiny, budget, monkeypatch):
    model, tok, _ = tiny
    monkeypatch.setattr(metrics, "LOGITS_BUDGET", budget)
    got = metrics.perplexities(model, tok, TEXTS, batch_size=3)
    want = whole_model_perplexities(model, tok, TEXTS)
    assert got == pytest.approx(want, rel=1e-5)


def test_a_failing_head_path_falls_back_to_the_whole_model(tiny, monkeypatch, caplog):
    model, tok, _ = tiny
    want = metrics.score_targets(model, tok, ["The Eiffel Tower is in"], ["Paris"])[0]
    monkeypatch.setattr(metrics, "_warned_head", False)
    monkeypatch.setattr(metrics, "head_split", lambda m: (lambda **kw: 1 / 0, None))
    with caplog.at_level("WARNING", logger="fastrome.metrics"):
        got = metrics.score_targets(model, tok, ["The Eiffel Tower is in"], ["Paris"])[0]
        metrics.score_targets(model, tok, ["The Eiffel Tower is in"], ["Paris"])
    assert got.top == want.top and got.logprobs == pytest.approx(want.logprobs, rel=1e-5)
    assert sum("whole-model logits" in r.getMessage() for r in caplog.records) == 1
