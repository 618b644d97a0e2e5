"""Value-norm control (‖v*‖ against the unedited layer's own value at the key) and the norm
constraint (α·I in the solve): what each does to one edit, and refusals that write nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastrome import CLASSIC, EditConfig, Editor
from fastrome.adapter import ModelAdapter

REQ = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1}
FAST = dict(CLASSIC, v_steps=4, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, layer=1)


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return (a @ a.T / a.shape[1] + 0.1 * torch.eye(d, dtype=torch.float64)).float()


def editor(model, **kw):
    tok = kw.pop("tok")
    adapter = ModelAdapter(model)
    stats = {layer: spd(adapter.d_in, layer) for layer in range(adapter.n_layers)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Editor(model, tok, stats=stats, **{**FAST, **kw})


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_anchor_sets_the_written_value_to_the_reference_norm(make_tiny, factor):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    base = ModelAdapter(model).weight(1).detach().clone()
    ed = editor(model, tok=tok, value_norm="anchor", value_norm_factor=factor)
    (rec,) = ed.edit(REQ).records
    ref = float((base.float() @ ed.last.k_mean.float()).norm())
    assert rec.applied and rec.value_norm_ref == pytest.approx(ref, rel=1e-5)
    assert rec.v_star_norm == pytest.approx(factor * ref, rel=1e-5) and rec.value_scale != 1.0
    # the write is exact at the key for the anchored value
    w = ModelAdapter(model).weight(1).detach().double()
    got = w @ ed.last.k_mean.double()
    assert float((got - ed.last.v_star.double()).norm() / ed.last.v_star.double().norm()) < 1e-5
    assert float(ed.last.v_star.norm()) == pytest.approx(factor * ref, rel=1e-5)


def test_cap_rescales_only_values_above_the_limit(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    (loose,) = editor(model, tok=tok, value_norm="cap", value_norm_factor=1e6).edit(REQ).records
    assert loose.value_scale == 1.0 and loose.v_star_norm < 1e6 * loose.value_norm_ref
    model, _ = make_tiny("llama-bytelevel", layers=3)
    (tight,) = editor(model, tok=tok, value_norm="cap", value_norm_factor=0.1).edit(REQ).records
    assert tight.value_scale < 1.0 and tight.v_star_norm == pytest.approx(0.1 * tight.value_norm_ref, rel=1e-5)


def test_refuse_writes_nothing_and_says_why(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    before = ModelAdapter(model).weight(1).detach().clone()
    ed = editor(model, tok=tok, value_norm="refuse", value_norm_factor=0.1, policy="skip")
    (rec,) = ed.edit(REQ).records
    assert rec.status == "refused" and any("‖v*‖" in r for r in rec.reasons)
    assert torch.equal(ModelAdapter(model).weight(1), before) and len(ed.journal) == 0


def test_value_norm_settings_are_checked():
    for field, value in (("value_norm", "sometimes"), ("value_norm_factor", 0.0), ("value_norm_factor", float("inf")),
                         ("norm_alpha", -1.0), ("norm_alpha", float("nan"))):
        with pytest.raises(ValueError, match=f"config.{field}"):
            EditConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match="config.value_norm.*spread"):
        EditConfig(value_norm="anchor", spread=2).validate()


def test_the_norm_constraint_shrinks_the_update(make_tiny):
    recs, ridges = {}, {}
    for alpha in (0.0, 1.0):
        model, tok = make_tiny("llama-bytelevel", layers=3)
        ed = editor(model, tok=tok, norm_alpha=alpha)
        (recs[alpha],) = ed.edit(REQ).records
        ridges[alpha] = ed.solver(1).ridge
    assert ridges[1.0] > ridges[0.0]
    assert recs[1.0].update_norm < recs[0.0].update_norm
    assert all(r.applied for r in recs.values())
