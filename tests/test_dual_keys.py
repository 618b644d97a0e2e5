"""The dual mode: one rank-one write exact at both the prefixed mean key k̄ and the unprefixed key
k_u (u = A⁻¹K(KᵀA⁻¹K)⁻¹1, Λ = v* − (Wk_u + b)), with the least uᵀAu of all such u; its two keys in
the journal and in the edit memory."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastrome import EditConfig, Editor
from fastrome.adapter import ModelAdapter
from fastrome.memory import EditMemory
from fastrome.solver import CovarianceSolver
from fastrome.update import _two_key_left_vector, plan

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess", "case_id": 3},
]
FAST = dict(v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, layer=1, spread=1)


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1] + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("d", [2, 17, 64])
def test_the_left_vector_meets_both_keys_with_the_least_energy(d):
    C = spd(d, d)
    solver = CovarianceSolver(C, ridge=1e-3)
    A = C + 1e-3 * torch.eye(d, dtype=torch.float64)
    g = torch.Generator().manual_seed(d)
    k_mean, k_plain = torch.randn(2, d, generator=g)
    u, quad = _two_key_left_vector(solver, k_mean, k_plain)
    K = torch.stack([k_mean, k_plain]).double()
    # the closed form in fp64
    A_inv_K = torch.linalg.solve(A, K.T)
    want = A_inv_K @ torch.linalg.solve(K @ A_inv_K, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(u, want, rtol=1e-6, atol=1e-8)  # the solve runs in the key's fp32
    torch.testing.assert_close(K @ u, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert quad == pytest.approx(float(u @ A @ u), rel=1e-6)
    if d > 2:  # any other u meeting both constraints costs more energy
        for seed in range(5):
            z = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            z -= K.T @ torch.linalg.solve(K @ K.T, K @ z)  # keep K z = 0
            assert float((u + 0.1 * z) @ A @ (u + 0.1 * z)) > quad


def test_coinciding_keys_give_the_one_key_solution():
    d = 9
    solver = CovarianceSolver(spd(d, 1))
    k = torch.randn(d, generator=torch.Generator().manual_seed(3))
    u, quad = _two_key_left_vector(solver, k, k.clone())
    one, denom = solver.solve(k)
    torch.testing.assert_close(u, one.double() / float(denom), rtol=1e-6, atol=1e-9)
    assert quad == pytest.approx(1.0 / float(denom))


def test_the_plan_writes_v_star_at_the_unprefixed_key_and_the_same_change_at_the_mean():
    d_in, d_out = 23, 11
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g)
    k_mean, k_plain = torch.randn(2, d_in, generator=g)
    v_star = torch.randn(d_out, generator=g)
    p = plan("dual", CovarianceSolver(spd(d_in, 2)), W, b, k_mean, k_plain, v_star)
    W2 = W.double() + torch.outer(p.lam.double(), p.u.double())
    torch.testing.assert_close(W2 @ k_plain.double() + b.double(), v_star.double(), rtol=1e-5, atol=1e-5)
    moved = W2 @ k_mean.double() - W.double() @ k_mean.double()
    torch.testing.assert_close(moved, p.lam.double(), rtol=1e-5, atol=1e-5)
    assert p.solved_key.shape == (2, d_in) and p.denom == pytest.approx(1.0, abs=1e-6)


def editor(model, tok, **kw):
    adapter = ModelAdapter(model)
    stats = {layer: spd(adapter.d_in, layer).float() for layer in range(adapter.n_layers)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Editor(model, tok, stats=stats, **{**FAST, **kw})


def test_the_editor_keeps_both_keys_in_the_journal_and_the_memory(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, mode="dual", memory_beta=2.0, memory_refactor_every=2, memory_dual_keys="both",
                journal=tmp_path / "j")
    ed.edit(REQS)
    art = ed.last
    assert all(e.key.shape == (2, ed.adapter.d_in) for e in ed.journal)
    # the last write is exact at its unprefixed key: W'k_u + b = v*
    w = ed.adapter.weight(1).detach().double()
    torch.testing.assert_close((w @ art.k_plain.double()).float(), art.v_star.float(), rtol=1e-4, atol=1e-4)
    mem = ed.solver(1)
    assert isinstance(mem, EditMemory) and len(mem.keys) == 6
    rows = [row for e in ed.journal for row in e.key]
    fresh = EditMemory(mem.base, 2.0, 2)
    for row in rows:
        fresh.add(row)
    assert torch.equal(mem.inverse, fresh.inverse)
    # undo takes both keys of the edit out; a resumed editor rebuilds the same memory
    ed.undo(ed.journal.entries[1].edit_id)
    assert len(mem.keys) == 4
    before = [x.clone() for x in (ed.adapter.weight(1).detach(), mem.inverse)]
    ed.close()
    fresh_model, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(fresh_model, tok, mode="dual", memory_beta=2.0, memory_refactor_every=2, memory_dual_keys="both",
                     journal=tmp_path / "j")
    assert torch.equal(resumed.adapter.weight(1).detach(), before[0])
    assert torch.equal(resumed.solver(1).inverse, before[1])


def test_the_memory_can_keep_only_the_prompt_key_of_a_dual_edit(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    kw = dict(mode="dual", memory_beta=2.0, memory_refactor_every=2, memory_dual_keys="prompt")
    ed = editor(model, tok, journal=tmp_path / "j", **kw)
    ed.edit(REQS)
    # the journal still holds both keys (the edit is exact at both); the memory only k_u, one per edit
    assert all(e.key.shape == (2, ed.adapter.d_in) for e in ed.journal)
    mem = ed.solver(1)
    assert len(mem.keys) == 3
    assert all(torch.equal(kept, e.key[1]) for kept, e in zip(mem.keys, ed.journal))
    fresh = EditMemory(mem.base, 2.0, 2)
    for e in ed.journal:
        fresh.add(e.key[1])
    assert torch.equal(mem.inverse, fresh.inverse)
    ed.undo(ed.journal.entries[1].edit_id)
    assert [k.tolist() for k in mem.keys] == [e.key[1].tolist() for e in ed.journal]
    before = mem.inverse.clone()
    ed.close()
    fresh_model, _ = make_tiny("llama-bytelevel", layers=3)
    with pytest.raises(ValueError, match="memory_dual_keys='prompt'"):  # resumed with both keys: refused
        editor(fresh_model, tok, journal=tmp_path / "j", **{**kw, "memory_dual_keys": "both"})
    resumed = editor(fresh_model, tok, journal=tmp_path / "j", **kw)
    assert torch.equal(resumed.solver(1).inverse, before)


def test_memory_dual_keys_is_checked():
    with pytest.raises(ValueError, match="memory_dual_keys"):
        EditConfig(memory_dual_keys="mean").validate()


@pytest.mark.parametrize("keys,held", [("both", 2), (None, 1)], ids=["both", "default"])
def test_a_dual_spread_edit_journals_both_keys_and_each_memory_keeps_the_chosen_ones(make_tiny, tmp_path, keys, held):
    # the journal holds both keys of every part; each layer's memory holds both, or by default k_u only
    model, tok = make_tiny("llama-bytelevel", layers=3)
    chosen = {} if keys is None else {"memory_dual_keys": keys}
    ed = editor(model, tok, mode="dual", spread=2, layer=2, memory_beta=2.0, journal=tmp_path / "j", **chosen)
    (rec,) = ed.edit(REQS[0]).records
    assert rec.status == "applied" and [p["layer"] for p in rec.parts] == [1, 2]
    assert [e.layer for e in ed.journal] == [1, 2]
    assert all(e.key.shape == (2, ed.adapter.d_in) for e in ed.journal)
    for entry in ed.journal:  # each part is exact at both keys of its layer: uᵀk̄ = uᵀk_u = 1
        torch.testing.assert_close(entry.key.double() @ entry.u.double(), torch.ones(2, dtype=torch.float64),
                                   rtol=0, atol=1e-4)
        kept = ed.solver(entry.layer).keys
        assert len(kept) == held and all(torch.equal(k, row) for k, row in zip(kept, entry.key[-held:]))
    ed.undo(rec.edit_id)
    assert all(len(ed.solver(layer).keys) == 0 for layer in (1, 2))


def test_a_journal_from_before_a_setting_existed_counts_with_that_settings_first_default(make_tiny, tmp_path):
    import json

    from fastrome.config import FIRST_DEFAULTS, settings_made_with

    model, tok = make_tiny("llama-bytelevel", layers=3)
    kw = dict(mode="dual", memory_beta=2.0, memory_dual_keys="both", v_optimizer="adam", mpes_shrink=False)
    ed = editor(model, tok, journal=tmp_path / "j", **kw)
    ed.edit(REQS[:1])
    ed.close()
    lines = tmp_path / "j" / "edits.jsonl"  # as written before these three settings existed
    heads = [json.loads(line) for line in lines.read_text().splitlines()]
    for head in heads:
        for name in FIRST_DEFAULTS:
            del head["record"]["settings"][name]
    lines.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in heads))
    assert settings_made_with(heads[0]["record"]["settings"])["v_optimizer"] == "adam"
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    with pytest.raises(ValueError, match="v_optimizer='adam'"):  # made with Adam, whatever today's default
        editor(fresh, tok, journal=tmp_path / "j", **{**kw, "v_optimizer": "normalized"})
    resumed = editor(fresh, tok, journal=tmp_path / "j", **kw)
    assert resumed.done_case_ids() == [1]


@pytest.mark.parametrize("kw", [dict(mode="consistent", memory_beta=2.0), dict(mode="dual", memory_beta=0.0)])
def test_which_keys_a_memory_keeps_does_not_stop_a_resume_where_it_cannot_act(make_tiny, tmp_path, kw):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", memory_dual_keys="both", **kw)
    ed.edit(REQS[:1])
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = editor(fresh, tok, journal=tmp_path / "j", memory_dual_keys="prompt", **kw)
    assert resumed.done_case_ids() == [1]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_which_keys_a_dual_memory_keeps_must_match_to_resume(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j", mode="dual", memory_beta=2.0, memory_dual_keys="both")
    ed.edit(REQS[:1])
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    with pytest.raises(ValueError, match="memory_dual_keys='both' \\(this editor: 'prompt'\\)"):
        editor(fresh, tok, journal=tmp_path / "j", mode="dual", memory_beta=2.0, memory_dual_keys="prompt")
