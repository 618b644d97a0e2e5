"""The algorithm on tiny random Llama and GPT-2 models: the update's algebra in every key mode, the
guards, and that nothing changes when an edit is refused or a request is malformed."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastrome
from fastrome import CovarianceSolver, Editor, EditRefused
from fastrome.adapter import ModelAdapter
from fastrome.config import CLASSIC
from fastrome.journal import apply_factors
from fastrome.keys import capture_at
from fastrome.prompts import edit_prompts
from fastrome.requests import parse_requests
from fastrome.stats import compute

REQ = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
# one-layer edits in the default mode (spread edits have their own tests)
FAST = dict(v_steps=6, template_lengths=((3, 4), (5, 3)), stats_tokens=4000, stats_max_len=128, spread=1)
# Random tiny models need large updates; the size cap has its own test.
UNCAPPED = dict(FAST, max_update_ratio=float("inf"))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, snap):
    for name, t in model.state_dict().items():
        a, b = t.detach(), snap[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # compare bit patterns: -0.0 vs +0.0 or NaN payload changes count as changes
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)), f"{name} changed"


def second_moment(model, tok, layer):
    sm = compute(ModelAdapter(model), tok, [layer], tokens=4000, max_len=128, progress=False)[layer]
    return sm.matrix


def fp64_solve(C, ridge, k):
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    return torch.linalg.solve(C.double() + ridge * eye, k.double())


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("mode", ["consistent", "original", "prompt"])
def test_update_algebra_in_every_mode(tiny, mode):
    model, tok, kind = tiny
    layer = 1
    C = second_moment(model, tok, layer)
    ed = Editor(model, tok, stats={layer: C}, layer=layer, mode=mode, cache_dir=False, **UNCAPPED)
    adapter = ed.adapter
    w0 = adapter.weight(layer).detach().double().clone()
    bias = adapter.bias(layer)
    b = bias.detach().double() if bias is not None else torch.zeros(adapter.d_out, dtype=torch.float64)
    report = ed.edit(REQ)
    assert report[0].status == "applied", report.table()
    art = ed.last
    w1 = adapter.weight(layer).detach().double()

    # the change is exactly rank one: Λ uᵀ
    torch.testing.assert_close(w1 - w0, torch.outer(art.lam.double(), art.u.double()), rtol=1e-5, atol=1e-6)

    # u solves against C (+ ridge) for the key of the mode; the denominator is uᵀk of the mode
    ridge = ed.solver(layer).ridge
    k_for_u = art.k_plain if mode == "prompt" else art.k_mean
    k_den = art.k_mean if mode == "consistent" else art.k_plain
    assert rel_err(art.u, fp64_solve(C, ridge, k_for_u)) < 1e-4
    expected_denom = float(fp64_solve(C, ridge, k_for_u) @ k_den.double())
    assert math.isclose(art.denom, expected_denom, rel_tol=1e-5)
    if mode == "consistent":
        assert art.denom > 0  # k̄ᵀC⁻¹k̄ of an SPD C

    # interference: the realised change's mean squared output over keys of second moment C + ridge
    M = C.double() + ridge * torch.eye(C.shape[0], dtype=torch.float64)
    dW = w1 - w0
    expected = float(torch.trace(dW @ M @ dW.T))
    assert math.isclose(report[0].interference, expected, rel_tol=1e-3), (report[0].interference, expected)

    # the edited matrix maps the mode's key to v* (to fp32 precision)
    assert rel_err(w1 @ k_den.double() + b, art.v_star) < 1e-5

    # the keys really are what a fresh forward pass reads, and the new mean output is v*
    prompts = edit_prompts(tok, ed.templates(), parse_requests(REQ)[0])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    keys, values = capture_at(adapter, layer, prompts, pad)
    torch.testing.assert_close(keys.mean(0), art.k_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys[0], art.k_plain, rtol=1e-5, atol=1e-6)
    target_out = values.mean(0) if mode == "consistent" else values[0]
    assert rel_err(target_out, art.v_star) < 1e-4


def test_original_differs_from_consistent_only_in_the_key(make_tiny):
    model, tok = make_tiny("llama-bytelevel", seed=3)
    C = second_moment(model, tok, 1)
    arts = {}
    for mode in ("consistent", "original"):
        m, _ = make_tiny("llama-bytelevel", seed=3)
        ed = Editor(m, tok, stats={1: C}, layer=1, mode=mode, cache_dir=False, **UNCAPPED)
        ed.edit(REQ)
        arts[mode] = ed.last
    a, b = arts["consistent"], arts["original"]
    torch.testing.assert_close(a.u, b.u)  # both u = C⁻¹k̄
    assert not torch.allclose(a.k_mean, a.k_plain)  # prefixes change the key
    assert not math.isclose(a.denom, b.denom, rel_tol=1e-3)


class PlantedSolver(CovarianceSolver):
    """Returns a chosen u, to plant a bad denominator."""

    def __init__(self, dim, how):
        super().__init__(torch.eye(dim, dtype=torch.float64))
        self.how = how

    def solve(self, k):
        if k.dim() == 2:  # the dual mode solves for both of its keys at once
            rows = [self.solve(row) for row in k]
            return torch.stack([u for u, _ in rows]), torch.stack([d for _, d in rows])
        k = k.float()
        if self.how == "negative":
            u = -k
        elif self.how == "tiny":
            v = torch.ones_like(k)
            u = v - (v @ k) / (k @ k) * k + 1e-9 * k  # almost orthogonal to k
        elif self.how == "zero":
            v = torch.ones_like(k)
            u = v - (v @ k) / (k @ k) * k
        elif self.how == "nan":
            u = k.clone()
            u[0] = float("nan")
        elif self.how == "inf":
            u = k.clone()
            u[-1] = float("inf")
        else:
            raise AssertionError(self.how)
        return u, (u.double() * k.double()).sum().float()


# the planted solve is the editor's own (an edit memory would solve from the statistics' inverse)
PLANTED = dict(FAST, memory_beta=0.0)


@pytest.mark.parametrize("mode", ["consistent", "dual"])
@pytest.mark.parametrize("how", ["negative", "tiny", "zero", "nan", "inf"])
def test_guards_refuse_planted_denominators_and_leave_weights_bit_identical(tiny, how, mode):
    model, tok, kind = tiny
    adapter = ModelAdapter(model)
    snap = snapshot(model)
    ed = Editor(model, tok, stats={1: PlantedSolver(adapter.d_in, how)}, layer=1, cache_dir=False,
                policy="skip", mode=mode, **PLANTED)
    report = ed.edit(REQ)
    rec = report[0]
    assert rec.status == "refused"
    assert rec.reasons and ("denominator" in rec.reasons[0] or "non-finite" in rec.reasons[0])
    assert_bit_identical(model, snap)

    ed_raise = Editor(model, tok, stats={1: PlantedSolver(adapter.d_in, how)}, layer=1, cache_dir=False, mode=mode,
                      **PLANTED)
    with pytest.raises(EditRefused) as err:
        ed_raise.edit(REQ)
    assert err.value.report[0].status == "refused"
    assert_bit_identical(model, snap)


def test_force_overrides_thresholds_but_never_writes_nan(make_tiny):
    model, tok = make_tiny("llama-sentencepiece")
    adapter = ModelAdapter(model)
    snap = snapshot(model)
    ed = Editor(model, tok, stats={1: PlantedSolver(adapter.d_in, "nan")}, layer=1, cache_dir=False,
                policy="force", **PLANTED)
    assert ed.edit(REQ)[0].status == "refused"
    assert_bit_identical(model, snap)
    ed = Editor(model, tok, stats={1: PlantedSolver(adapter.d_in, "negative")}, layer=1, cache_dir=False,
                policy="force", **{**UNCAPPED, **CLASSIC})
    rec = ed.edit(REQ)[0]
    assert rec.status == "forced" and rec.denominator < 0
    assert not torch.equal(adapter.weight(1), snap["model.layers.1.mlp.down_proj.weight"])


def test_update_norm_caps(make_tiny):
    model, tok = make_tiny("gpt2-bytelevel")
    snap = snapshot(model)
    C = second_moment(model, tok, 1)
    ed = Editor(model, tok, stats={1: C}, layer=1, cache_dir=False, policy="skip", max_update_ratio=1e-9, **FAST)
    rec = ed.edit(REQ)[0]
    assert rec.status == "refused" and "max_update_ratio" in rec.reasons[0]
    assert_bit_identical(model, snap)
    # the running total cap counts earlier edits at the layer
    ed = Editor(model, tok, stats={1: C}, layer=1, cache_dir=False, policy="skip", **UNCAPPED)
    first = ed.edit(REQ)[0]
    assert first.status == "applied"
    ed.config.max_total_update_ratio = first.update_ratio * 1.01
    second = ed.edit({"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess"})[0]
    assert second.status == "refused" and "running total" in second.reasons[0]


def test_malformed_requests_raise_before_anything_changes(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    snap = snapshot(model)
    ed = Editor(model, tok, stats="identity", layer=1, cache_dir=False, **FAST)
    good = dict(REQ)
    with pytest.raises(ValueError, match=r"requests\[1\]\.subject"):
        ed.edit([good, {"prompt": "{} is big", "subject": "", "target_new": "x"}])
    with pytest.raises(ValueError, match=r"requests\[1\]\.layer"):
        ed.edit([good, dict(good, layer=99)])
    with pytest.raises(ValueError, match=r"requests\[0\]\.target_new"):
        ed.edit([dict(good, target_new={"str": ""})])
    assert_bit_identical(model, snap)
    assert ed.history == []
    with pytest.raises(ValueError, match="layer: 7 is not a layer"):
        Editor(model, tok, layer=7, cache_dir=False)
    with pytest.raises(ValueError, match="stats:"):
        Editor(model, tok, stats="/no/such/file.safetensors", cache_dir=False)
    with pytest.raises(ValueError, match="tokenizer"):
        Editor(model, None)


def test_identity_statistics_are_never_silent(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    ed = Editor(model, tok, stats="identity", layer=1, cache_dir=False, **UNCAPPED)
    with pytest.warns(UserWarning, match="statistics switched off"):
        report = ed.edit(REQ)
    assert "identity" in report[0].stats and "identity" in report.table()
    assert ed.solver(1).identity


def fp32_master(base, journal, layer):
    """The fp32 master a half-precision layer is written through: its base weight in fp32 plus every
    journaled factor there, added with the write kernel (replaying in bf16 would lose small updates)."""
    master = base.float()
    for e in journal:
        if e.layer == layer:
            apply_factors(base.clone(), e.u, e.lam, master)
    return master


def test_bf16_model_writes_through_fp32_master(make_tiny):
    model, tok = make_tiny("llama-bytelevel", dtype=torch.bfloat16)
    C = second_moment(model, tok, 1)
    ed = Editor(model, tok, stats={1: C}, layer=1, cache_dir=False, **UNCAPPED)
    w = ed.adapter.weight(1)
    base = w.detach().clone()
    assert w.dtype == torch.bfloat16
    ed.edit(REQ)
    first = ed.last
    master = fp32_master(base, ed.journal, 1)
    assert torch.equal(w, master.to(torch.bfloat16))  # weight = round(master)
    assert rel_err(master.double() @ first.k_plain.double(), first.v_star) < 1e-5  # exact in fp32 (dual: at k_u)
    ed.edit({"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "chess"})
    assert torch.equal(w, fp32_master(base, ed.journal, 1).to(torch.bfloat16))
    # a weight changed behind the editor's back is noticed, not overwritten with a stale master
    with torch.no_grad():
        w.mul_(0.5)
    with pytest.warns(UserWarning, match="changed outside"):
        ed.edit({"prompt": "{} is a citizen of", "subject": "Danielle Darrieux", "target_new": "Japan"})


def test_edit_function_and_report_formats(make_tiny):
    model, tok = make_tiny("gpt2-bytelevel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fastrome.edit(model, [REQ], tokenizer=tok, stats="identity", layer=1, **UNCAPPED)
    rec = report[0]
    assert rec.status == "applied" and rec.layer == 1 and rec.mode == "dual"
    assert rec.steps >= 1 and len(rec.losses) >= 1 and rec.seconds["values"] > 0
    d = report.to_dict()
    assert d["applied"] == 1 and d["edits"][0]["subject"] == "The Eiffel Tower"
    import json

    assert json.loads(report.to_json())["edits"][0]["status"] == "applied"
    text = report.table()
    assert "The Eiffel Tower" in text and "seconds by phase" in text
    with pytest.raises(ValueError, match="tokenizer"):
        fastrome.edit(model, [REQ])


def test_use_templates_sets_them_and_is_refused_against_a_journal_made_with_others(make_tiny, tmp_path):
    model, tok = make_tiny("llama-bytelevel")
    C = second_moment(model, tok, 1)
    ed = Editor(model, tok, stats={1: C}, layer=1, cache_dir=False, journal=tmp_path / "j", **UNCAPPED)
    for bad in ("{}", [], ["no slot"], ["{} and {}"], [3]):
        with pytest.raises(ValueError, match="templates: expected a non-empty sequence"):
            ed.use_templates(bad)
    ed.use_templates(["{}", "It rained. {}"])
    assert ed.templates() == ["{}", "It rained. {}"]
    ed.edit(REQ)
    ed.use_templates(("{}", "It rained. {}"))  # the same ones: fine
    with pytest.raises(ValueError, match="the journal holds 1 edits made with other templates"):
        ed.use_templates(["{}"])
    ed.close()
    from fastrome import Journal

    assert Journal.read(tmp_path / "j").templates == ["{}", "It rained. {}"]  # a resumed run edits with them
