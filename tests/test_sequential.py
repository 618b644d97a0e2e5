"""The sequential harness: bad records skipped and reported, periodic measurements, collapse
actions (undo, stop), and a killed run resumed from its journal with nothing applied twice."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastrome.adapter import ModelAdapter
from fastrome.sequential import CollapseRules, open_run, run_sequential, validate_record

KW = dict(v_steps=3, template_lengths=((3, 2),), max_update_ratio=float("inf"), cache_dir=False, stats="identity",
          layer=1, spread=1)  # one-layer edits: the run's bookkeeping (spread edits have their own tests)
PPL = ["The cat sat on the mat.", "Paris is the capital of France.", "Water boils at one hundred degrees."]


def cf(case_id, subject, prompt, new, true, loc="The Louvre is located in"):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject,
            "target_new": {"str": new}, "target_true": {"str": true}}, "locality_prompt": loc}


RECORDS = [
    cf(1, "The Eiffel Tower", "{} is located in", "Rome", "Paris"),
    cf(2, "The Mona Lisa", "{} was painted by", "Picasso", "Leonardo"),
    cf(3, "Rome", "{} is the capital of", "Italy", "Italy"),  # new == true: skipped
    {"case_id": 4, "requested_rewrite": {"prompt": "{} plays", "target_new": {"str": "chess"}}},  # no subject
    cf(5, "LeBron James", "{} plays the sport of", "chess", "basketball"),
    cf(6, "France", "The capital of {} is", "Berlin", "Paris"),
]


def editor_for(model, tok, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_run(model, tok, out, **KW)


def go(ed, out, records, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_sequential(ed, records, out, every=2, ppl_texts=PPL, retention_sample=10, **kw)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_validate_record():
    assert validate_record(RECORDS[0]) is None
    assert "equals target_true" in validate_record(RECORDS[2])
    assert "subject" in validate_record(RECORDS[3])


def test_run_reports_bad_records_and_measures_periodically(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path)
    summary = go(ed, tmp_path, RECORDS, rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))
    assert summary.applied == 4 and summary.skipped == 2 and summary.stopped is None
    log = lines(tmp_path / "edits.jsonl")
    assert [e["case_id"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert {e["case_id"]: e["status"] for e in log if e["status"] == "skipped"}.keys() == {3, 4}
    applied = [e for e in log if e["status"] == "applied"]
    assert all(e["denominator"] > 0 and e["update_ratio"] > 0 and e["steps"] >= 1 for e in applied)
    points = lines(tmp_path / "checkpoints.jsonl")
    assert [p["edits"] for p in points] == [0, 2, 4]
    assert all(p["ppl"] > 1 for p in points) and "retention" not in points[0]
    assert 0 <= points[-1]["retention"] <= 1 and points[-1]["retention_n"] == 4
    assert 0 <= points[-1]["specificity"] <= 1
    # how far layer 1 has moved, against the untouched weight of the same random model
    base = ModelAdapter(make_tiny("llama-bytelevel")[0]).weight(1).detach().double()
    moved = float((ModelAdapter(model).weight(1).detach().double() - base).norm() / base.norm())
    assert "weight_drift" not in points[0] and points[-1]["weight_drift_layers"] == {"1": points[-1]["weight_drift"]}
    assert points[-1]["weight_drift"] == pytest.approx(moved, rel=1e-9) and 0 < points[1]["weight_drift"]
    ed.undo_last(len(ed.done_case_ids()))
    assert ed.drift() == {1: 0.0}


@pytest.mark.parametrize("action", ["undo", "stop"])
def test_collapse_rules_act(make_tiny, tmp_path, action):
    model, tok = make_tiny("llama-bytelevel")
    base = ModelAdapter(model).weight(1).detach().clone()
    ed = editor_for(model, tok, tmp_path)
    # a rule no real edit passes: every edit moves the sentinel perplexity at least a little
    summary = go(ed, tmp_path, RECORDS, rules=CollapseRules(sentinel_ppl_ratio=1 + 1e-12, action=action))
    log = lines(tmp_path / "edits.jsonl")
    flagged = [e for e in log if e.get("collapse")]
    assert flagged and all("sentinel perplexity" in e["collapse"][0] for e in flagged)
    if action == "undo":
        # a random tiny model: some edits lower the sentinel perplexity; exactly the others are undone
        undone = {e["case_id"] for e in flagged}
        assert all(e["status"] == "undone" for e in flagged) and summary.undone == len(undone)
        kept = [e["case_id"] for e in log if e["status"] == "applied"]
        assert [e.request["case_id"] for e in ed.journal] == kept and not undone & set(kept)
        if not kept:
            assert torch.equal(ModelAdapter(model).weight(1), base)
    else:
        # the run ends at the first flagged edit, which stays applied and recorded
        assert summary.stopped and flagged == [log[-1]] and log[-1]["status"] == "applied"
        assert len(ed.journal) == sum(e["status"] == "applied" for e in log) and len(log) < len(RECORDS)


@pytest.mark.parametrize("action", ["undo", "record"])
def test_sentinel_jump_is_judged_against_the_model_just_before_the_edit(make_tiny, tmp_path, action):
    # Every rise flags the edit; the reference for the next edit is the sentinel of the model as it
    # then is: after a kept edit its own value, after an undone one the value before it, and after a
    # restart the replayed model's.
    rules = CollapseRules(sentinel_ppl_ratio=1e9, sentinel_jump=1 + 1e-12, interference_spike=1e9, action=action)
    model, tok = make_tiny("llama-bytelevel")
    go(editor_for(model, tok, tmp_path), tmp_path, RECORDS[:3], rules=rules)
    fresh, _ = make_tiny("llama-bytelevel")
    ed = editor_for(fresh, tok, tmp_path)
    go(ed, tmp_path, RECORDS, rules=rules)
    log = [e for e in lines(tmp_path / "edits.jsonl") if "sentinel_ppl" in e]
    reference = lines(tmp_path / "checkpoints.jsonl")[0]["sentinel_ppl_base"]
    seen = set()
    for e in log:
        jumped = e["sentinel_ppl"] > (1 + 1e-12) * reference
        jumps = [f for f in e["collapse"] if "jump" in f]
        assert bool(jumps) == jumped, (e["case_id"], e["sentinel_ppl"], reference)
        assert all(f.endswith(f"× {reference:.2f} before the edit") for f in jumps), (jumps, reference)
        assert e["status"] == ("undone" if jumped and action == "undo" else "applied")
        seen.add(jumped)
        if e["status"] == "applied":
            reference = e["sentinel_ppl"]
    assert seen == {True, False}  # these seeds exercise both branches
    assert [e.request["case_id"] for e in ed.journal] == [e["case_id"] for e in log if e["status"] == "applied"]


def test_interference_spike_undoes_the_edit_before_any_perplexity_moves(make_tiny, tmp_path):
    quiet = dict(sentinel_ppl_ratio=1e9, sentinel_jump=1e9, norm_spike=1e9)
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path / "run")
    plain_edit = ed.edit

    def edit_with_a_disabling_case(requests, **kw):
        report = plain_edit(requests, **kw)
        for rec in report.records:
            if rec.case_id == 5:  # as if its factors changed ordinary outputs a million times more
                rec.interference *= 1e6
        return report

    ed.edit = edit_with_a_disabling_case
    summary = go(ed, tmp_path / "run", RECORDS, rules=CollapseRules(min_history=2, action="undo", **quiet))
    log = {e["case_id"]: e for e in lines(tmp_path / "run" / "edits.jsonl")}
    assert log[5]["status"] == "undone" and "interference spike" in log[5]["collapse"][0]
    assert [log[c]["collapse"] for c in (1, 2, 6)] == [[], [], []] and summary.undone == 1
    assert [e.request["case_id"] for e in ed.journal] == [1, 2, 6]
    # the model is exactly the one that never saw case 5
    other, _ = make_tiny("llama-bytelevel")
    go(editor_for(other, tok, tmp_path / "ref"), tmp_path / "ref", [RECORDS[i] for i in (0, 1, 5)],
       rules=CollapseRules(action="record", **quiet))
    assert torch.equal(ModelAdapter(model).weight(1), ModelAdapter(other).weight(1))


def test_after_part_of_a_batch_is_undone_the_jump_reference_is_the_model_that_is_left(
    make_tiny, tmp_path, monkeypatch
):
    # Batches [1, 2], [5, 6], [7, 8]: case 6 trips the interference rule and is undone alone, so
    # the next batch's jump must be judged against the model holding 1, 2 and 5, neither the
    # model that still had 6 nor the one before the batch.
    import fastrome.sequential as seq

    records = [RECORDS[0], RECORDS[1], RECORDS[4], RECORDS[5],
               cf(7, "Mount Fuji", "{} is located in", "Peru", "Japan"),
               cf(8, "The Nile", "{} flows through", "Canada", "Egypt")]
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path / "run")
    plain_edit, plain_ppl = ed.edit, seq.mean_perplexity

    def edit_inflating_case_6(requests, **kw):
        report = plain_edit(requests, **kw)
        for rec in report.records:
            if rec.case_id == 6:
                rec.interference *= 1e6
        return report

    def ppl_rising_once_case_8_is_in(m, t, texts):
        value = plain_ppl(m, t, texts)
        return value * 10 if 8 in {e.request["case_id"] for e in ed.journal} else value

    ed.edit = edit_inflating_case_6
    monkeypatch.setattr(seq, "mean_perplexity", ppl_rising_once_case_8_is_in)
    rules = CollapseRules(sentinel_ppl_ratio=1e9, sentinel_jump=2.0, norm_spike=1e9, min_history=2, action="undo")
    go(ed, tmp_path / "run", records, rules=rules, batch_size=2)
    log = {e["case_id"]: e for e in lines(tmp_path / "run" / "edits.jsonl")}
    assert [log[c]["status"] for c in (1, 2, 5, 6, 7, 8)] == ["applied"] * 3 + ["undone"] * 3
    assert "interference spike" in log[6]["collapse"][0] and not log[5]["collapse"]
    jump = [f for f in log[8]["collapse"] if "jump" in f]
    assert len(jump) == 1

    monkeypatch.setattr(seq, "mean_perplexity", plain_ppl)
    left = plain_ppl(model, tok, PPL)  # the run ends where the partial undo left it: [7, 8] were undone
    with_6 = log[6]["sentinel_ppl"]  # what the batch [5, 6] measured before its partial undo
    assert f"{left:.2f}" != f"{with_6:.2f}" and f"{left:.2f}" != f"{log[2]['sentinel_ppl']:.2f}"
    assert jump[0].endswith(f"× {left:.2f} before the edit"), (jump, left)


@pytest.mark.parametrize("name", ["sentinel_jump", "interference_spike", "norm_spike", "sentinel_ppl_ratio"])
def test_rules_refuse_thresholds_that_flag_everything(name):
    with pytest.raises(ValueError, match=name):
        CollapseRules(**{name: 1.0})


def test_killed_run_resumes_with_nothing_applied_twice(make_tiny, tmp_path):
    whole, tok = make_tiny("llama-bytelevel")
    go(editor_for(whole, tok, tmp_path / "a"), tmp_path / "a", RECORDS,
       rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))
    out = tmp_path / "b"
    model, _ = make_tiny("llama-bytelevel")
    go(editor_for(model, tok, out), out, RECORDS[:3], rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))
    del model  # the process dies here
    fresh, _ = make_tiny("llama-bytelevel")
    ed = editor_for(fresh, tok, out)
    go(ed, out, RECORDS, rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))
    log = lines(out / "edits.jsonl")
    assert sorted(e["case_id"] for e in log) == [1, 2, 3, 4, 5, 6]  # each record exactly once
    assert [e.request["case_id"] for e in ed.journal] == [1, 2, 5, 6]
    assert torch.equal(ModelAdapter(fresh).weight(1), ModelAdapter(whole).weight(1))
    # the baselines are measured once, on the unedited model, and reused after the restart
    points = lines(out / "checkpoints.jsonl")
    assert [p["edits"] for p in points].count(0) == 1 and points[0]["locality_baseline"]
    first_a = lines(tmp_path / "a" / "checkpoints.jsonl")[0]
    assert points[0]["sentinel_ppl_base"] == first_a["sentinel_ppl_base"]
    assert [p["edits"] for p in points] == [0, 2, 4]


def test_batched_run_with_every_probe(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_sequential(
            ed, RECORDS, tmp_path, every=2, ppl_texts=PPL, wikitext_texts=PPL[::-1], retention_sample=10,
            fluency_prompts=["The city of", "My favourite"], batch_size=2, test_prefixes=["It rained.", "So"],
            rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"),
        )
    assert summary.applied == 4 and summary.skipped == 2
    log = lines(tmp_path / "edits.jsonl")
    assert sorted(e["case_id"] for e in log) == [1, 2, 3, 4, 5, 6]
    assert {e["batch"] for e in log if e["status"] == "applied"} == {2}
    points = lines(tmp_path / "checkpoints.jsonl")
    assert [p["edits"] for p in points] == [0, 2, 4]
    first, last = points[0], points[-1]
    assert first["entropy_norm"] == 1.0 and first["entropy_base"] == first["entropy"] > 0
    assert last["wikitext_ppl"] > 1 and last["entropy"] > 0
    assert last["entropy_norm"] == pytest.approx(last["entropy"] / first["entropy"])
    for name in ("retention", "retention_score", "retention_prefixed", "retention_score_prefixed"):
        assert 0 <= last[name] <= 1, name


def test_entropy_drop_stops_the_run(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run_sequential(
            ed, RECORDS, tmp_path, every=2, fluency_prompts=["The city of"], retention_sample=10,
            rules=CollapseRules(sentinel_ppl_ratio=1e9, sentinel_jump=1e9, interference_spike=1e9, entropy_drop=1e9,
                                action="stop"),
        )
    assert summary.stopped and "generation entropy" in summary.stopped
    points = lines(tmp_path / "checkpoints.jsonl")
    assert [p["edits"] for p in points] == [0, 2] and "generation entropy" in points[-1]["collapse"][0]
    assert len(ed.journal) == 2


def test_a_run_without_its_journal_is_refused(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    go(editor_for(model, tok, tmp_path), tmp_path, RECORDS[:2], rules=CollapseRules(sentinel_ppl_ratio=1e9,
                                                                                      action="record"))
    fresh, _ = make_tiny("llama-bytelevel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastrome import Editor

        no_journal = Editor(fresh, tok, **KW)  # journal kept in memory: the run's edits are not in it
    before = ModelAdapter(fresh).weight(1).detach().clone()
    with pytest.raises(ValueError, match="does not hold"):
        go(no_journal, tmp_path, RECORDS, rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))
    assert torch.equal(ModelAdapter(fresh).weight(1), before)


def test_efficacy_at_edit_time_and_paraphrase_retention_are_measured(make_tiny, tmp_path):
    from fastrome.metrics import score_targets

    model, tok = make_tiny("llama-bytelevel")
    records = [{**RECORDS[0], "rephrase_prompt": "Where is the Eiffel Tower? It is in"}, RECORDS[1],
               {**RECORDS[4], "paraphrase_prompts": ["LeBron James is good at the sport of", "unused"]}]
    ed = editor_for(model, tok, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_sequential(ed, records, tmp_path, every=3, ppl_texts=PPL, retention_sample=10,
                       rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))

    def scores(prompts, news, trues):
        new = score_targets(model, tok, prompts, news)
        true = score_targets(model, tok, prompts, trues)
        return [s.is_top for s in new], [s.mean_nll < t.mean_nll for s, t in zip(new, true)]

    log = lines(tmp_path / "edits.jsonl")
    assert all(isinstance(e["edit_top"], bool) and isinstance(e["edit_score"], bool) for e in log)
    # the last edit was scored on the model as it is now
    top, win = scores(["LeBron James plays the sport of"], [" chess"], [" basketball"])
    assert (log[-1]["edit_top"], log[-1]["edit_score"]) == (top[0], win[0])
    point = lines(tmp_path / "checkpoints.jsonl")[-1]
    top, win = scores(["Where is the Eiffel Tower? It is in", "LeBron James is good at the sport of"],
                      [" Rome", " chess"], [" Paris", " basketball"])
    assert point["retention_paraphrase"] == sum(top) / 2 and point["retention_score_paraphrase"] == sum(win) / 2


def test_a_checkpoint_cut_off_by_a_stop_is_measured_on_resume_and_torn_tails_are_dropped(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path)
    rules = CollapseRules(sentinel_ppl_ratio=1e9, action="record")
    go(ed, tmp_path, [RECORDS[0], RECORDS[1]], rules=rules)
    ed.close()
    ckpt, log = tmp_path / "checkpoints.jsonl", tmp_path / "edits.jsonl"
    points = ckpt.read_text().splitlines()
    assert [json.loads(p)["edits"] for p in points] == [0, 2]
    # killed while measuring the checkpoint after edit 2: its line half written, and a log line too
    ckpt.write_text(points[0] + "\n" + points[1][: len(points[1]) // 2])
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"case_id": 99, "sta')
    fresh, _ = make_tiny("llama-bytelevel")
    ed = editor_for(fresh, tok, tmp_path)
    go(ed, tmp_path, [RECORDS[0], RECORDS[1], RECORDS[4]], rules=rules)
    assert [p["edits"] for p in lines(ckpt)] == [0, 2]  # every line parses: the torn ones are gone
    assert [e["case_id"] for e in lines(log)] == [1, 2, 5]
    assert lines(ckpt)[1]["retention_n"] == 2  # measured on the two edits it was due after


def test_a_cut_off_checkpoint_is_measured_also_when_the_last_edit_lacks_its_log_line(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    ed = editor_for(model, tok, tmp_path)
    rules = CollapseRules(sentinel_ppl_ratio=1e9, action="record")
    records = [RECORDS[0], RECORDS[1], RECORDS[4]]
    go(ed, tmp_path, records, rules=rules)
    ed.close()
    ckpt, log = tmp_path / "checkpoints.jsonl", tmp_path / "edits.jsonl"
    # the checkpoint after edit 2 never written, and edit 3 in the journal but not in the run log
    ckpt.write_text(ckpt.read_text().splitlines()[0] + "\n")
    log.write_text("".join(x + "\n" for x in log.read_text().splitlines()[:2]))
    fresh, _ = make_tiny("llama-bytelevel")
    ed = editor_for(fresh, tok, tmp_path)
    go(ed, tmp_path, records, rules=rules)
    assert [e["case_id"] for e in lines(log)] == [1, 2, 5]
    assert [p["edits"] for p in lines(ckpt)] == [0, 3] and lines(ckpt)[1]["retention_n"] == 3


def test_a_forked_run_goes_on_from_the_sources_point_with_other_settings(make_tiny, tmp_path):
    from fastrome.sequential import fork_run

    rules = CollapseRules(sentinel_ppl_ratio=1e9, action="record")
    src, tok = make_tiny("llama-bytelevel")
    go(editor_for(src, tok, tmp_path / "src"), tmp_path / "src", RECORDS, rules=rules)
    # the first three records (two applied, one skipped) and the checkpoints up to two edits
    fork = fork_run(tmp_path / "src", tmp_path / "fork", 3)
    assert fork == {"from": str(tmp_path / "src"), "edits": 3, "applied": 2}
    out = tmp_path / "fork"
    assert [e["case_id"] for e in lines(out / "edits.jsonl")] == [1, 2, 3]
    assert [p["edits"] for p in lines(out / "checkpoints.jsonl")] == [0, 2]
    assert json.loads((out / "run.json").read_text())["forked"]["edits"] == 3

    # the fork's edits replay to the weights the source had after them
    again, _ = make_tiny("llama-bytelevel")
    first_two = editor_for(again, tok, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stats="identity", as every run of this file
        first_two.edit([RECORDS[0], RECORDS[1]])
    model, _ = make_tiny("llama-bytelevel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = open_run(model, tok, out, **{**KW, "mpes_checks": 0})  # other settings from the fork point on
    assert ed.journal.forked == {"from": str(tmp_path / "src"), "edits": 2}
    assert torch.equal(ModelAdapter(model).weight(1), ModelAdapter(again).weight(1))
    go(ed, out, RECORDS, rules=rules)
    assert [e["case_id"] for e in lines(out / "edits.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [e.request["case_id"] for e in ed.journal] == [1, 2, 5, 6]
    assert [e.record["settings"]["mpes_checks"] for e in ed.journal] == [2, 2, 0, 0]
    ed.close()
    # past its fork point the run keeps the settings of its own edits
    fresh, _ = make_tiny("llama-bytelevel")
    with pytest.raises(ValueError, match="mpes_checks=0"):
        open_run(fresh, tok, out, **KW)


def test_a_fork_is_checked_before_anything_is_written(make_tiny, tmp_path):
    from fastrome.sequential import fork_run

    with pytest.raises(ValueError, match="source: .* holds no run"):
        fork_run(tmp_path / "none", tmp_path / "fork", 1)
    model, tok = make_tiny("llama-bytelevel")
    go(editor_for(model, tok, tmp_path / "src"), tmp_path / "src", RECORDS[:2],
       rules=CollapseRules(sentinel_ppl_ratio=1e9, action="record"))
    with pytest.raises(ValueError, match=r"edits: expected 1..2 \(records the source has done\), got 3"):
        fork_run(tmp_path / "src", tmp_path / "fork", 3)
    assert not (tmp_path / "fork").exists()
    with pytest.raises(ValueError, match="out_dir: .* already holds a run"):
        fork_run(tmp_path / "src", tmp_path / "src", 1)
