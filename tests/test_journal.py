"""The journal: undo (bit-exact for the last edits), the saved edits replayed onto a fresh base
model, the merged model written out, and resuming an interrupted run from an on-disk journal."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from kernel_checks import same_bits

from fastrome import Editor
from fastrome.adapter import ModelAdapter
from fastrome.journal import Journal, apply_factors
from fastrome.models import load_model

FAST = dict(v_steps=4, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, stats="identity",
            layer=1, spread=1)  # one-layer edits (spread edits' journaling: test_spread.py)
REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess", "case_id": 3},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "Berlin", "case_id": 4},
]


def editor(model, tok, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity statistics warn, on purpose
        return Editor(model, tok, **{**FAST, **kw})


def run(ed, reqs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ed.edit(reqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_undo_last_is_bit_exact_and_undo_in_the_middle_replays_the_rest(make_tiny, dtype):
    model, tok = make_tiny("llama-bytelevel", dtype=dtype)
    ed = editor(model, tok)
    w = ed.adapter.weight(1)
    states = [w.detach().clone()]
    for req in REQS[:3]:
        rep = run(ed, req)
        assert rep.records[0].applied and rep.records[0].edit_id == len(states) - 1
        states.append(w.detach().clone())
    assert [e.edit_id for e in ed.journal] == [0, 1, 2]
    assert not same_bits(states[3], states[0])

    ed.undo_last(1)
    assert same_bits(w, states[2])
    assert [e.edit_id for e in ed.journal] == [0, 1] and ed.history[2].status == "undone"
    # the next edit gets a fresh id; undoing edit 0 (in the middle) replays 1 and 3 onto the base
    run(ed, REQS[3])
    assert [e.edit_id for e in ed.journal] == [0, 1, 3]
    ed.undo(0)
    expect = states[0].clone()
    master = None if dtype == torch.float32 else expect.float()
    with torch.no_grad():
        for e in ed.journal:
            apply_factors(expect, e.u, e.lam, master)
    assert same_bits(w, expect)
    ed.undo_last(2)
    assert same_bits(w, states[0]) and len(ed.journal) == 0
    with pytest.raises(ValueError, match="not in the journal"):
        ed.undo(7)
    with pytest.raises(ValueError, match="n: expected"):
        ed.undo_last(1)


def test_undo_in_the_middle_equals_subtracting_its_factors(make_tiny):
    model, tok = make_tiny("gpt2-bytelevel")
    ed = editor(model, tok)
    run(ed, REQS[:3])
    w = ed.adapter.weight(1)
    middle = ed.journal.entries[1]
    expect = w.detach().double() - torch.outer(middle.lam.double(), middle.u.double())
    ed.undo(middle.edit_id)
    torch.testing.assert_close(w.detach().double(), expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_edits_reproduce_the_edited_model_on_a_fresh_base(make_tiny, tmp_path, dtype):
    model, tok = make_tiny("llama-sentencepiece", dtype=dtype)
    ed = editor(model, tok)
    run(ed, REQS[:3])
    path = ed.save_pretrained(tmp_path / "edits")
    assert (path / "edits.safetensors").stat().st_size < 64 * 1024 * 3  # kilobytes per edit, not a model copy
    fresh, _ = make_tiny("llama-sentencepiece", dtype=dtype)
    entries = replay(fresh, tok, path).journal.entries
    assert [e.edit_id for e in entries] == [0, 1, 2] and entries[0].request["subject"] == "The Eiffel Tower"
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert same_bits(a, b), name
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    # applied twice, or onto another model: refused before anything is written
    before = ModelAdapter(fresh).weight(1).detach().clone()
    with pytest.raises(ValueError, match="not the base weight"):
        replay(fresh, tok, path)
    assert same_bits(ModelAdapter(fresh).weight(1), before)
    other, _ = make_tiny("llama-sentencepiece", dtype=dtype, seed=9)
    with pytest.raises(ValueError, match="not the base weight"):
        replay(other, tok, path)
    (path / "edits.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="edits.safetensors"):
        replay(other, tok, path)


def replay(model, tok, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity statistics warn, on purpose
        return Editor.from_pretrained(model, tok, path, stats="identity", cache_dir=False)


def test_save_merged_writes_a_loadable_edited_model_with_its_edits_beside(make_tiny, tmp_path):
    model, tok = make_tiny("llama-sentencepiece")
    ed = editor(model, tok)
    run(ed, REQS[:2])
    out = ed.save_merged(tmp_path / "edited")
    loaded, tok2 = load_model(out)
    ids = tok("The Mona Lisa was painted by", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # the edits beside it name the base they apply to: the merged model is not that base
    fresh, _ = make_tiny("llama-sentencepiece")
    replayed = replay(fresh, tok, out / "fastrome_edits")
    assert len(replayed.journal) == 2 and all(same_bits(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    with pytest.raises(ValueError, match="not the base weight"):
        replay(loaded, tok2, out / "fastrome_edits")


def test_interrupted_run_resumes_from_its_journal_with_nothing_lost_or_repeated(make_tiny, tmp_path):
    folder = tmp_path / "journal"
    # the uninterrupted run
    whole, tok = make_tiny("llama-bytelevel")
    run(editor(whole, tok), REQS)
    # the interrupted one: two edits, then the process "dies" (editor and model dropped)
    model, _ = make_tiny("llama-bytelevel")
    run(editor(model, tok, journal=folder), REQS[:2])
    del model
    lines = (folder / "edits.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["request"]["subject"] == "The Mona Lisa"
    # a fresh base model picks up the journal, replays it, and continues with what is not done
    fresh, _ = make_tiny("llama-bytelevel")
    ed = editor(fresh, tok, journal=folder)
    assert ed.done_case_ids() == [1, 2]
    todo = [r for r in REQS if r["case_id"] not in set(ed.done_case_ids())]
    run(ed, todo)
    assert [e.edit_id for e in ed.journal] == [0, 1, 2, 3]
    assert same_bits(ModelAdapter(fresh).weight(1), ModelAdapter(whole).weight(1))
    assert len(Journal.read(folder)) == 4
    # resuming onto a model that is not the base is refused
    ed.close()
    edited_again, _ = make_tiny("llama-bytelevel", seed=3)
    with pytest.raises(ValueError, match="not the base weight"):
        editor(edited_again, tok, journal=folder)


def test_journal_drops_an_unfinished_last_line_and_rejects_damage(make_tiny, tmp_path, caplog):
    folder = tmp_path / "j"
    model, tok = make_tiny("llama-bytelevel")
    run(editor(model, tok, journal=folder), REQS[:2])
    with open(folder / "edits.jsonl", "a", encoding="utf-8") as f:
        f.write('{"edit_id": 2, "layer": 1, "requ')  # a crash in the middle of the append
    with caplog.at_level("WARNING", logger="fastrome"):
        j = Journal(folder)
    assert "dropping the unfinished last line" in caplog.text
    assert len(j) == 2 and (folder / "edits.jsonl").read_text().count("\n") == 2
    j.close()
    (folder / "factors" / "000001.safetensors").unlink()
    with pytest.raises(ValueError, match="edit 1's factors"):
        Journal(folder)


def test_ids_of_removed_edits_are_not_handed_out_again_after_a_reload(tmp_path):
    from fastrome.journal import JournalEntry

    def entry(i):
        return JournalEntry(i, 1, torch.ones(3) * i, torch.ones(2), {"case_id": i}, {})

    j = Journal(tmp_path / "j")
    for i in range(3):
        j.append(entry(i))
    assert j.next_id == 3
    j.close()
    # journal.json was last written before these appends: the loaded lines alone say what is taken
    j = Journal(tmp_path / "j")
    assert j.next_id == 3
    j.remove([2])
    assert j.next_id == 3
    j.close()
    assert Journal.read(tmp_path / "j").next_id == 3


@pytest.mark.parametrize("spread", [1, 2])
def test_edit_count_follows_edits_undo_and_reopen(make_tiny, tmp_path, spread):
    folder = tmp_path / "j"
    model, tok = make_tiny("llama-bytelevel")
    ed = editor(model, tok, journal=folder, spread=spread)
    assert ed.journal.edit_count == 0
    run(ed, REQS[:3])
    assert ed.journal.edit_count == len(ed.done_case_ids()) == 3 and len(ed.journal) == 3 * spread
    ed.undo_last()
    ed.undo(ed.journal.entries[-1].edit_id)  # a spread edit goes whole, named by any of its layers' ids
    assert ed.journal.edit_count == len(ed.done_case_ids()) == 1
    ed.close()
    assert Journal.read(folder).edit_count == 1
