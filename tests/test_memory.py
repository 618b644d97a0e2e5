"""The edit memory: A⁻¹ for A = C + ridge·I + β·Σ k̄ᵢk̄ᵢᵀ kept by Sherman–Morrison and Woodbury
refactorisation, against an fp64 inverse; rebuilt bit for bit from the keys (undo, resume); and in
the editor, earlier edits held while new ones are written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastrome.memory
from fastrome import Editor
from fastrome.adapter import ModelAdapter
from fastrome.config import CLASSIC
from fastrome.memory import EditMemory
from fastrome.solver import CovarianceSolver

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess", "case_id": 3},
]
# classic ROME plus what each test turns on (the default dual mode has its own tests)
FAST = dict(CLASSIC, v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False)


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1] + 0.1 * torch.eye(d, dtype=torch.float64)


# (12, 4): Woodbury at 4 keys, the d×d form at 8 (at least half of d)
@pytest.mark.parametrize("d, every", [(1, 3), (37, 4), (97, 1000), (64, 1), (12, 4)])
def test_the_inverse_is_that_of_the_statistics_plus_the_keys(d, every):
    C = spd(d, d)
    base = CovarianceSolver(C, ridge=1e-3)
    untouched = base.inverse.clone()
    keys = torch.randn(11, d, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 2
    mem = EditMemory(base, beta=0.3, refactor_every=every)
    for k in keys:
        mem.add(k)
    A = C + 1e-3 * torch.eye(d, dtype=torch.float64) + 0.3 * keys.double().T @ keys.double()
    want = torch.linalg.inv(A)
    assert float((mem.inverse - want).abs().max() / want.abs().max()) < 1e-9
    assert torch.equal(mem.inverse, mem.inverse.T)
    assert torch.equal(base.inverse, untouched)  # the statistics' own inverse stays as it was
    u, denom = mem.solve(keys[0].double())
    torch.testing.assert_close(u, want @ keys[0].double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(denom, keys[0].double() @ want @ keys[0].double(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("d, every", [(41, 1), (41, 3), (41, 5), (41, 100), (7, 2)])
def test_rebuilding_from_the_keys_gives_the_inverse_bit_for_bit(d, every):
    base = CovarianceSolver(spd(d, 3))
    keys = list(torch.randn(9, d, generator=torch.Generator().manual_seed(2)))
    added = EditMemory(base, beta=0.05, refactor_every=every)
    for k in keys:
        added.add(k)
    rebuilt = EditMemory(base, beta=0.05, refactor_every=every)
    rebuilt.rebuild(keys)
    assert torch.equal(rebuilt.inverse, added.inverse)
    # removing the last key (an undo) equals never having added it
    fewer = EditMemory(base, beta=0.05, refactor_every=every)
    for k in keys[:-1]:
        fewer.add(k)
    added.rebuild(keys[:-1])
    assert torch.equal(added.inverse, fewer.inverse)


# undo from copies of A⁻¹, past them by a rebuild, or (copies too large to keep: 0 bytes allowed)
# always by a rebuild
@pytest.mark.parametrize("snapshot_every, copy_bytes", [(2, 1 << 28), (32, 1 << 28), (2, 0)])
@pytest.mark.parametrize("d, every", [(37, 4), (12, 4), (97, 1000), (64, 1)])
def test_forgetting_the_latest_keys_equals_never_adding_them(d, every, snapshot_every, copy_bytes, monkeypatch):
    monkeypatch.setattr(fastrome.memory, "SNAPSHOT_EVERY", snapshot_every)
    monkeypatch.setattr(fastrome.memory, "SNAPSHOT_MAX_BYTES", copy_bytes)
    base = CovarianceSolver(spd(d, 5))
    untouched = base.inverse.clone()
    keys = list(torch.randn(11, d, generator=torch.Generator().manual_seed(7)))
    memory = EditMemory(base, beta=0.05, refactor_every=every)
    for k in keys:
        memory.add(k)
    for n in (1, 2, 3, 4):  # within and across refactorisation boundaries
        memory.forget_last(n)
        keys = keys[: len(keys) - n]
        fresh = EditMemory(base, beta=0.05, refactor_every=every)
        for k in keys:
            fresh.add(k)
        assert len(memory.keys) == len(keys) and torch.equal(memory.inverse, fresh.inverse)
    memory.add(keys[0])  # and it keeps remembering as an uninterrupted one would
    fresh.add(keys[0])
    assert torch.equal(memory.inverse, fresh.inverse)
    with pytest.raises(ValueError, match=f"n: expected 0..{len(fresh.keys)} "):
        fresh.forget_last(len(fresh.keys) + 1)
    memory.forget_last(len(memory.keys))  # back to no keys: the statistics' inverse, which never moved
    assert torch.equal(memory.inverse, untouched) and torch.equal(base.inverse, untouched)
    if copy_bytes == 0:  # no d×d copy was ever held beside A⁻¹
        assert memory.copies_held == 0


def test_an_fp32_base_restarts_an_fp64_memory_that_rebuilds_bit_for_bit():
    """At large d the statistics' inverse is kept in fp32 (base_precision); the memory then holds its
    own fp64 A⁻¹ from the start, rebuilds and undoes bit for bit from that base, and stays the inverse
    of A to the fp32 rounding of the base."""
    d, every = 41, 3
    C = spd(d, 9)
    base = CovarianceSolver(C, ridge=1e-3, precision="float32")
    untouched = base.inverse.clone()
    keys = list(torch.randn(8, d, generator=torch.Generator().manual_seed(4)))
    memory = EditMemory(base, beta=0.2, refactor_every=every)
    assert memory.inverse.dtype == torch.float64 and memory.inverse.data_ptr() != base.inverse.data_ptr()
    assert torch.equal(memory.inverse, untouched.double())
    for k in keys:
        memory.add(k)
    A = C + 1e-3 * torch.eye(d, dtype=torch.float64) + 0.2 * torch.stack(keys).double().T @ torch.stack(keys).double()
    want = torch.linalg.inv(A)
    assert float((memory.inverse - want).abs().max() / want.abs().max()) < 1e-5
    rebuilt = EditMemory(base, beta=0.2, refactor_every=every)
    rebuilt.rebuild(keys)
    assert torch.equal(rebuilt.inverse, memory.inverse)
    memory.forget_last(2)
    fewer = EditMemory(base, beta=0.2, refactor_every=every)
    fewer.rebuild(keys[:-2])
    assert torch.equal(memory.inverse, fewer.inverse)
    memory.forget_last(len(memory.keys))
    assert torch.equal(memory.inverse, untouched.double()) and torch.equal(base.inverse, untouched)


def test_the_base_is_kept_in_fp32_only_where_an_fp64_copy_is_large():
    assert fastrome.memory.base_precision(1536) == "float64"  # SmolLM2
    assert fastrome.memory.base_precision(5792) == "float64"
    assert fastrome.memory.base_precision(5793) == "float32"
    assert fastrome.memory.base_precision(11008) == "float32"  # Llama-2-7B


def test_bad_settings_and_keys_are_refused():
    base = CovarianceSolver(spd(5, 0))
    for beta in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            EditMemory(base, beta=beta, refactor_every=4)
    with pytest.raises(ValueError, match="refactor_every"):
        EditMemory(base, beta=1.0, refactor_every=0)
    mem = EditMemory(base, beta=1.0, refactor_every=4)
    with pytest.raises(ValueError, match="key: not finite"):
        mem.add(torch.tensor([1.0, float("nan"), 0, 0, 0]))
    with pytest.raises(ValueError, match=r"key: expected shape \(5,\)"):
        mem.add(torch.ones(4))
    assert mem.keys == []


# -- in the editor -------------------------------------------------------------------------------
def second_moments(model, seed=0):
    adapter = ModelAdapter(model)
    return {layer: spd(adapter.d_in, seed + layer).float() for layer in range(adapter.n_layers)}


def editor(model, tok, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Editor(model, tok, stats=second_moments(model), **{"layer": 1, **FAST, **kw})


def weights(model):
    adapter = ModelAdapter(model)
    return [adapter.weight(layer).detach().clone() for layer in range(adapter.n_layers)]


def test_an_earlier_edit_is_held_while_later_ones_are_written(make_tiny):
    moved = {}
    for beta in (0.0, 50.0, 1e4):
        model, tok = make_tiny("llama-bytelevel", layers=3)
        ed = editor(model, tok, memory_beta=beta)
        ed.edit(REQS[0])
        first = ed.journal.entries[0]
        w = ModelAdapter(model).weight(1)
        before = (w.detach().double() @ first.key.double()).clone()
        report = ed.edit(REQS[1:])
        # the memory's update is timed as its own phase, and only when there is a memory
        assert all((r.seconds["memory"] > 0) == (beta > 0) for r in report.records)
        moved[beta] = float((w.detach().double() @ first.key.double() - before).norm() / before.norm())
        # every edit is still exact at its own key
        last = ed.journal.entries[-1]
        assert last.key is not None and torch.equal(last.key, ed.last.k_mean.float().cpu())
    # the harder the memory holds (β), the less the first edit's output moves
    assert moved[1e4] < 0.05 * moved[0.0] and moved[50.0] < moved[0.0], moved


def test_undo_takes_the_key_out_of_the_memory(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, memory_beta=2.0, memory_refactor_every=2)
    ed.edit(REQS)
    mem = ed.solver(1)
    assert isinstance(mem, EditMemory) and len(mem.keys) == 3
    keys = [e.key for e in ed.journal]
    ed.undo(ed.journal.entries[1].edit_id)
    fresh = EditMemory(mem.base, 2.0, 2)
    for k in (keys[0], keys[2]):
        fresh.add(k)
    assert torch.equal(mem.inverse, fresh.inverse) and len(mem.keys) == 2
    assert "edit memory β 2" in ed.stats_source(1)


# fp32_base: the sizes at which the statistics' inverse is kept in fp32 (all of them, here)
@pytest.mark.parametrize("spread, fp32_base", [(1, False), (2, False), (2, True)])
def test_a_resumed_run_with_memory_edits_as_one_never_stopped(make_tiny, tmp_path, spread, fp32_base, monkeypatch):
    if fp32_base:
        monkeypatch.setattr(fastrome.memory, "SNAPSHOT_MAX_BYTES", 0)
    whole, tok = make_tiny("llama-bytelevel", layers=3)
    kw = dict(memory_beta=3.0, memory_refactor_every=2, layer=2, spread=spread)
    uninterrupted = editor(whole, tok, **kw)
    uninterrupted.edit(REQS)
    model, _ = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", **kw)
    ed.edit(REQS[:2])
    ed.close()
    lines = [json.loads(x) for x in (tmp_path / "j" / "edits.jsonl").read_text().splitlines()]
    assert all(line["factors_sha256"] for line in lines)
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(fresh, tok, journal=tmp_path / "j", **kw)
    resumed.edit(REQS[2:])
    assert all(torch.equal(x, y) for x, y in zip(weights(fresh), weights(whole)))
    for layer in range(3 - spread, 3):
        assert torch.equal(resumed.solver(layer).inverse, uninterrupted.solver(layer).inverse)
        assert resumed.solver(layer).base.inverse.dtype == (torch.float32 if fp32_base else torch.float64)
        assert ("kept in fp32" in resumed.stats_source(layer)) == fp32_base


def test_memory_needs_the_keys_of_the_journal(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", memory_beta=1.0)
    ed.edit(REQS[:1])
    ed.close()
    # a journal written before keys were kept: drop the key from the factor file and the digest
    from safetensors.torch import load_file, save_file

    from fastrome.journal import factor_digest

    path = tmp_path / "j" / "factors" / "000000.safetensors"
    t = load_file(path)
    save_file({"u": t["u"], "lam": t["lam"]}, str(path))
    line = json.loads((tmp_path / "j" / "edits.jsonl").read_text())
    line["factors_sha256"] = factor_digest(t["u"], t["lam"])
    (tmp_path / "j" / "edits.jsonl").write_text(json.dumps(line) + "\n")
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(fresh, tok, journal=tmp_path / "j", memory_beta=1.0)
    with pytest.raises(ValueError, match="config.memory_beta: edit 0 in the journal has no key"):
        resumed.edit(REQS[1:2])
    assert all(torch.equal(x, y) for x, y in zip(weights(fresh), weights(model)))


def test_a_resumed_run_must_keep_its_settings(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", memory_beta=3.0, mpes_checks=2)
    (rec,) = ed.edit(REQS[:1]).records
    assert rec.settings["memory_beta"] == 3.0 and rec.settings["mpes_checks"] == 2
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    before = weights(fresh)
    with pytest.raises(ValueError, match=r"memory_beta=3\.0 \(this editor: 0\.0\)"):
        editor(fresh, tok, journal=tmp_path / "j", mpes_checks=2)
    assert all(torch.equal(x, y) for x, y in zip(weights(fresh), before))
    with editor(fresh, tok, journal=tmp_path / "j", memory_beta=3.0, mpes_checks=2) as resumed:
        assert resumed.done_case_ids() == [1]
