"""Editor.save_pretrained / Editor.from_pretrained: a folder of edits that names its base model,
replays onto it bit for bit, and gives back an editor that undoes and keeps editing exactly as the
one that saved it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastrome import Editor
from fastrome.adapter import ModelAdapter

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess", "case_id": 3},
]
MORE = {"prompt": "{} is the capital of", "subject": "Berlin", "target_new": "Spain", "case_id": 4}
# the default's lifelong settings (dual keys, edit memory, early stopping) over two layers
FAST = dict(v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, layer=2,
            spread=2, memory_beta=0.5)


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return (a @ a.T / a.shape[1] + 0.1 * torch.eye(d, dtype=torch.float64)).float()


def stats_for(model):
    return {layer: spd(ModelAdapter(model).d_in, layer) for layer in range(3)}


def make(make_tiny, seed=0):
    model, tok = make_tiny("llama-bytelevel", layers=3, seed=seed)
    return model, tok


def weights(ed):
    return [ed.adapter.weight(layer).detach().clone() for layer in range(3)]


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.fixture
def saved(make_tiny, tmp_path):
    model, tok = make(make_tiny)
    ed = quiet(Editor, model, tok, stats=stats_for(model), **FAST)
    quiet(ed.edit, REQS)
    out = ed.save_pretrained(tmp_path / "edits")
    return ed, out


def test_the_folder_holds_the_edits_their_provenance_and_a_model_card(saved):
    ed, out = saved
    meta = json.loads((out / "fastrome.json").read_text())
    assert meta["edits"] == 3 and meta["config"]["spread"] == 2 and meta["templates"] == ed.templates()
    assert set(meta["base_digests"]) == {"1", "2"} and set(meta["stats"]) == {"1", "2"}
    card = (out / "README.md").read_text()
    assert "library_name: fastrome" in card and "# 3 edited facts" in card
    assert "| 0 | The Eiffel Tower | The Eiffel Tower is located in the city of | Paris → Rome |" in card
    assert "| 1 | The Mona Lisa | The Mona Lisa was painted by | ? → Pablo Picasso |" in card


def test_from_pretrained_replays_bit_for_bit_then_undoes_and_keeps_editing(make_tiny, saved, tmp_path):
    ed, out = saved
    base, tok = make(make_tiny)
    loaded = quiet(Editor.from_pretrained, base, tok, out, stats=stats_for(base), journal=tmp_path / "j")
    assert all(torch.equal(a, b) for a, b in zip(weights(loaded), weights(ed)))
    assert loaded.done_case_ids() == [1, 2, 3] and loaded.config.lifelong_settings() == ed.config.lifelong_settings()
    # keep editing: the same new edit on both gives the same weights (same templates, memory, settings)
    quiet(ed.edit, MORE)
    quiet(loaded.edit, MORE)
    assert all(torch.equal(a, b) for a, b in zip(weights(loaded), weights(ed)))
    # undo an early edit on both
    first = ed.journal.entries[0].edit_id
    ed.undo(first)
    loaded.undo(loaded.journal.entries[0].edit_id)
    assert all(torch.equal(a, b) for a, b in zip(weights(loaded), weights(ed)))
    assert loaded.done_case_ids() == [2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(loaded.solver(2).inverse, ed.solver(2).inverse))


def test_another_base_model_is_refused_before_any_write(make_tiny, saved):
    _, out = saved
    other, tok = make(make_tiny, seed=1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="from_pretrained"):
        quiet(Editor.from_pretrained, other, tok, out, stats=stats_for(other))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_a_different_lifelong_setting_is_refused_before_anything_is_recorded(make_tiny, saved, tmp_path):
    _, out = saved
    base, tok = make(make_tiny)
    with pytest.raises(ValueError, match="memory_beta=0.5"):
        quiet(Editor.from_pretrained, base, tok, out, stats=stats_for(base), memory_beta=0.1, journal=tmp_path / "j")
    assert not (tmp_path / "j" / "edits.jsonl").exists()


def test_a_folder_without_saved_edits_is_refused(make_tiny, tmp_path):
    base, tok = make(make_tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved-edits folder"):
        Editor.from_pretrained(base, tok, tmp_path / "empty", cache_dir=False)
