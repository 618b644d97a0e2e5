"""The per-text perplexity figures of benches/ppl_texts.py against a direct computation: a rise
carried by one text shows as a large mean change with a median ratio near 1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "ppl_texts", Path(__file__).resolve().parents[1] / "benches" / "ppl_texts.py")
ppl_texts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ppl_texts)


def test_one_exploding_text_is_told_apart_from_a_rise_of_every_text():
    base = [10.0, 20.0, 30.0, 40.0, 50.0]
    one = [10.0, 20.0, 300.0, 40.0, 50.0]  # text 2 ten times worse, the others unchanged
    got = ppl_texts.summarise(base, one)
    assert got["mean_change"] == pytest.approx((420 - 150) / 150)
    assert got["median_ratio"] == 1.0 and got["max_ratio"] == pytest.approx(10.0) and got["worst_text"] == 2
    assert got["top3_share"] == pytest.approx(1.0) and got["n"] == 5
    every = [b * 2.8 for b in base]  # the same mean change, spread over every text
    spread = ppl_texts.summarise(base, every)
    assert spread["mean_change"] == pytest.approx(got["mean_change"])
    assert spread["median_ratio"] == pytest.approx(2.8) and spread["p90_ratio"] == pytest.approx(2.8)
    assert spread["top3_share"] == pytest.approx((50 + 40 + 30) / 150)


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError, match="base, now: expected two equal, non-empty lists, got 2 and 1"):
        ppl_texts.summarise([1.0, 2.0], [1.0])
