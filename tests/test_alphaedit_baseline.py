"""The AlphaEdit reference: its rank-one factors against the published matrix formula in fp64, and
what the formula promises (null-space directions of ordinary text and earlier edits' keys left
nearly alone)."""

from __future__ import annotations

import torch

from fastrome.baselines.alphaedit import ReferenceAlphaEdit


def setup(d=31, d_out=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = torch.logspace(-3, 2, d, dtype=torch.float64)
    C = (q * values) @ q.T
    W = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    return C, q, values, W, g


def test_factors_equal_the_published_formula():
    C, q, values, W, g = setup()
    ref = ReferenceAlphaEdit(C, threshold=0.05)
    keys = [torch.randn(31, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    targets = [torch.randn(13, generator=g, dtype=torch.float64) for _ in range(4)]
    w = W.clone()
    for i, (k, v) in enumerate(zip(keys, targets)):
        Kp = torch.stack(keys[:i], 1) if i else torch.zeros(31, 0, dtype=torch.float64)
        K1 = k[:, None]
        R = v[:, None] - w @ K1
        P = ref.P
        want = R @ K1.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K1 @ K1.T @ P + torch.eye(31, dtype=torch.float64))
        w_before = w.clone()
        u, lam = ref.edit(w, k, v)
        torch.testing.assert_close(torch.outer(lam, u), want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(w - w_before, want, rtol=1e-9, atol=1e-10)
    assert ref.edits == 4


def test_high_energy_directions_and_earlier_keys_are_nearly_kept():
    C, q, values, W, g = setup(seed=1)
    ref = ReferenceAlphaEdit(C, threshold=0.05)
    high = q[:, values > 0.05 * values.mean()]
    first = ref.P @ torch.randn(31, generator=g, dtype=torch.float64) * 30
    w = W.clone()
    ref.edit(w, first, torch.randn(13, generator=g, dtype=torch.float64))
    out_first = w @ first
    before = w.clone()
    second = ref.P @ torch.randn(31, generator=g, dtype=torch.float64) * 30
    ref.edit(w, second, torch.randn(13, generator=g, dtype=torch.float64))
    delta = w - before
    assert float((delta @ high).norm()) < 1e-9 * float(delta.norm())
    assert float((w @ first - out_first).norm()) < 0.05 * float(delta.norm() * first.norm())


# -- the closed form behind the editor (EditConfig(update_form="alphaedit")) ---------------------

import warnings  # noqa: E402

import pytest  # noqa: E402

from fastrome import CLASSIC, EditConfig, Editor  # noqa: E402
from fastrome.adapter import ModelAdapter  # noqa: E402

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1},
    {"prompt": "{} plays the instrument", "subject": "Miles Davis", "target_new": "violin", "case_id": 2},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English", "case_id": 3},
]
ALPHA = dict(CLASSIC, v_steps=4, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, layer=1,
             null_space=0.5, memory_beta=1.0, update_form="alphaedit")


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.logspace(-2, 2, d, dtype=torch.float64)) @ q.T


def test_the_editor_writes_the_published_update_edit_after_edit(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    adapter = ModelAdapter(model)
    C = _spd(adapter.d_in, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = Editor(model, tok, stats={layer: C.float() for layer in range(3)}, **ALPHA)
    ref = ReferenceAlphaEdit(C.float(), threshold=0.5)  # the projector of the same fp32 C the editor got
    for req in REQS:
        before = adapter.weight(1).detach().double().clone()
        (rec,) = ed.edit(req).records
        assert rec.applied
        k, v = ed.last.k_mean.double(), ed.last.v_star.double()
        u, lam = ref.factors(before, k, v)
        ref.remember(k)
        delta = adapter.weight(1).detach().double() - before
        want = torch.outer(lam, u)
        # the weight is fp32: its rounding, seen through W_after − W_before, is ~1e-5 of so small a change
        assert float((delta - want).norm()) < 1e-4 * float(want.norm())
        # not exact at its key: the regulariser leaves uᵀk < 1 of the change
        assert 0 < float(u @ k) < 1
    assert len(ed.solver(1).keys) == 3 and "AlphaEdit's closed form" in ed.stats_source(1)


def test_undo_takes_the_key_out_of_the_next_solve(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    C = _spd(ModelAdapter(model).d_in, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = Editor(model, tok, stats={layer: C.float() for layer in range(3)}, **ALPHA)
    ed.edit(REQS[0])
    k = torch.randn(ModelAdapter(model).d_in, generator=torch.Generator().manual_seed(1))
    alone = ed.solver(1).solve(k)[0].clone()
    ed.edit(REQS[1])
    assert not torch.equal(ed.solver(1).solve(k)[0], alone)
    ed.undo(1)
    assert torch.equal(ed.solver(1).solve(k)[0], alone) and len(ed.solver(1).keys) == 1


@pytest.mark.parametrize("change", [dict(mode="dual"), dict(spread=2), dict(null_space=0.0), dict(memory_beta=0.0)])
def test_the_form_is_refused_outside_its_setting(change):
    with pytest.raises(ValueError, match=r"config.update_form: expected 'exact' unless mode='consistent'"):
        EditConfig(**{**dict(CLASSIC, null_space=0.5, memory_beta=1.0, update_form="alphaedit"), **change}).validate()
