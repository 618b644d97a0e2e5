"""fastrome.compute_stats: statistics from a model and a corpus without the internal adapter, equal
to the engine's own pass, cached or not."""

from __future__ import annotations

import pytest
import torch

import fastrome
from fastrome.adapter import ModelAdapter
from fastrome.stats import compute


def test_compute_stats_matches_the_engine_and_caches(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(f"Paragraph {i} about the city of Paris and its museums." for i in range(40)))
    got = fastrome.compute_stats(model, tok, [1, 2], corpus=texts, tokens=600, max_len=64, cache=tmp_path / "c",
                                 progress=False)
    want = compute(ModelAdapter(model), tok, [1, 2], corpus=texts, tokens=600, max_len=64, progress=False)
    assert sorted(got) == [1, 2]
    for layer in (1, 2):
        assert got[layer].count == want[layer].count > 0
        torch.testing.assert_close(got[layer].sum, want[layer].sum, rtol=1e-12, atol=0)
    assert list((tmp_path / "c" / "stats").glob("*_L1_*.safetensors"))  # cached for the next call
    one = fastrome.compute_stats(model, tok, 1, corpus=texts, tokens=600, max_len=64, cache=False, progress=False)
    assert torch.equal(one[1].sum, want[1].sum)


def test_a_layer_out_of_range_is_refused(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    with pytest.raises(ValueError, match="layers"):
        fastrome.compute_stats(model, tok, [7], cache=False)
