"""Refreshing the edit memory's keys (``memory_refresh_every``): after every R-th edit each memory
is rebuilt from its edits' keys read anew from the edited model; resume and undo derive the same
memory from the journal."""

from __future__ import annotations

import shutil

import pytest
import torch
from kernel_checks import same_bits
from test_spread import REQS, editor, weights

from fastrome.config import EditConfig
from fastrome.keys import capture_at, capture_keys
from fastrome.memory import EditMemory
from fastrome.prompts import edit_prompts
from fastrome.refresh import refresh_point
from fastrome.requests import parse_requests
from fastrome.tokens import pad_id

THIRD = {"prompt": "{} plays the instrument", "subject": "Miles Davis", "target_new": "guitar", "case_id": 3}
KW = dict(mode="dual", spread=2, layer=2, memory_beta=2.0, memory_refactor_every=2, memory_refresh_every=2)


def keys_now(ed, req, layer, mean):
    """The key ``req``'s memory row has at ``layer`` in the model as it is now, read on its own."""
    (request,) = parse_requests([req])
    prompts = edit_prompts(ed.tokenizer, ed.templates(), request)
    keys = capture_at(ed.adapter, layer, prompts, pad_id(ed.tokenizer))[0]
    return keys.mean(0) if mean else keys[0]


def test_keys_of_several_layers_in_one_pass_are_those_read_one_layer_at_a_time(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, layer=2)
    prompts = [p for req in parse_requests(REQS + [THIRD]) for p in edit_prompts(tok, ed.templates(), req)]
    got = capture_keys(ed.adapter, [2, 0], prompts, pad_id(tok))
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(got[layer], capture_at(ed.adapter, layer, prompts, pad_id(tok))[0])


@pytest.mark.parametrize("mode,dual_keys,mean", [("dual", "prompt", False), ("dual", "both", True),
                                                  ("consistent", "prompt", True)])
def test_at_a_refresh_point_each_memory_holds_the_keys_read_from_the_model_then(make_tiny, mode, dual_keys, mean):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, **{**KW, "mode": mode, "memory_dual_keys": dual_keys})
    ed.edit(REQS)  # two edits: the refresh point
    for layer in (1, 2):
        mem = ed.solver(layer)
        rows = []
        for req in REQS:
            if mode == "dual" and dual_keys == "both":
                rows += [keys_now(ed, req, layer, True), keys_now(ed, req, layer, False)]
            else:
                rows.append(keys_now(ed, req, layer, mean))
        assert len(mem.keys) == len(rows)
        for kept, row in zip(mem.keys, rows):
            torch.testing.assert_close(kept, row, rtol=1e-5, atol=1e-6)
        # the memory's inverse is the one its keys give, bit for bit
        fresh = EditMemory(mem.base, 2.0, 2)
        fresh.rebuild(mem.keys)
        assert torch.equal(fresh.inverse, mem.inverse)
    # the second edit wrote layer 1, so the first subject's key at layer 2 has moved from the solved one
    first = ed.journal.entries[1]
    assert first.layer == 2
    solved = first.key if first.key.dim() == 1 else first.key[-1]
    refreshed = ed.solver(2).keys[1 if mode == "dual" and dual_keys == "both" else 0]
    assert float((refreshed - solved).norm()) > 1e-4 * float(solved.norm())
    # the third edit is no refresh point: its key joins as solved
    ed.edit(THIRD)
    last = ed.journal.entries[-1]
    assert torch.equal(ed.solver(2).keys[-1], last.key if last.key.dim() == 1 else last.key[-1])


def test_a_resumed_run_holds_the_memory_and_weights_of_one_never_stopped(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    whole = editor(model, tok, journal=tmp_path / "whole", **KW)
    whole.edit(REQS + [THIRD])
    want = {layer: whole.solver(layer).inverse.clone() for layer in (1, 2)}
    want_weights = weights(model)
    whole.close()

    # stopped after the refresh point and resumed for the third edit
    first, _ = make_tiny("llama-bytelevel", layers=3)
    part = editor(first, tok, journal=tmp_path / "parts", **KW)
    part.edit(REQS)
    part.close()
    again, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(again, tok, journal=tmp_path / "parts", **KW)
    resumed.edit(THIRD)
    assert all(same_bits(a, b) for a, b in zip(weights(again), want_weights))
    for layer in (1, 2):
        assert torch.equal(resumed.solver(layer).inverse, want[layer])

    # resumed past the refresh point: the refresh is read from the weights the first two edits left,
    # and the weights are back as the journal has them afterwards
    later, _ = make_tiny("llama-bytelevel", layers=3)
    reopened = editor(later, tok, journal=tmp_path / "whole", **KW)
    for layer in (1, 2):
        assert torch.equal(reopened.solver(layer).inverse, want[layer])
    assert all(same_bits(a, b) for a, b in zip(weights(later), want_weights))


def test_undo_removes_the_key_and_derives_the_refresh_from_the_edits_that_remain(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", **KW)
    ed.edit(REQS + [THIRD])
    second = ed.journal.entries[2].edit_id
    ed.undo(second)  # two edits remain: a refresh point, now over the first and the third
    assert ed.done_case_ids() == [1, 3]
    edited = weights(model)
    for layer in (1, 2):
        mem = ed.solver(layer)
        assert len(mem.keys) == 2
        for kept, req in zip(mem.keys, (REQS[0], THIRD)):
            torch.testing.assert_close(kept, keys_now(ed, req, layer, False), rtol=1e-5, atol=1e-6)
    copy = tmp_path / "copy"
    ed.close()
    shutil.copytree(tmp_path / "j", copy)
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(fresh, tok, journal=copy, **KW)
    for layer in (1, 2):
        assert torch.equal(resumed.solver(layer).inverse, ed.solver(layer).inverse)
    assert all(same_bits(a, b) for a, b in zip(weights(fresh), edited))


def test_a_run_resumes_only_with_the_refresh_it_was_made_with(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", **KW)
    ed.edit(REQS[0])
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    with pytest.raises(ValueError, match="memory_refresh_every=2"):
        editor(fresh, tok, journal=tmp_path / "j", **{**KW, "memory_refresh_every": 0})


def test_memory_refresh_every_is_checked_and_acts_only_with_a_memory():
    with pytest.raises(ValueError, match="config.memory_refresh_every: expected an int >= 0"):
        EditConfig(memory_refresh_every=-1).validate()
    with pytest.raises(ValueError, match="config.memory_refresh_every"):
        EditConfig(memory_refresh_every=1.5).validate()
    from fastrome.config import settings_that_differ

    was = EditConfig(memory_beta=0.0, memory_refresh_every=5).lifelong_settings()
    assert not settings_that_differ(was, EditConfig(memory_beta=0.0).lifelong_settings())
    assert settings_that_differ(EditConfig(memory_refresh_every=5).lifelong_settings(),
                                EditConfig().lifelong_settings()) == {"memory_refresh_every": (5, 0)}


def test_refresh_points_fall_on_multiples_of_the_period():
    assert [refresh_point(n, 3) for n in range(8)] == [0, 0, 0, 3, 3, 3, 6, 6]
    assert refresh_point(10, 0) == 0

