"""Spread edits (``config.spread`` > 1): one request shared among consecutive layers, lowest first,
so that the residual stream after the edit's layer reaches its target; undone, replayed, refused
and resumed as one edit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from kernel_checks import same_bits

from fastrome import Editor, EditRefused
from fastrome.adapter import ModelAdapter
from fastrome.keys import capture_residual
from fastrome.prompts import edit_prompts
from fastrome.requests import parse_requests
from fastrome.tokens import pad_id

FAST = dict(v_steps=4, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False)
REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
]


def second_moments(model, seed=0):
    """A random SPD second moment per layer: u = C⁻¹k is then not parallel to k."""
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(adapter.n_layers):
        a = torch.randn(adapter.d_in, 3 * adapter.d_in, generator=gen, dtype=torch.float64)
        out[layer] = (a @ a.T / a.shape[1] + 0.1 * torch.eye(adapter.d_in, dtype=torch.float64)).float()
    return out


def editor(model, tok, **kw):
    return Editor(model, tok, stats=second_moments(model), **{**FAST, **kw})


def weights(model):
    adapter = ModelAdapter(model)
    return [adapter.weight(layer).detach().clone() for layer in range(adapter.n_layers)]


def residual_at_key(ed, req, layer):
    """The residual stream after ``layer`` where the mode reads its key: averaged over the edit's
    prompts (consistent), or at the unprefixed prompt."""
    (request,) = parse_requests([req])
    prompts = edit_prompts(ed.tokenizer, ed.templates(), request)
    h = capture_residual(ed.adapter, layer, prompts, pad_id(ed.tokenizer)).double()
    return h.mean(0) if ed.config.mode == "consistent" else h[0]


@pytest.mark.parametrize("mode", ["consistent", "prompt", "original", "dual"])
def test_spread_edit_moves_the_residual_stream_by_delta(tiny, mode):
    model, tok, kind = tiny
    n_layers = ModelAdapter(model).n_layers
    ed = editor(model, tok, layer=2, spread=3, mode=mode)
    before = weights(model)
    start = residual_at_key(ed, REQS[0], 2)
    (rec,) = ed.edit(REQS[0]).records
    assert rec.status == "applied" and [p["layer"] for p in rec.parts] == [0, 1, 2]
    assert [e.layer for e in ed.journal] == [0, 1, 2] and ed.done_case_ids() == [1]
    assert [p["edit_id"] for p in rec.parts] == [e.edit_id for e in ed.journal] and rec.edit_id == 0
    delta = (ed.last.v_star - ed.last.v_init).double()
    # the stream after layer 2 is where the optimisation put it
    moved = residual_at_key(ed, REQS[0], 2) - start
    assert float((moved - delta).norm()) <= 1e-4 * float(delta.norm()) + 1e-5, kind
    after = weights(model)
    assert all(not torch.equal(after[i], before[i]) for i in (0, 1, 2))
    assert all(torch.equal(after[i], before[i]) for i in range(3, n_layers))
    assert rec.interference == pytest.approx(sum(p["interference"] for p in rec.parts))
    assert rec.update_ratio == max(p["update_ratio"] for p in rec.parts)


def test_spread_of_one_is_the_one_layer_edit(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    before = weights(model)
    ed = editor(model, tok, layer=2, spread=1)
    records = ed.edit(REQS).records
    assert all(rec.parts == [] for rec in records) and [e.layer for e in ed.journal] == [2, 2]
    after = weights(model)
    assert all(same_bits(after[i], before[i]) for i in range(len(before)) if i != 2)
    moved = after[2].double() - before[2].double()
    want = sum(torch.outer(e.lam.double(), e.u.double()) for e in ed.journal)
    torch.testing.assert_close(moved, want, rtol=1e-4, atol=1e-6)


def test_the_default_spread_is_four_layers_or_as_many_as_there_are_below(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    assert editor(model, tok, layer=3).config.spread == 4
    assert editor(model, tok, layer=1).config.spread == 2
    assert editor(model, tok, layer=3, value_norm="cap").config.spread == 1  # value-norm control: one layer


def test_spread_shares_reduce_the_update_at_each_layer(make_tiny):
    one, tok = make_tiny("llama-bytelevel")
    three, _ = make_tiny("llama-bytelevel")
    (single,) = editor(one, tok, layer=2, spread=1).edit(REQS[0]).records
    (spread,) = editor(three, tok, layer=2, spread=3).edit(REQS[0]).records
    # the same value optimisation; the last layer now writes a third of it, or what is left
    assert spread.delta_norm == pytest.approx(single.delta_norm)
    assert spread.parts[0]["interference"] < single.interference / 4


def test_undo_replay_and_export_treat_a_spread_edit_as_one(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    base = weights(model)
    ed = editor(model, tok, layer=2, spread=2)
    ed.edit(REQS[0])
    after_first = weights(model)
    ed.edit(REQS[1])
    edited = weights(model)
    assert [e.layer for e in ed.journal] == [1, 2, 1, 2]
    assert ed.done_case_ids() == [1, 2] and [r["case_id"] for r in ed.applied_records()] == [1, 2]
    path = ed.save_pretrained(tmp_path / "edits")
    fresh, _ = make_tiny("llama-bytelevel")
    Editor.from_pretrained(fresh, tok, path, stats=second_moments(fresh))
    assert all(same_bits(x, y) for x, y in zip(weights(fresh), edited))
    # naming any one layer's id undoes the whole edit
    last_part = ed.journal.entries[-1].edit_id
    removed = ed.undo(last_part)
    assert [e.layer for e in removed] == [1, 2]
    assert all(same_bits(x, y) for x, y in zip(weights(model), after_first))
    assert ed.history[-1].status == "undone" and ed.done_case_ids() == [1]
    ed.undo_last(1)
    assert all(same_bits(x, y) for x, y in zip(weights(model), base)) and not ed.journal.entries
    with pytest.raises(ValueError, match="n: expected 0..0"):
        ed.undo_last(1)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_refusal_at_a_later_layer_leaves_every_weight_unchanged(make_tiny, monkeypatch, policy):
    import fastrome.guards as guards_module

    model, tok = make_tiny("llama-bytelevel")
    ed = editor(model, tok, layer=2, spread=3, policy=policy)
    ed.edit(REQS[0])
    before = weights(model)
    plain = guards_module.check
    calls = []

    def refuse_the_second_layer(**kw):
        verdict = plain(**kw)
        calls.append(1)
        if len(calls) == 2:
            verdict.ok, verdict.reasons = False, ["refused for the test"]
        return verdict

    monkeypatch.setattr(guards_module, "check", refuse_the_second_layer)
    if policy == "raise":
        with pytest.raises(EditRefused, match="layer 1: refused for the test"):
            ed.edit(REQS[1])
        rec = ed.history[-1]
    else:
        (rec,) = ed.edit(REQS[1]).records
    assert rec.status == "refused" and [p["layer"] for p in rec.parts] == [0, 1] and rec.edit_id is None
    assert all(same_bits(x, y) for x, y in zip(weights(model), before))
    assert ed.done_case_ids() == [1] and len(ed.journal) == 3
    # the layer that was written and rebuilt keeps its running total: a new edit goes on from there
    monkeypatch.setattr(guards_module, "check", plain)
    (again,) = ed.edit(REQS[1]).records
    assert again.status == "applied" and ed.done_case_ids() == [1, 2]


def test_resume_drops_a_spread_edit_cut_between_its_layers(make_tiny, tmp_path, caplog):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor(model, tok, layer=2, spread=2, journal=tmp_path / "j")
    ed.edit(REQS[0])
    after_first = weights(model)
    ed.edit(REQS[1])
    # the process dies after the first of the second edit's two journal lines
    lines = (tmp_path / "j" / "edits.jsonl").read_text().splitlines()
    (tmp_path / "j" / "edits.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert json.loads(lines[-1])["record"]["part"] == 1
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel")
    with caplog.at_level("WARNING", logger="fastrome"):
        resumed = editor(fresh, tok, layer=2, spread=2, journal=tmp_path / "j")
    assert "incomplete parts [2]" in caplog.text
    assert resumed.done_case_ids() == [1] and [e.layer for e in resumed.journal] == [1, 2]
    assert all(same_bits(x, y) for x, y in zip(weights(fresh), after_first))
    resumed.edit(REQS[1])
    assert resumed.done_case_ids() == [1, 2]
    assert all(same_bits(x, y) for x, y in zip(weights(fresh), weights(model)))


def test_spread_that_does_not_fit_is_refused_before_anything_changes(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    with pytest.raises(ValueError, match="config.spread"):
        editor(model, tok, layer=2, spread=0)
    ed = editor(model, tok, layer=1, spread=3)
    before = weights(model)
    with pytest.raises(ValueError, match=r"config.spread: 3 layers ending at layer 1 \(requests\[0\]\)"):
        ed.edit(REQS[0])
    assert all(torch.equal(x, y) for x, y in zip(weights(model), before))


def test_batched_spread_edits_aim_at_the_stream_from_before_the_batch(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor(model, tok, layer=2, spread=2)
    start = residual_at_key(ed, REQS[1], 2)
    report = ed.edit(REQS, batch_size=2)
    assert [r.status for r in report.records] == ["applied", "applied"] and [r.batch for r in report.records] == [2, 2]
    assert [e.layer for e in ed.journal] == [1, 2, 1, 2] and ed.done_case_ids() == [1, 2]
    # the second request's target is its stream before the batch plus its δ, reached although the
    # first request's layers were written in between
    delta = (ed.last.v_star - ed.last.v_init).double()
    moved = residual_at_key(ed, REQS[1], 2) - start
    assert float((moved - delta).norm()) <= 1e-4 * float(delta.norm()) + 1e-5


def test_statistics_are_the_unedited_models_also_in_a_resumed_run(make_tiny, tmp_path):
    # Keys at layer 2 depend on layer 1's down projection, which a spread edit over layers 1-2
    # writes. A resumed run replays its journal before it first needs the statistics, which must
    # still describe the unedited model; otherwise it edits differently from a run never stopped.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{i}: Rome is the capital of Italy. The Nile flows north." * (1 + i % 3)
                                  for i in range(40)), encoding="utf-8")
    kw = {**FAST, "corpus": str(corpus), "stats_tokens": 600, "stats_max_len": 48, "layer": 2, "spread": 2}
    model, tok = make_tiny("llama-bytelevel")
    ed = Editor(model, tok, journal=tmp_path / "j", **kw)
    probe = torch.randn(ModelAdapter(model).d_in, generator=torch.Generator().manual_seed(3))
    ed.edit(REQS[0])
    solved = [ed.solver(layer).solve(probe)[0] for layer in (1, 2)]

    fresh, _ = make_tiny("llama-bytelevel")
    # the run goes on below beside its resumed copy, so the copy resumes from a copy of the journal
    shutil.copytree(tmp_path / "j", tmp_path / "j2")
    resumed = Editor(fresh, tok, journal=tmp_path / "j2", **kw)
    replayed = weights(fresh)
    assert all(same_bits(x, y) for x, y in zip(replayed, weights(model)))
    assert all(torch.equal(resumed.solver(layer).solve(probe)[0], s) for layer, s in zip((1, 2), solved))
    # reading the statistics put the edited weights back bit for bit
    assert all(same_bits(x, y) for x, y in zip(weights(fresh), replayed))
    resumed.edit(REQS[1])
    ed.edit(REQS[1])
    assert all(same_bits(x, y) for x, y in zip(weights(fresh), weights(model)))


def test_the_edit_layers_statistics_are_computed_in_one_pass_with_its_spread_group(make_tiny, tmp_path, monkeypatch):
    # Asking for the edit layer's solver (stats_source(), as a run's header does) before the first
    # edit must not cost a second pass over the corpus for the layers below it.
    import fastrome.editor as editor_module

    passes = []
    real = editor_module.load_or_compute

    def counting(adapter, tokenizer, layers, **kw):
        passes.append(sorted(layers))
        return real(adapter, tokenizer, layers, **kw)

    monkeypatch.setattr(editor_module, "load_or_compute", counting)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{i}: Rome is the capital of Italy." for i in range(20)), encoding="utf-8")
    model, tok = make_tiny("llama-bytelevel")
    ed = Editor(model, tok, corpus=str(corpus), stats_tokens=200, stats_max_len=32, layer=3, spread=3,
                **FAST)
    ed.stats_source()
    ed.edit(REQS[0])
    assert passes == [[1, 2, 3]]
    # a layer outside the group is computed alone, when it is first needed
    ed.solver(0)
    assert passes == [[1, 2, 3], [0]]
