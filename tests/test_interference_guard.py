"""max_interference_spike: an edit whose interference ‖Λ‖²·uᵀCu (its mean squared change of the
layer's output over ordinary text) is far above the layer's earlier edits' is refused before it is
written; the median it is judged against follows the journal through undo and resume."""

from __future__ import annotations

import statistics

import pytest
import torch
from kernel_checks import same_bits
from test_spread import editor, weights

from fastrome.config import EditConfig

NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "John von Neumann", "Emmy Noether",
         "Kurt Godel", "Marie Curie", "Niels Bohr", "Paul Dirac", "Lise Meitner", "Enrico Fermi", "Max Planck",
         "Ernest Rutherford", "Rosalind Franklin", "Richard Feynman"]
CITIES = ["Rome", "Oslo", "Lima", "Cairo", "Quito", "Dakar", "Hanoi", "Minsk"]
REQS = [{"prompt": "{} was born in the city of", "subject": name, "target_new": CITIES[i % len(CITIES)],
         "case_id": i} for i, name in enumerate(NAMES)]


def test_an_edit_far_above_the_layers_typical_interference_is_refused_unwritten(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, layer=2, spread=1, memory_beta=2.0, max_interference_spike=1.3, policy="skip")
    kept, refused = [], 0
    for req in REQS:
        before = weights(model)
        (rec,) = ed.edit(req).records
        if len(kept) >= 10 and rec.interference > 1.3 * statistics.median(kept):
            assert rec.status == "refused", (rec.interference, statistics.median(kept))
            assert any("exceeds max_interference_spike = 1.3 × the median" in r for r in rec.reasons)
            assert all(same_bits(a, b) for a, b in zip(weights(model), before))
            refused += 1
        else:
            assert rec.status == "applied", rec.reasons
            kept.append(rec.interference)
    assert refused >= 1 and len(kept) >= 10  # the bar is tight enough that some edits meet it
    assert ed._past.typical_interference(2) == pytest.approx(statistics.median(kept), rel=1e-12)


def test_the_median_follows_undo_and_resume(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    kw = dict(layer=2, spread=2, memory_beta=2.0, max_interference_spike=1e6, journal=tmp_path / "j")
    ed = editor(model, tok, **kw)
    ed.edit(REQS[:11])
    parts = {layer: [e.record["parts"][e.record["part"]]["interference"] for e in ed.journal if e.layer == layer]
             for layer in (1, 2)}
    for layer in (1, 2):
        assert ed._past.typical_interference(layer) == pytest.approx(statistics.median(parts[layer]), rel=1e-12)
    ed.undo_last(1)
    assert ed._past.typical_interference(2) == pytest.approx(statistics.median(parts[2][:10]), rel=1e-12)
    ed.undo_last(1)
    assert ed._past.typical_interference(2) is None  # fewer than ten earlier edits: the guard waits
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(fresh, tok, **kw)
    assert resumed._past.interferences[2] == sorted(parts[2][:9])
    resumed.close()
    other, _ = make_tiny("llama-bytelevel", layers=3)
    with pytest.raises(ValueError, match="max_interference_spike=1000000.0"):  # resumed without the guard
        editor(other, tok, **{**kw, "max_interference_spike": 0.0})


@pytest.mark.parametrize("value", [1.0, -2.0, float("inf"), float("nan")])
def test_max_interference_spike_is_checked(value):
    with pytest.raises(ValueError, match=r"config.max_interference_spike: expected 0 \(off\) or a finite number > 1"):
        EditConfig(max_interference_spike=value).validate()
    EditConfig(max_interference_spike=0.0).validate()


def test_the_guard_is_off_by_default_and_force_overrides_it(make_tiny):
    assert EditConfig().max_interference_spike == 0.0
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, layer=2, spread=1, memory_beta=2.0, max_interference_spike=1.0001, policy="force")
    recs = ed.edit(REQS).records
    assert all(r.status in ("applied", "forced") for r in recs)
    assert any(r.status == "forced" for r in recs) and torch.is_tensor(ed.journal.entries[-1].u)
