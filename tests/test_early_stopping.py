"""Most-probable early stopping: the value optimisation stops once the new target has been the
teacher-forced top prediction at every token of every templated prompt for m consecutive checks,
changing nothing before that point; the loss threshold stays a second condition."""

from __future__ import annotations

import pytest
import torch

from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig
from fastrome.requests import parse_requests
from fastrome.runners import FullRunner, row_batch
from fastrome.values import _request_rows, optimize_value, optimize_values

pytestmark = pytest.mark.integration  # a random tiny model cannot be taught a target; the real one can

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English language"},
]
TEMPLATES = ["{}", "Because it rained. {}", "You. {}"]


LAYER = 6


def cfg(**kw):
    kw.setdefault("v_steps", 12)
    kw.setdefault("early_stop_loss", 0.0)  # the loss rule off unless a test turns it on
    kw.setdefault("mpes_checks", 0)  # and early stopping (on by default)
    return EditConfig(**kw).resolve("llama")


def on_top_at(adapter, tok, layer, req, delta):
    """Whether the target is the top prediction at each of its tokens in every templated prompt
    with ``delta`` added, from whole-model passes (independent of the optimisation's own check)."""
    seqs, last, reads, tgt = _request_rows(tok, req, TEMPLATES)
    runner = FullRunner(adapter, layer, row_batch([(seqs[:-1], last[:-1], reads[:-1])]), tok.eos_token_id)
    runner.start()
    with torch.no_grad():
        top = runner.logits(delta[None]).argmax(-1)
    return bool((top == torch.tensor(tgt * (len(seqs) - 1))).all())


@pytest.mark.parametrize("fast", [True])
def test_stops_after_m_checks_on_top_and_changes_nothing_before(smollm2, fast):
    model, tok = smollm2
    adapter = ModelAdapter(model)
    req = parse_requests(REQS[:1])[0]
    plain = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(), fast=fast)
    one = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(mpes_checks=1), fast=fast)
    three = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(mpes_checks=3), fast=fast)
    assert plain.stop_reason == "steps" and not plain.early_stopped
    assert (one.stop_reason, three.stop_reason) == ("top", "top") and one.early_stopped
    assert one.steps < three.steps < plain.steps, "the early stop is not exercised"
    # identical trajectories up to the stop: the rule only decides when to stop
    assert one.losses == plain.losses[: len(one.losses)] and three.losses == plain.losses[: len(three.losses)]
    # the δ it stops at puts the target on top; the one of the check before did not (m = 1)
    assert on_top_at(adapter, tok, LAYER, req, one.delta)
    before = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=one.steps), fast=fast)
    assert not on_top_at(adapter, tok, LAYER, req, before.delta)
    # a smaller δ than running on to the loss threshold
    assert float(one.delta.norm()) < float(plain.delta.norm())


def test_the_loss_threshold_still_stops_first_when_it_is_met_first(smollm2):
    model, tok = smollm2
    adapter = ModelAdapter(model)
    req = parse_requests(REQS[:1])[0]
    first = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=1)).losses[0]
    res = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(mpes_checks=50, early_stop_loss=first * 2))
    assert res.stop_reason == "loss" and res.steps == 0


def test_batched_requests_stop_each_on_its_own(smollm2):
    model, tok = smollm2
    adapter = ModelAdapter(model)
    reqs = parse_requests(REQS)
    c = cfg(mpes_checks=2)
    alone = [optimize_value(adapter, tok, LAYER, r, TEMPLATES, c) for r in reqs]
    together = optimize_values(adapter, tok, LAYER, reqs, TEMPLATES, c)
    for a, b in zip(alone, together):
        assert (a.steps, a.stop_reason) == (b.steps, b.stop_reason)
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, True, 1.5])
@pytest.mark.integration
def test_mpes_checks_is_validated(bad):
    with pytest.raises(ValueError, match="config.mpes_checks"):
        EditConfig(mpes_checks=bad).validate()


def target_probs_at(adapter, tok, layer, req, delta):
    """The target's probability at each of its tokens in every templated prompt with ``delta``
    added, from whole-model passes."""
    seqs, last, reads, tgt = _request_rows(tok, req, TEMPLATES)
    runner = FullRunner(adapter, layer, row_batch([(seqs[:-1], last[:-1], reads[:-1])]), tok.eos_token_id)
    runner.start()
    with torch.no_grad():
        probs = torch.softmax(runner.logits(delta[None]), -1)
    return probs.gather(1, torch.tensor(tgt * (len(seqs) - 1))[:, None]).squeeze(1)


def test_a_probability_floor_stops_later_and_only_once_it_is_met(smollm2):
    model, tok = smollm2
    adapter = ModelAdapter(model)
    req = parse_requests(REQS[:1])[0]
    top = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=25, mpes_checks=1))
    floor = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=25, mpes_checks=1, mpes_min_prob=0.9))
    assert floor.stop_reason == "top" and floor.steps > top.steps, "the floor is not exercised"
    assert floor.losses[: len(top.losses)] == top.losses  # same trajectory, a later stop
    assert float(target_probs_at(adapter, tok, LAYER, req, floor.delta).min()) >= 0.9
    # at the check before, some templated prompt was still under the floor
    before = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=floor.steps))
    assert float(target_probs_at(adapter, tok, LAYER, req, before.delta).min()) < 0.9


@pytest.mark.parametrize("settings", [{"mpes_checks": 0, "mpes_min_prob": 0.5},
                                      {"mpes_checks": 1, "mpes_min_prob": 1.0},
                                      {"mpes_checks": 1, "mpes_min_prob": -0.1},
                                      {"mpes_checks": 1, "mpes_min_prob": float("nan")}])
def test_mpes_min_prob_is_validated(settings):
    with pytest.raises(ValueError, match="config.mpes_min_prob"):
        EditConfig(**settings).validate()


def test_shrink_scales_delta_to_the_least_that_stays_on_top(smollm2):
    model, tok = smollm2
    adapter = ModelAdapter(model)
    req = parse_requests(REQS[:1])[0]
    full = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(mpes_checks=2))
    small = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(mpes_checks=2, mpes_shrink=True))
    assert small.stop_reason == "top" and small.losses == full.losses  # same optimisation, same stop
    scale = float(small.delta.norm() / full.delta.norm())
    assert 0 < scale < 1, "the shrink is not exercised"
    assert abs(scale * 64 - round(scale * 64)) < 1e-4  # six bisection rounds: a multiple of 1/64
    torch.testing.assert_close(small.delta, full.delta * scale, rtol=1e-5, atol=1e-6)
    assert on_top_at(adapter, tok, LAYER, req, small.delta)
    # the bisection's lower end, 1/64 below, was seen to fail (or is 0)
    if scale > 1 / 64:
        assert not on_top_at(adapter, tok, LAYER, req, full.delta * (scale - 1 / 64))


def test_normalized_steps_follow_the_gradient_with_adams_step_length(smollm2):
    model, tok = smollm2
    adapter = ModelAdapter(model)
    req = parse_requests(REQS[:1])[0]
    # one step each: Adam's first step is v_lr·sign(g), the normalised one v_lr·√d·g/‖g‖
    adam = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=2))
    ngd = optimize_value(adapter, tok, LAYER, req, TEMPLATES, cfg(v_steps=2, v_optimizer="normalized"))
    assert adam.losses[0] == ngd.losses[0] and adam.steps == ngd.steps == 1
    d = adapter.d_out
    assert float(ngd.delta.norm()) == pytest.approx(0.5 * d**0.5, rel=1e-5)
    moved = adam.delta.abs() > 0.25
    assert int(moved.sum()) > d // 2 and torch.equal(torch.sign(ngd.delta[moved]), torch.sign(adam.delta[moved]))
    assert float(ngd.delta.abs().max()) > 2 * float(adam.delta.abs().max())  # concentrated where g is large


@pytest.mark.parametrize("settings,field", [({"mpes_checks": 0, "mpes_shrink": True}, "mpes_shrink"),
                                           ({"mpes_checks": 2, "mpes_shrink": 1}, "mpes_shrink"),
                                           ({"v_optimizer": "sgd"}, "v_optimizer")])
def test_value_options_are_validated(settings, field):
    with pytest.raises(ValueError, match=f"config.{field}"):
        EditConfig(**settings).validate()
