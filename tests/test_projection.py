"""Null-space projection: u restricted to the low-energy eigenspace of C (threshold relative to
the mean eigenvalue), so directions that ordinary text uses are left alone; the edit stays exact."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastrome import CLASSIC, Editor
from fastrome.adapter import ModelAdapter
from fastrome.projection import null_space_projector

REQ = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1}
FAST = dict(CLASSIC, v_steps=4, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, layer=1)


def spectrum_matrix(d, seed):
    """A random SPD matrix with eigenvalues spread over four decades."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    values = torch.logspace(-2, 2, d, dtype=torch.float64)
    return (q * values) @ q.T, q, values


@pytest.mark.parametrize("d, threshold", [(7, 0.5), (97, 0.1), (97, 1.0), (64, 1e-3)])
def test_the_projector_keeps_the_low_energy_eigenvectors(d, threshold):
    C, q, values = spectrum_matrix(d, d)
    P, rank = null_space_projector(C.float(), threshold)
    keep = values <= threshold * values.mean()
    assert rank == int(keep.sum())
    torch.testing.assert_close(P, q[:, keep] @ q[:, keep].T, rtol=0, atol=1e-5)
    assert torch.equal(P, P.T)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-9)


def test_bad_thresholds_are_refused():
    C, _, _ = spectrum_matrix(5, 0)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            null_space_projector(C, bad)


def test_a_threshold_that_keeps_no_direction_is_refused():
    C, _, values = spectrum_matrix(64, 3)
    low = float(values[0] / values.mean())
    with pytest.raises(ValueError, match=rf"keeps none of the 64 eigenvectors.*smallest eigenvalue is {low:.3g} of"):
        null_space_projector(C, 0.5 * low)
    assert null_space_projector(C, 1.01 * low)[1] == 1


def editor(model, tok, stats, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Editor(model, tok, stats=stats, **{**FAST, **kw})


def test_a_projected_edit_leaves_high_energy_directions_alone(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    d = ModelAdapter(model).d_in
    C, q, values = spectrum_matrix(d, 1)
    stats = {layer: C.float() for layer in range(3)}
    before = ModelAdapter(model).weight(1).detach().double().clone()
    ed = editor(model, tok, stats, null_space=0.5, memory_beta=1.0)
    (rec,) = ed.edit(REQ).records
    assert rec.applied and "null-space projection rank" in ed.stats_source(1)
    delta = ModelAdapter(model).weight(1).detach().double() - before
    high = q[:, values > 0.5 * values.mean()]  # what ordinary text uses
    assert float((delta @ high).norm()) < 1e-4 * float(delta.norm())
    # exact at its own key, and the memory behind the projection learnt the key
    got = ModelAdapter(model).weight(1).detach().double() @ ed.last.k_mean.double()
    assert float((got - ed.last.v_star.double()).norm() / ed.last.v_star.double().norm()) < 1e-5
    assert len(ed.solver(1).keys) == 1


@pytest.mark.filterwarnings("ignore:statistics switched off")
def test_projection_needs_the_statistics_matrix(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, "identity", null_space=0.5)
    before = ModelAdapter(model).weight(1).detach().clone()
    for _ in range(2):  # and again: a refused call leaves no solver behind that would edit unprojected
        with pytest.raises(ValueError, match="config.null_space: the projection needs the statistics matrix C of "
                                             "layer 1"):
            ed.edit(REQ)
    assert torch.equal(ModelAdapter(model).weight(1), before)


def test_editor_refuses_a_projection_that_keeps_nothing_before_any_work(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    d = ModelAdapter(model).d_in
    C = torch.eye(d) + 0.01 * torch.ones(d, d) / d  # a flat spectrum: no eigenvalue far below the mean
    before = ModelAdapter(model).weight(1).detach().clone()
    ed = editor(model, tok, {layer: C for layer in range(3)}, null_space=0.1)
    with pytest.raises(ValueError, match=r"config.null_space at layer 1: 0.1 keeps none of the"):
        ed.edit(REQ)
    assert torch.equal(ModelAdapter(model).weight(1), before)
