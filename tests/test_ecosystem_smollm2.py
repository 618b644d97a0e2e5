"""The saved-edits folder and the PEFT adapter on the real SmolLM2-135M-Instruct, default settings
(dual keys, edit memory, spread over layers 3-6): replayed bit for bit by from_pretrained, undone to
the unedited weights, and served by the real peft package on that untouched base."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastrome
from fastrome import Editor

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "case_id": "eiffel"},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso",
     "target_true": "Leonardo da Vinci", "case_id": "mona"},
]
# few value steps and a small statistics budget: this checks the artifacts, not edit quality
FAST = dict(layer=6, v_steps=4)
PROBES = ["The Eiffel Tower is located in the city of", "The Mona Lisa was painted by",
          "The Louvre is located in the city of"]


def logits(model, tok):
    with torch.no_grad():
        return torch.stack([model(**tok(p, return_tensors="pt")).logits[0, -1] for p in PROBES])


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_saved_folder_and_adapter_on_smollm2(smollm2, tmp_path):
    base, tok = smollm2  # the shared model is never edited: copies are
    unedited = weights(base)
    stats = fastrome.compute_stats(base, tok, [3, 4, 5, 6], tokens=4000)  # the public statistics call
    assert sorted(stats) == [3, 4, 5, 6] and all(sm.count == 4000 for sm in stats.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = Editor(copy.deepcopy(base), tok, stats=stats, **FAST)
        ed.edit(REQS)
    edited = weights(ed.model)
    layers = sorted({e.layer for e in ed.journal})
    assert layers == [3, 4, 5, 6]

    ed.save_pretrained(tmp_path / "edits")
    replayed = Editor.from_pretrained(copy.deepcopy(base), tok, tmp_path / "edits", stats=stats)
    assert all(torch.equal(v, edited[k]) for k, v in replayed.model.state_dict().items())
    assert replayed.done_case_ids() == ["eiffel", "mona"]

    ed.save_peft(tmp_path / "adapter")
    want = logits(ed.model, tok)
    replayed.undo_last(len(replayed.done_case_ids()))  # back to the unedited base, bit for bit
    fresh = replayed.model
    assert all(torch.equal(v, unedited[k]) for k, v in fresh.state_dict().items())
    before = logits(fresh, tok)
    lora = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    got = logits(lora, tok)
    assert (want - before).abs().max() > 0.1  # the edits moved these logits
    assert (got - want).abs().max() <= 1e-4
    merged = lora.merge_and_unload()
    for layer in layers:
        name = ed.adapter.module_template.format(layer) + ".weight"
        torch.testing.assert_close(merged.get_parameter(name), edited[name], rtol=0, atol=1e-5)
    assert all(torch.equal(v, unedited[k]) for k, v in base.state_dict().items())
