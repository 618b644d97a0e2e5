"""Faults lose nothing: one writer per run, journal factors checked before they are replayed, the
factor file durable before the line that names it, the run log reconciled with the journal after a
crash, a bad request refused before anything is written, statistics files read against the
unedited model, and non-finite input refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastrome import EditConfig, Editor, Journal, RequestError
from fastrome import editor as editor_module
from fastrome import sequential as sequential_module
from fastrome import values as values_module
from fastrome.adapter import ModelAdapter
from fastrome.journal import factor_digest
from fastrome.locking import FolderBusy
from fastrome.sequential import CollapseRules, open_run, run_sequential
from fastrome.stats import compute

FAST = dict(v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, spread=1)
REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome", "case_id": 1},
    {"prompt": "{} was painted by", "subject": "The Mona Lisa", "target_new": "Pablo Picasso", "case_id": 2},
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess", "case_id": 3},
]
PPL = ["The city is large and old.", "Music was played in the hall all night."]


def editor(model, tok, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity statistics warn, on purpose
        return Editor(model, tok, **{"stats": "identity", "layer": 1, **FAST, **kw})


def run(ed, reqs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ed.edit(reqs, **kw)


def weights(model):
    adapter = ModelAdapter(model)
    return [adapter.weight(layer).detach().clone() for layer in range(adapter.n_layers)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def cf(case_id, subject, prompt, new, true):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject,
                                                      "target_new": {"str": new}, "target_true": {"str": true}}}


RECORDS = [
    cf(1, "The Eiffel Tower", "{} is located in", "Rome", "Paris"),
    cf(2, "The Mona Lisa", "{} was painted by", "Picasso", "Leonardo"),
    cf(3, "LeBron James", "{} plays the sport of", "chess", "basketball"),
]
RULES = CollapseRules(sentinel_ppl_ratio=1e9, sentinel_jump=1e9, action="record")


def sequential(model, tok, out, records=RECORDS, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = open_run(model, tok, out, stats="identity", layer=1, **FAST)
        summary = run_sequential(ed, records, out, every=100, ppl_texts=PPL, retention_sample=4, rules=RULES, **kw)
    return ed, summary


def log_lines(out):
    return [json.loads(x) for x in (out / "edits.jsonl").read_text().splitlines()]


# -- one writer ----------------------------------------------------------------------------------
def test_a_second_writer_of_a_journal_is_refused_by_name(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    first = editor(model, tok, journal=tmp_path / "j")
    run(first, REQS[:1])
    other, _ = make_tiny("llama-bytelevel", layers=3)
    before = weights(other)
    with pytest.raises(FolderBusy, match=r"journal '.*/j' is in use by another writer \(process \d+, this one\)"):
        editor(other, tok, journal=tmp_path / "j")
    assert same(weights(other), before)  # refused before the replay
    # a reader does not need the lock, and the folder is free again once the writer closes
    assert len(Journal.read(tmp_path / "j")) == 1
    first.close()
    with editor(other, tok, journal=tmp_path / "j") as second:
        assert second.done_case_ids() == [1]
        assert same(weights(other), weights(model))
    with pytest.raises(ValueError, match="read-only"):
        run(second, REQS[1:2])  # a closed editor records nothing, and so writes nothing


def test_a_second_process_cannot_write_a_run_directory(make_tiny, tmp_path):
    """Two runs into one folder used to leave every edit id twice in the journal; now the second
    process is refused, naming the folder and the process that holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from fastrome.journal import Journal
            j = Journal({str(tmp_path / "run" / "journal")!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        model, tok = make_tiny("llama-bytelevel", layers=3)
        with pytest.raises(FolderBusy, match=rf"run/journal' is in use by another writer \(process {holder.pid}\)"):
            sequential(model, tok, tmp_path / "run")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (tmp_path / "run" / "edits.jsonl").exists()


def test_run_sequential_holds_its_run_directory(make_tiny, tmp_path, monkeypatch):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    seen = {}
    real = run_sequential.__globals__["_run"]

    def probe(editor_, records, out, *args):
        with pytest.raises(FolderBusy, match="run directory"):
            run_sequential(editor_, records, out)
        seen["checked"] = True
        return real(editor_, records, out, *args)

    monkeypatch.setitem(run_sequential.__globals__, "_run", probe)
    ed, summary = sequential(model, tok, tmp_path / "run", records=RECORDS[:1])
    assert seen["checked"] and summary.applied == 1


# -- factors checked before anything is written -------------------------------------------------
def _flip_two_bytes(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside lam, the last tensor: the file still parses, one value changes
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


def _journal_of_two_edits(make_tiny, folder):
    """Two edits recorded in the journal ``folder``, its writer closed; returns the tokenizer."""
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=folder)
    run(ed, REQS[:2])
    ed.close()
    return tok


def _resume_is_refused(make_tiny, tok, folder, match):
    """Resuming ``folder`` onto a fresh base model raises ``match`` and writes nothing."""
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    before = weights(fresh)
    with pytest.raises(ValueError, match=match):
        editor(fresh, tok, journal=folder)
    assert same(weights(fresh), before)


def test_a_damaged_factor_file_is_refused_by_name_before_the_replay(make_tiny, tmp_path):
    tok = _journal_of_two_edits(make_tiny, tmp_path / "j")
    _flip_two_bytes(tmp_path / "j" / "factors" / "000001.safetensors")
    _resume_is_refused(make_tiny, tok, tmp_path / "j",
                       r"000001\.safetensors: edit 1's factors do not match their recorded sha256")


def test_a_non_finite_factor_in_the_journal_is_refused_before_any_write(make_tiny, tmp_path):
    tok = _journal_of_two_edits(make_tiny, tmp_path / "j")
    # NaN written with a matching digest line: the finiteness check itself must catch it
    path = tmp_path / "j" / "factors" / "000001.safetensors"
    with safe_open(str(path), framework="pt") as f:
        u, lam = f.get_tensor("u"), f.get_tensor("lam")
    lam[3] = float("nan")
    save_file({"u": u, "lam": lam}, str(path))
    lines = (tmp_path / "j" / "edits.jsonl").read_text().splitlines()
    head = json.loads(lines[1])
    head["factors_sha256"] = factor_digest(u, lam)
    (tmp_path / "j" / "edits.jsonl").write_text(lines[0] + "\n" + json.dumps(head) + "\n")
    _resume_is_refused(make_tiny, tok, tmp_path / "j", r"000001\.safetensors: edit 1's factors are not finite")


def test_from_pretrained_verifies_every_factor_before_the_first_write(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok)
    run(ed, REQS)
    path = ed.save_pretrained(tmp_path / "edits")
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    with safe_open(str(path / "edits.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["2.lam"][0] = float("nan")  # the last edit: the first two would be written before it
    save_file(tensors, str(damaged / "edits.safetensors"), metadata=meta)
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    before = weights(fresh)
    with pytest.raises(ValueError, match=r"damaged.edits\.safetensors.*edit 2's factors") as err:
        replay(fresh, tok, damaged)
    assert "journal" not in str(err.value)
    assert same(weights(fresh), before)
    replay(fresh, tok, path)  # the intact folder still loads
    assert same(weights(fresh), weights(model))


def replay(model, tok, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity statistics warn, on purpose
        return Editor.from_pretrained(model, tok, path, stats="identity", cache_dir=False)


# -- durability order ----------------------------------------------------------------------------
def test_the_factor_file_is_durable_before_the_line_that_names_it(make_tiny, tmp_path, monkeypatch):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok, journal=tmp_path / "j")
    run(ed, REQS[:1])  # the journal's folder and files exist: the second edit is the steady state
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(str(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run(ed, REQS[1:2])
    names = [e for e in events if e[0] == "replace" and e[1] == "000001.safetensors"]
    assert names, events
    at_replace = events.index(names[0])
    line = events.index(("fsync", "edits.jsonl"))
    # data fsynced under its temporary name, renamed, the folder fsynced, and only then the line
    assert any(kind == "fsync" and name.startswith(".000001.safetensors.") for kind, name in events[:at_replace])
    assert ("fsync", "factors") in events[at_replace:line]
    assert at_replace < line


# -- the run log reconciled with the journal -----------------------------------------------------
def test_a_torn_last_journal_line_is_redone_not_a_blocked_resume(make_tiny, tmp_path, caplog):
    whole, tok = make_tiny("llama-bytelevel", layers=3)
    sequential(whole, tok, tmp_path / "whole")[0].close()
    model, _ = make_tiny("llama-bytelevel", layers=3)
    ed, _ = sequential(model, tok, tmp_path / "run", records=RECORDS[:2])
    ed.close()
    jlines = tmp_path / "run" / "journal" / "edits.jsonl"
    text = jlines.read_text()
    jlines.write_text(text[: len(text) - 40])  # the last journal line cut short; the run log kept its line
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    with caplog.at_level("WARNING", logger="fastrome"):
        ed, summary = sequential(fresh, tok, tmp_path / "run")
    assert "dropping the unfinished last line" in caplog.text and "lost the last edits of cases [2]" in caplog.text
    log = log_lines(tmp_path / "run")
    assert [e["case_id"] for e in log] == [1, 2, 3] and all(e["status"] == "applied" for e in log)
    assert ed.done_case_ids() == [1, 2, 3]
    assert same(weights(fresh), weights(whole))


def test_a_kill_between_journal_and_run_log_keeps_the_edit_and_checks_it(make_tiny, tmp_path):
    whole, tok = make_tiny("llama-bytelevel", layers=3)
    sequential(whole, tok, tmp_path / "whole")[0].close()
    model, _ = make_tiny("llama-bytelevel", layers=3)
    ed, _ = sequential(model, tok, tmp_path / "run", records=RECORDS[:2])
    ed.close()
    log = (tmp_path / "run" / "edits.jsonl").read_text().splitlines()
    (tmp_path / "run" / "edits.jsonl").write_text(log[0] + "\n")  # case 2's line never written
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    ed, summary = sequential(fresh, tok, tmp_path / "run")
    log = log_lines(tmp_path / "run")
    assert [e["case_id"] for e in log] == [1, 2, 3]
    assert [e["edit_id"] for e in log] == [0, 1, 2]  # case 2 kept its edit, not edited again
    recovered = log[1]
    assert recovered["status"] == "applied" and recovered["collapse"] == [] and recovered["sentinel_ppl"] > 1
    assert recovered["update_ratio"] == pytest.approx(log_lines(tmp_path / "whole")[1]["update_ratio"])
    assert summary.applied == 2  # case 2 (checked now) and case 3
    assert same(weights(fresh), weights(whole))


def test_a_recovered_edit_goes_through_the_collapse_rules(make_tiny, tmp_path, monkeypatch):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed, _ = sequential(model, tok, tmp_path / "run", records=RECORDS[:2])
    ed.close()
    log = (tmp_path / "run" / "edits.jsonl").read_text().splitlines()
    (tmp_path / "run" / "edits.jsonl").write_text(log[0] + "\n")
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = open_run(fresh, tok, tmp_path / "run", stats="identity", layer=1, **FAST)
        # the edit, checked now, sends the sentinel perplexity far above its value before the edit
        # (read from case 1's log line): it is undone, as it would have been without the crash
        monkeypatch.setattr(sequential_module, "mean_perplexity", lambda *a, **k: 1e6)
        strict = CollapseRules(sentinel_ppl_ratio=1e9, action="undo")
        run_sequential(ed, RECORDS[:2], tmp_path / "run", every=100, ppl_texts=PPL, rules=strict)
    entry = log_lines(tmp_path / "run")[1]
    assert entry["case_id"] == 2 and entry["status"] == "undone" and "jump" in entry["collapse"][0]
    assert ed.done_case_ids() == [1]


# -- nothing written before a request is known to be editable ------------------------------------
def _fails_under_templates(monkeypatch, subject):
    """Requests about ``subject`` tokenise bare but not under the context templates (as when a
    template prefix changes how the subject's first token merges)."""
    for module in (editor_module, values_module):
        real = module.edit_prompts

        def patched(tok, templates, req, real=real):
            if req.subject == subject and len(templates) > 1:
                raise ValueError(f"subject {subject!r} not found under a context template")
            return real(tok, templates, req)

        monkeypatch.setattr(module, "edit_prompts", patched)


def test_a_request_that_fails_late_in_a_call_leaves_the_model_untouched(make_tiny, monkeypatch):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = editor(model, tok)
    _fails_under_templates(monkeypatch, "The Mona Lisa")
    before = weights(model)
    # two layers, so two chunks: the first used to be written before the second failed
    reqs = [REQS[0], {**REQS[1], "layer": 2}]
    with pytest.raises(RequestError, match=r"requests\[1\]: subject 'The Mona Lisa' not found"):
        run(ed, reqs)
    assert same(weights(model), before) and len(ed.journal) == 0


def test_the_sequential_retry_never_applies_an_edit_twice(make_tiny, tmp_path, monkeypatch):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    _fails_under_templates(monkeypatch, "The Mona Lisa")
    records = [RECORDS[0], {**RECORDS[1], "requested_rewrite": {**RECORDS[1]["requested_rewrite"], "layer": 2}}]
    ed, summary = sequential(model, tok, tmp_path / "run", records=records, batch_size=2)
    assert [e.request.get("case_id") for e in ed.journal] == [1]
    assert summary.applied == 1 and summary.skipped == 1
    assert {e["case_id"]: e["status"] for e in log_lines(tmp_path / "run")} == {1: "applied", 2: "skipped"}


# -- statistics files read against the unedited model --------------------------------------------
def test_a_resumed_spread_run_accepts_its_statistics_files(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{i}: Rome is the capital of Italy. The Nile flows north." * (1 + i % 3)
                                  for i in range(30)), encoding="utf-8")
    moments = compute(ModelAdapter(model), tok, [1, 2], corpus=str(corpus), tokens=500, max_len=48, progress=False)
    files = {layer: str(sm.save(tmp_path / f"stats{layer}.safetensors")) for layer, sm in moments.items()}
    kw = {**FAST, "stats": files, "layer": 2, "spread": 2}
    ed = Editor(model, tok, journal=tmp_path / "j", **kw)
    run(ed, REQS[:1])
    ed.close()
    fresh, _ = make_tiny("llama-bytelevel", layers=3)
    resumed = Editor(fresh, tok, journal=tmp_path / "j", **kw)
    run(resumed, REQS[1:2])  # layer 2's keys depend on layer 1, which the replay has written
    assert resumed.done_case_ids() == [1, 2]


# -- non-finite and mistyped input, refused before any work ---------------------------------------
@pytest.mark.parametrize("field, value", [
    ("v_weight_decay", float("nan")), ("kl_factor", float("inf")), ("ridge", float("inf")),
    ("ridge", float("nan")), ("v_lr", float("nan")), ("early_stop_loss", float("inf")),
    ("v_steps", True), ("spread", True), ("template_seed", "x"), ("template_seed", 1.5),
    ("max_update_ratio", float("nan")), ("stats_batch_tokens", 0), ("template_lengths", ((True, 2),)),
])
def test_config_refuses_non_finite_and_mistyped_values_by_name(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field}: expected .*got {value!r}".replace("(", r"\(")
                       .replace(")", r"\)")):
        EditConfig(**{field: value}).validate()


def test_config_still_takes_unbounded_caps():
    cfg = EditConfig(max_update_ratio=float("inf"), max_total_update_ratio=float("inf")).validate()
    assert cfg.max_update_ratio == float("inf")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_weight_in_the_edited_layer_is_refused_before_any_work(make_tiny, monkeypatch, poison):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    with torch.no_grad():
        ModelAdapter(model).weight(1)[2, 5] = poison
    before = weights(model)
    ed = editor(model, tok)

    def no_sampling(*args, **kwargs):
        raise AssertionError("template sampling started")

    monkeypatch.setattr(editor_module, "load_or_generate", no_sampling)
    with pytest.raises(ValueError, match=r"model: model\.layers\.1\.mlp\.down_proj\.weight holds 1 non-finite"):
        run(ed, REQS[:1])
    assert all(torch.equal(x, y) or (torch.isnan(x) == torch.isnan(y)).all() for x, y in zip(weights(model), before))


def test_waiting_for_a_lock_this_process_holds_raises_instead_of_hanging(tmp_path):
    from fastrome.locking import FolderLock

    held = FolderLock(tmp_path, "statistics cache")
    with pytest.raises(FolderBusy, match=r"statistics cache .* \(process \d+, this one\)"):
        FolderLock(tmp_path, "statistics cache", wait=True)
    held.release()
    FolderLock(tmp_path, "statistics cache", wait=True).release()
