"""Undo of the latest edits restarts each layer from a recent copy of its weight and forgets the
edit memory's latest keys, instead of replaying the whole journal: the result must be the same bits
as a full replay (a resumed editor) and as never having made those edits."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from test_memory import second_moments

import fastrome.history
from fastrome import Editor
from fastrome.adapter import ModelAdapter

SUBJECTS = ["The Eiffel Tower", "The Mona Lisa", "LeBron James", "Danielle Darrieux", "Toko Yasuda",
            "Autonomous University of Madrid", "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Apple A5"]
REQS = [{"prompt": "{} is connected with", "subject": s, "target_new": t, "case_id": i}
        for i, (s, t) in enumerate(zip(SUBJECTS, ["Rome", "Picasso", "chess", "English", "piano", "Sweden",
                                                  "Dutch", "Paris", "Google"]))]
FAST = dict(v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, layer=2,
            mode="dual", spread=2, memory_beta=0.02, memory_refactor_every=3)


def weights(model):
    adapter = ModelAdapter(model)
    return [adapter.weight(layer).detach().clone() for layer in range(adapter.n_layers)]


def editor(model, tok, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Editor(model, tok, stats=second_moments(model), **{**FAST, **kw})


def inverses(ed):
    """The edit memory's A⁻¹ at both written layers (Editor.solver builds a resumed editor's memory)."""
    return {layer: ed.solver(layer).inverse.clone() for layer in (1, 2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_undo_from_checkpoints_is_bit_exact(make_tiny, tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(fastrome.history, "CHECKPOINT_EVERY", 2)  # copies every two writes: several in play
    model, tok = make_tiny("llama-bytelevel")
    model = model.to(dtype)
    ed = editor(model, tok, journal=tmp_path / "j")
    after = [weights(model)]
    for req in REQS:
        ed.edit(req)
        after.append(weights(model))
    done = len(REQS)
    applied = []
    real = fastrome.history.apply_factors
    monkeypatch.setattr(fastrome.history, "apply_factors", lambda *a: applied.append(1) or real(*a))
    for n in (1, 2, 3):  # the latest edits, across checkpoints and memory refactorisations
        applied.clear()
        ed.undo_last(n)
        if n == 1:  # from a copy at most two writes old at each of the two layers, not the whole journal
            assert len(applied) <= 2 * 2, len(applied)
        done -= n
        assert all(torch.equal(a, b) for a, b in zip(weights(model), after[done])), n
        fresh, _ = make_tiny("llama-bytelevel")
        copy = shutil.copytree(tmp_path / "j", tmp_path / f"j{n}", ignore=shutil.ignore_patterns(".lock"))
        replayed = editor(fresh.to(dtype), tok, journal=copy)  # a full replay of the same journal
        assert all(torch.equal(a, b) for a, b in zip(weights(fresh), after[done]))
        assert all(torch.equal(inverses(ed)[k], v) for k, v in inverses(replayed).items())
        replayed.close()
    for req in REQS[done:done + 3]:  # edit, then undo it: the pattern of single-edit evaluation
        before = weights(model)
        ed.edit(req)
        applied.clear()
        ed.undo_last()
        assert len(applied) <= 2 * 2 and all(torch.equal(a, b) for a, b in zip(weights(model), before))
    ed.undo(ed.journal.entries[0].edit_id)  # an early edit: before every checkpoint, a full replay
    ed.edit(REQS[0])  # and editing goes on from there exactly as in a journal without it
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel")
    replayed = editor(fresh.to(dtype), tok, journal=tmp_path / "j")
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh), weights(model)))
    assert all(torch.equal(inverses(ed)[k], v) for k, v in inverses(replayed).items())
