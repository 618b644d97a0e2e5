"""fastrome.evaluation: dataset loading, ROME's CounterFact/zsRE metrics, fluency, test prefixes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import data_file
from fastrome.evaluation import (
    CounterFactCase,
    evaluate_case,
    evaluate_zsre_case,
    format_table,
    generate_for_fluency,
    load_counterfact,
    load_zsre,
    ngram_entropy,
    prefixed,
    summarize,
    test_prefixes,
    text_ngram_entropy,
)
from fastrome.evaluation.counterfact import parse_case
from fastrome.evaluation.zsre import loc_prompt, parse_zsre
from fastrome.tokens import encode, target_ids


def _record(**over):
    rec = {
        "case_id": 9,
        "requested_rewrite": {
            "prompt": "{} is located in the city of",
            "subject": "The Eiffel Tower",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
        "rephrase_prompt": "Where is The Eiffel Tower? It is in",
        "locality_prompt": "The Louvre is located in the city of",
        "locality_ground_truth": "Paris",
    }
    rec.update(over)
    return rec


# ---------------------------------------------------------------- loading


def test_load_counterfact_mend_layout():
    cases = load_counterfact(data_file("counterfact", "counterfact_dev.json"), limit=50)
    assert len(cases) + len(cases.skipped) == 50 and len(cases) == 50
    c = cases[0]
    assert c.layout == "mend" and c.case_id == 2
    assert c.prompt == "Toko Yasuda, the" and c.target_new == "piano" and c.target_true == "guitar"
    assert c.paraphrase_prompts == ("Toko Yasuda is incredible at",)
    assert c.neighborhood == (("John Lennon performs on the", "guitar"),)
    assert c.generation_prompts == ()


def test_load_counterfact_rome_layout():
    path = data_file("counterfact", "counterfact_full_dev.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    cases = load_counterfact(path)
    assert len(cases) == len(raw) and not cases.skipped
    c = cases[0]
    assert c.layout == "rome" and c.case_id == raw[0]["case_id"]
    assert c.paraphrase_prompts == tuple(raw[0]["paraphrase_prompts"])
    assert [p for p, _ in c.neighborhood] == raw[0]["neighborhood_prompts"]
    assert {a for _, a in c.neighborhood} == {raw[0]["requested_rewrite"]["target_true"]["str"]}
    assert c.generation_prompts == tuple(raw[0]["generation_prompts"]) and c.generation_prompts


def test_bad_counterfact_records_are_reported(tmp_path):
    same = _record()
    same["requested_rewrite"] = dict(same["requested_rewrite"], target_new={"str": "Paris"})
    no_subject = _record()
    no_subject["requested_rewrite"] = dict(no_subject["requested_rewrite"], prompt="Somewhere is in the city of")
    records = [
        _record(),
        same,
        {"case_id": 3},
        _record(rephrase_prompt=""),
        no_subject,
        "not a record",
        _record(paraphrase_prompts=["ok"], neighborhood_prompts="not a list"),
        {k: v for k, v in _record().items() if k not in ("rephrase_prompt", "locality_prompt")},
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    cases = load_counterfact(path)
    assert len(cases) == 1 and cases[0].case_id == 9
    reasons = dict(cases.skipped)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert "equals target_true" in reasons[1]
    assert "requested_rewrite" in reasons[2]
    assert "rephrase_prompt" in reasons[3]
    assert "does not occur" in reasons[4]
    assert "mapping" in reasons[5]
    assert "neighborhood_prompts" in reasons[6]
    assert "no evaluation prompts" in reasons[7]
    assert len(load_counterfact(path, limit=2)) == 1 and load_counterfact(path, limit=2).skipped[0][0] == 1


def test_unreadable_files_raise(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        load_counterfact(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_zsre(tmp_path / "missing.json")
    obj = tmp_path / "obj.json"
    obj.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list"):
        load_counterfact(obj)
    with pytest.raises(ValueError, match="limit"):
        load_counterfact(obj, limit=-1)


def test_load_zsre_reports_unchanged_and_empty_answers():
    path = data_file("zsre", "zsre_mend_train-1k.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    cases = load_zsre(path)
    expected_bad = {i for i, r in enumerate(raw) if not r["alt"].strip() or r["alt"].strip() == r["answers"][0].strip()}
    assert expected_bad and {i for i, _ in cases.skipped} == expected_bad
    assert len(cases) == len(raw) - len(expected_bad)
    c = cases[0]
    assert c.request.prompt == "What is the product made by {}?" and c.alt == "unmanned aircraft"
    assert c.request.target_true == "uniform" and c.loc_ans == "Walter Sobchak"
    with pytest.raises(ValueError, match="subject"):
        parse_zsre(dict(raw[0], subject="Nobody"), 0)


# ---------------------------------------------------------------- CounterFact metrics


def _nll_unbatched(model, tok, prompt, target):
    """Mean NLL and per-token argmax hits of " " + target after prompt, one forward, no padding."""
    pre = encode(tok, prompt)
    tgt = target_ids(tok, prompt, " " + target)
    ids = torch.tensor([pre + tgt])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    rows = logp[len(pre) - 1 : len(pre) - 1 + len(tgt)]
    lp = rows[torch.arange(len(tgt)), torch.tensor(tgt)]
    return float(-lp.mean()), (rows.argmax(-1) == torch.tensor(tgt)).tolist()


@pytest.mark.parametrize("kind", ["llama-sentencepiece", "gpt2-bytelevel"])
def test_evaluate_case_matches_unbatched_computation(make_tiny, kind):
    model, tok = make_tiny(kind)
    rec = _record(
        paraphrase_prompts=["Where is The Eiffel Tower? It is in", "The Eiffel Tower stands in"],
        neighborhood_prompts=["The Louvre is in", "Notre-Dame de Paris is located in the lovely city of"],
    )
    case = parse_case(rec)
    prefixes = ["The day was long.", "I think so."]
    out = evaluate_case(model, tok, case, prefixes=prefixes)

    def pair(prompts):
        new = [_nll_unbatched(model, tok, p, "Rome") for p in prompts]
        true = [_nll_unbatched(model, tok, p, "Paris") for p in prompts]
        score = sum(n[0] < t[0] for n, t in zip(new, true)) / len(prompts)
        mag = sum(math.exp(-n[0]) - math.exp(-t[0]) for n, t in zip(new, true)) / len(prompts)
        top = sum(all(n[1]) for n in new) / len(prompts)
        return score, mag, top

    rw = pair([case.prompt])
    para = pair(list(case.paraphrase_prompts))
    assert out["efficacy_score"] == rw[0] and out["efficacy_top1"] == rw[2]
    assert out["efficacy_magnitude"] == pytest.approx(rw[1], abs=1e-5)
    assert out["paraphrase_score"] == para[0] and out["paraphrase_top1"] == para[2]
    assert out["paraphrase_magnitude"] == pytest.approx(para[1], abs=1e-5)

    neigh = [
        (_nll_unbatched(model, tok, p, "Paris")[0], _nll_unbatched(model, tok, p, "Rome")[0])
        for p, _ in case.neighborhood
    ]
    assert out["neighborhood_score"] == sum(a < b for a, b in neigh) / 2
    assert out["neighborhood_magnitude"] == pytest.approx(
        sum(math.exp(-a) - math.exp(-b) for a, b in neigh) / 2, abs=1e-5
    )

    rw_pre = pair([prefixed(p, case.prompt) for p in prefixes])
    para_pre = pair([prefixed(p, q) for p in prefixes for q in case.paraphrase_prompts])
    assert out["efficacy_score_prefixed"] == rw_pre[0]
    assert out["efficacy_magnitude_prefixed"] == pytest.approx(rw_pre[1], abs=1e-5)
    assert out["paraphrase_magnitude_prefixed"] == pytest.approx(para_pre[1], abs=1e-5)
    assert out["paraphrase_top1_prefixed"] == para_pre[2]
    assert "locality_top1" not in out and out["n_prefixes"] == 2
    json.dumps(out)  # JSON-serialisable


def _single_token(tok, prompt, word):
    ids = target_ids(tok, prompt, " " + word)
    assert len(ids) == 1, (word, ids)
    return ids[0]


def _boost(model, token_id, amount=60.0):
    """Make ``token_id`` the model's favourite next token everywhere (a hook on the LM head)."""

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., token_id] += amount
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_efficacy_flips_when_the_model_prefers_the_new_target(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    rec = _record()
    rec["requested_rewrite"] = dict(rec["requested_rewrite"], target_new={"str": "the"}, target_true={"str": "of"})
    rec["locality_ground_truth"] = "of"
    case = parse_case(rec)
    new_id = _single_token(tok, case.prompt, "the")
    true_id = _single_token(tok, case.prompt, "of")
    assert _single_token(tok, case.neighborhood[0][0], "of") == true_id

    handle = _boost(model, true_id)
    try:
        before = evaluate_case(model, tok, case)
    finally:
        handle.remove()
    assert before["efficacy_score"] == 0.0 and before["efficacy_top1"] == 0.0
    assert before["efficacy_magnitude"] < -0.9 and before["paraphrase_score"] == 0.0
    assert before["neighborhood_score"] == 1.0 and before["locality_top1"] == 1.0

    handle = _boost(model, new_id)
    try:
        after = evaluate_case(model, tok, case, prefixes=["I think so."])
    finally:
        handle.remove()
    assert after["efficacy_score"] == 1.0 and after["efficacy_top1"] == 1.0
    assert after["efficacy_magnitude"] > 0.9 and after["paraphrase_score"] == 1.0
    assert after["paraphrase_top1"] == 1.0 and after["efficacy_score_prefixed"] == 1.0
    assert after["neighborhood_score"] == 0.0 and after["locality_top1"] == 0.0
    assert after["neighborhood_magnitude"] < -0.9


def test_summarize_and_format_table():
    results = [
        {"case_id": 1, "efficacy_score": 1.0, "paraphrase_score": 0.5, "n_paraphrase": 2},
        {
            "case_id": 2,
            "efficacy_score": 0.0,
            "paraphrase_score": float("nan"),
            "n_paraphrase": 0,
            "efficacy_score_prefixed": 0.25,
        },
    ]
    s = summarize(results)
    assert s["n_cases"] == 2 and s["efficacy_score"] == 0.5 and s["paraphrase_score"] == 0.5
    assert s["count_paraphrase_score"] == 1 and s["count_efficacy_score"] == 2
    assert s["efficacy_score_prefixed"] == 0.25 and "n_paraphrase" not in s and "case_id" not in s
    table = format_table(s)
    assert "efficacy_score" in table and "0.5000" in table and "0.2500" in table and "prefixed" in table
    with pytest.raises(ValueError, match="results"):
        summarize(results[0])


def test_evaluate_case_rejects_bad_arguments(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=1)
    with pytest.raises(ValueError, match="case"):
        evaluate_case(model, tok, _record())
    with pytest.raises(ValueError, match="prefixes"):
        evaluate_case(model, tok, parse_case(_record()), prefixes="The day.")
    assert isinstance(parse_case(_record()), CounterFactCase)


# ---------------------------------------------------------------- zsRE


def test_zsre_token_accuracy_by_hand(make_tiny):
    model, tok = make_tiny("llama-sentencepiece")
    rec = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "alt": "unmanned aircraft carrier",
        "answers": ["uniform"],
        "rephrase": "What will be the product of UniFirst?",
        "loc": "nq question: who plays the main character in the film",
        "loc_ans": "Walter Sobchak",
    }
    case = parse_zsre(rec, 0)
    out = evaluate_zsre_case(model, tok, case, prefixes=["The day was long."])

    def acc(prompt, answer):
        _, hits = _nll_unbatched(model, tok, prompt, answer)
        return sum(hits) / len(hits)

    assert out["efficacy"] == acc(rec["src"], rec["alt"])
    assert out["paraphrase"] == acc(rec["rephrase"], rec["alt"])
    assert out["specificity"] == acc(rec["loc"] + "?", rec["loc_ans"])
    assert out["efficacy_prefixed"] == acc("The day was long. " + rec["src"], rec["alt"])
    assert loc_prompt("who?") == "who?"

    # Force every answer token: a model that always emits the answer's tokens scores 1.0.
    ids = target_ids(tok, rec["src"], " " + rec["alt"])
    first = ids[0]
    handle = _boost(model, first)
    try:
        forced = evaluate_zsre_case(model, tok, case)
    finally:
        handle.remove()
    assert forced["efficacy"] == pytest.approx(ids.count(first) / len(ids))


# ---------------------------------------------------------------- fluency


def test_ngram_entropy_hand_computed():
    assert ngram_entropy(["a a a a a a"]) == 0.0
    # "a b c d": 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit).
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert text_ngram_entropy("a b c d") == pytest.approx(expected)
    # "x y x y x": bigrams xy,yx,xy,yx -> 1 bit; trigrams xyx,yxy,xyx -> H(2/3, 1/3).
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert text_ngram_entropy("x y x y x") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    assert ngram_entropy(["a b c d", "a a a a a a"]) == pytest.approx(expected / 2)
    assert text_ngram_entropy("one") == 0.0
    assert text_ngram_entropy("Hi, you.") == text_ngram_entropy("a b c d")  # punctuation is a word
    with pytest.raises(ValueError, match="texts"):
        ngram_entropy("a b c")


def test_generate_for_fluency_is_seeded(make_tiny):
    model, tok = make_tiny("gpt2-bytelevel", layers=1)
    prompts = ["The city of", "Music is"]
    a = generate_for_fluency(model, tok, prompts, max_new_tokens=12, seed=3)
    b = generate_for_fluency(model, tok, prompts, max_new_tokens=12, seed=3)
    c = generate_for_fluency(model, tok, prompts, max_new_tokens=12, seed=4)
    assert a == b and a != c
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(a, prompts))
    # Each prompt has its own generator, so the first text does not depend on the second prompt.
    assert generate_for_fluency(model, tok, prompts[:1], max_new_tokens=12, seed=3) == a[:1]
    # top_k=1 is greedy decoding.
    greedy = generate_for_fluency(model, tok, prompts[:1], max_new_tokens=5, top_k=1, seed=0)[0]
    ids = encode(tok, prompts[0])
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == prompts[0] + tok.decode(ids[len(encode(tok, prompts[0])) :], skip_special_tokens=True)
    with pytest.raises(ValueError, match="top_k"):
        generate_for_fluency(model, tok, prompts, top_k=0)


def test_prefixes_are_seeded_short_strings(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=1)
    a = test_prefixes(model, tok, n=3, length=4, seed=1)
    assert len(a) == 3 and all(isinstance(p, str) and p.endswith(".") and "{" not in p for p in a)
    assert test_prefixes(model, tok, n=3, length=4, seed=1) == a
    with pytest.raises(ValueError, match="length"):
        test_prefixes(model, tok, length=0)


@pytest.mark.integration
def test_unedited_smollm2_counterfact(smollm2):
    model, tok = smollm2
    cases = load_counterfact(data_file("counterfact", "counterfact_full_dev.json"), limit=4)
    results = [evaluate_case(model, tok, c) for c in cases]
    s = summarize(results)
    # An unedited model mostly prefers the true answers: low efficacy, high neighbourhood score.
    assert s["efficacy_score"] <= 0.5 and s["neighborhood_score"] >= 0.6


def test_one_edit_per_case_restores_the_model_between_cases(make_tiny):
    import warnings

    from fastrome import Editor
    from fastrome.evaluation.single import evaluate_edits

    cases = load_counterfact(data_file("counterfact", "counterfact_dev.json"), limit=3)
    kw = dict(stats="identity", layer=1, cache_dir=False, v_steps=3, template_lengths=((3, 2),), policy="skip")
    model, tok = make_tiny("llama-bytelevel")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = Editor(model, tok, **kw)
        ed.use_templates(["{}", "It rained. {}"])
        rows = evaluate_edits(ed, cases, prefixes=["So it goes."])
        # the third case evaluated alone on a fresh copy: the same figures, so nothing leaked
        fresh, _ = make_tiny("llama-bytelevel")
        alone_ed = Editor(fresh, tok, **kw)
        alone_ed.use_templates(["{}", "It rained. {}"])
        alone = evaluate_edits(alone_ed, cases[2:], prefixes=["So it goes."])
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert [r["edit_status"] for r in rows] == ["applied"] * 3
    assert {k: v for k, v in rows[2].items() if k != "edit_seconds"} == \
        {k: v for k, v in alone[0].items() if k != "edit_seconds"}
    assert "efficacy_score_prefixed" in rows[0] and len(ed.journal) == 0
