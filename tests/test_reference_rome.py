"""The in-repo reference ROME against fastrome's editor: same objective, same update, both modes."""

from __future__ import annotations

import pytest
import torch

from fastrome import Editor
from fastrome.adapter import ModelAdapter
from fastrome.baselines.rome import ReferenceRome, reference_edits
from fastrome.config import EditConfig
from fastrome.stats import compute

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
]
TEMPLATES = ["{}", "Because it rained. {}", "I said that the story went on. {}"]
# the reference is classic ROME: no edit memory, no early stopping (the mode is each test's)
SETTINGS = dict(v_steps=5, max_update_ratio=float("inf"), memory_beta=0.0, mpes_checks=0, spread=1)


@pytest.mark.parametrize("mode", ["original", "consistent"])
@pytest.mark.parametrize("kind", ["llama-bytelevel", "gpt2-bytelevel"])
def test_reference_and_editor_make_the_same_edits(make_tiny, mode, kind):
    layer = 1
    model_a, tok = make_tiny(kind)
    model_b, _ = make_tiny(kind)
    C = compute(ModelAdapter(model_a), tok, [layer], tokens=3000, max_len=96, progress=False)[layer].matrix
    results = reference_edits(model_a, tok, REQS, layer, C, TEMPLATES, mode, EditConfig(**SETTINGS))
    ed = Editor(model_b, tok, stats={layer: C}, layer=layer, mode=mode, cache_dir=False, **SETTINGS)
    ed.use_templates(TEMPLATES)
    report = ed.edit(REQS)
    for res, rec in zip(results, report.records):
        assert rec.applied and res.steps == rec.steps
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(rec.losses), rtol=1e-4, atol=1e-5)
    wa, wb = ModelAdapter(model_a).weight(layer).detach(), ModelAdapter(model_b).weight(layer).detach()
    w0 = ModelAdapter(make_tiny(kind)[0]).weight(layer).detach()
    change = (wb - w0).norm()
    assert change > 1e-3 * w0.norm()
    assert (wa - wb).norm() / change < 1e-3
    # the whole models agree, not only the edited matrix
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    torch.testing.assert_close(model_a(input_ids=ids).logits, model_b(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


def test_reference_checks_its_arguments(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    d = ModelAdapter(model).d_in
    C = torch.eye(d)
    with pytest.raises(ValueError, match="mode"):
        ReferenceRome(model, tok, 1, C, TEMPLATES, mode="prompt")
    with pytest.raises(ValueError, match="second_moment"):
        ReferenceRome(model, tok, 1, torch.eye(d + 1), TEMPLATES)
    with pytest.raises(ValueError, match="templates"):
        ReferenceRome(model, tok, 1, C, ["x {}"])
    with pytest.raises(ValueError, match="layer"):
        ReferenceRome(model, tok, 99, C, TEMPLATES)
