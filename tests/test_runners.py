"""The value optimisation's runners: the suffix fast path against whole-model passes (logits and
gradients), its first-use check and fallback, and batched optimisation against one request at a time."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from fastrome import Editor, runners
from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig
from fastrome.requests import parse_requests
from fastrome.runners import FullRunner, SuffixRunner, forget_checks, make_runner, row_batch, suffix_support
from fastrome.templates import generate_templates
from fastrome.values import _request_rows, optimize_value, optimize_values

REQS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English language"},
    {"prompt": "{} plays", "subject": "Messi", "target_new": "basketball"},
]
TEMPLATES = ["{}", "Because it rained. {}", "I said that the very long story went on. {}", "You. {}"]


def _batch(tok, requests, templates=TEMPLATES):
    parts = [_request_rows(tok, r, templates) for r in parse_requests(requests)]
    return row_batch([(s, last, reads) for s, last, reads, _ in parts])


def _pair(model, tok, layer, requests):
    adapter = ModelAdapter(model)
    batch = _batch(tok, requests)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    full = FullRunner(adapter, layer, batch, pad)
    fast = SuffixRunner(adapter, layer, batch, pad)
    return adapter, batch, full, fast, full.start(), fast.start()


@pytest.mark.parametrize("layer", [0, 1, 3])
@pytest.mark.parametrize("kind", ["llama-bytelevel", "llama-sentencepiece"])
def test_suffix_pass_equals_whole_model_pass(make_tiny, kind, layer):
    model, tok = make_tiny(kind, layers=4)
    for p in model.parameters():
        p.requires_grad_(False)
    reqs = REQS + [{"prompt": "{} was born in", "subject": "X", "target_new": "Paris"}]
    adapter, batch, full, fast, v_full, v_fast = _pair(model, tok, layer, reqs)
    # rows of different prefix lengths; with no BOS, a one-token subject at the start leaves its
    # essence row ("X is a") an empty prefix
    assert len(set(batch.subject_last)) > 2
    if tok.bos_token_id is None or tok("X")["input_ids"][0] != tok.bos_token_id:
        assert min(batch.subject_last) == 0
    torch.testing.assert_close(v_fast, v_full, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(len(reqs), adapter.d_out, generator=g) * 3).requires_grad_(True)
    weights = torch.randn(len(batch.reads), generator=g)

    def loss_and_grad(runner):
        delta.grad = None
        logits = runner.logits(delta)
        loss = (torch.log_softmax(logits, -1).amax(-1) * weights).sum()
        loss.backward()
        return logits.detach(), delta.grad.clone()

    lf, gf = loss_and_grad(full)
    ls, gs = loss_and_grad(fast)
    assert lf.shape == (len(batch.reads), model.config.vocab_size)
    torch.testing.assert_close(ls, lf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs, gf, rtol=1e-4, atol=1e-6)
    # δ matters (the check is not vacuous): a different δ gives different logits
    assert (full.logits(delta.detach() * 0).detach() - lf).abs().max() > 1e-3


def test_first_use_check_accepts_and_remembers(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    forget_checks(model)
    adapter = ModelAdapter(model)
    runner, _ = make_runner(adapter, 1, _batch(tok, REQS[:1]), tok.eos_token_id)
    assert isinstance(runner, SuffixRunner) and not hasattr(runner, "full_hidden")
    assert runners._CHECKED[model] is True  # the check ran on first use and passed


def test_mismatch_falls_back_to_whole_model_with_a_warning(make_tiny, monkeypatch):
    model, tok = make_tiny("llama-bytelevel")
    forget_checks(model)
    adapter = ModelAdapter(model)
    real = SuffixRunner.logits
    monkeypatch.setattr(SuffixRunner, "logits", lambda self, d: real(self, d) + 0.5)
    with pytest.warns(UserWarning, match="fast value optimisation disabled.*differs"):
        runner, _ = make_runner(adapter, 1, _batch(tok, REQS[:1]), tok.eos_token_id)
    assert isinstance(runner, FullRunner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per model: no second check, no second warning
        runner, _ = make_runner(adapter, 1, _batch(tok, REQS[:1]), tok.eos_token_id)
    assert isinstance(runner, FullRunner)
    forget_checks(model)


@pytest.mark.parametrize("how", ["raises", "cache-never-written"])
def test_an_exception_on_first_use_falls_back_with_one_warning(make_tiny, monkeypatch, how):
    """A library release that changes the decoder layer's internals must cost speed, never a crash:
    whatever goes wrong the first time the fast path runs on a model, it warns once and the edit
    goes on with whole-model passes."""
    model, tok = make_tiny("llama-bytelevel")
    forget_checks(model)
    adapter = ModelAdapter(model)
    if how == "raises":
        def broken(self):
            raise KeyError(7)

        monkeypatch.setattr(SuffixRunner, "start", broken)
        match = "fast value optimisation disabled.*KeyError"
    else:
        # the layers accept the keyword but hand it to no attention module (what transformers 5.24
        # did with ``past_key_value``): the recording cache stays empty
        monkeypatch.setattr(runners, "cache_keyword", lambda block: "not_a_cache_keyword")
        match = "fast value optimisation disabled.*never wrote to it"
    with pytest.warns(UserWarning, match=match):
        runner, v_init = make_runner(adapter, 1, _batch(tok, REQS[:1]), tok.eos_token_id)
    assert isinstance(runner, FullRunner) and v_init.shape == (1, adapter.d_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner, _ = make_runner(adapter, 1, _batch(tok, REQS[:1]), tok.eos_token_id)
    assert isinstance(runner, FullRunner)
    forget_checks(model)


@pytest.mark.filterwarnings("ignore:statistics switched off")
def test_an_edit_goes_on_when_the_fast_path_breaks(make_tiny, monkeypatch):
    model, tok = make_tiny("llama-bytelevel", layers=3)
    forget_checks(model)
    monkeypatch.setattr(runners, "cache_keyword", lambda block: "not_a_cache_keyword")
    ed = Editor(model, tok, stats="identity", layer=1, cache_dir=False, v_steps=2, max_update_ratio=float("inf"),
                template_lengths=((3, 2),))
    with pytest.warns(UserWarning, match="fast value optimisation disabled"):
        report = ed.edit(REQS[:1])
    assert report.records[0].applied and runners._CHECKED[model] is False
    forget_checks(model)


def test_cache_keyword_is_a_named_parameter_of_the_installed_layer(make_tiny):
    model, _ = make_tiny("llama-bytelevel")
    block = model.model.layers[0]
    kw = runners.cache_keyword(block)
    assert kw in runners.CACHE_KEYWORDS
    assert kw in inspect.signature(block.forward).parameters

    class Swallows(torch.nn.Module):
        def forward(self, hidden, **kwargs):
            return hidden

    class Old(torch.nn.Module):
        def forward(self, hidden, past_key_value=None, **kwargs):
            return hidden

    class New(torch.nn.Module):
        def forward(self, hidden, cache=None, past_key_values=None, **kwargs):
            return hidden

    assert runners.cache_keyword(Swallows()) is None
    assert runners.cache_keyword(Old()) == "past_key_value"
    assert runners.cache_keyword(New()) == "cache"


def test_other_architectures_use_whole_model_passes(make_tiny):
    model, tok = make_tiny("gpt2-bytelevel")
    adapter = ModelAdapter(model)
    assert "gpt2" in suffix_support(adapter)
    runner, v_init = make_runner(adapter, 1, _batch(tok, REQS[:2]), tok.eos_token_id)
    assert isinstance(runner, FullRunner) and v_init.shape == (2, adapter.d_out)


def test_read_before_subject_is_rejected():
    with pytest.raises(ValueError, match="read column 1 of row 0"):
        row_batch([([[1, 2, 3, 4]], [2], [[1]])])


def _cfg(**kw):
    kw.setdefault("v_steps", 8)
    return EditConfig(**kw).resolve("llama")


@pytest.mark.parametrize("fast", [True, False])
def test_batched_values_follow_each_request_alone(make_tiny, fast):
    model, tok = make_tiny("llama-sentencepiece")
    adapter = ModelAdapter(model)
    reqs = parse_requests(REQS)
    # an early-stop threshold between the requests' first losses: one stops at once, the others go on
    first = sorted(optimize_value(adapter, tok, 1, r, TEMPLATES, _cfg(v_steps=1), fast=fast).losses[0] for r in reqs)
    cfg = _cfg(early_stop_loss=(first[0] + first[1]) / 2)
    alone = [optimize_value(adapter, tok, 1, r, TEMPLATES, cfg, fast=fast) for r in reqs]
    together = optimize_values(adapter, tok, 1, reqs, TEMPLATES, cfg, fast=fast)
    assert len({a.steps for a in alone}) > 1, "the early-stop case is not exercised"
    for a, b in zip(alone, together):
        assert a.steps == b.steps and a.early_stopped == b.early_stopped
        assert a.target_ids == b.target_ids
        torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b.v_star, a.v_init + a.delta, rtol=1e-3, atol=1e-4)


def test_fast_and_whole_model_optimisations_agree(make_tiny):
    model, tok = make_tiny("llama-bytelevel")
    adapter = ModelAdapter(model)
    cfg = _cfg()
    req = parse_requests(REQS[1:2])[0]
    fast = optimize_value(adapter, tok, 2, req, TEMPLATES, cfg, fast=True)
    full = optimize_value(adapter, tok, 2, req, TEMPLATES, cfg, fast=False)
    assert (fast.runner, full.runner) == ("suffix", "full")
    assert fast.steps == full.steps
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(full.losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.delta, full.delta, rtol=1e-3, atol=1e-4)


def test_batched_edits_recompute_each_numerator(make_tiny):
    """Within a batch, the second update is solved against the weights the first one left: the
    edited key (the unprefixed one, in the default dual mode) then maps exactly to its target value."""
    model, tok = make_tiny("llama-bytelevel", layers=3)
    ed = Editor(model, tok, stats="identity", layer=1, cache_dir=False, v_steps=4, max_update_ratio=float("inf"),
                template_lengths=((3, 2),), spread=1)
    with pytest.warns(UserWarning, match="statistics switched off"):
        report = ed.edit(REQS[:2], batch_size=2)
    assert [r.batch for r in report.records] == [2, 2] and all(r.applied for r in report.records)
    last = ed.last
    w = ed.adapter.weight(1).detach().double()
    err = (w @ last.k_plain.double() - last.v_star.double()).norm() / last.v_star.double().norm()
    assert err < 1e-5
    # against the weights before the batch it would miss by the first update's effect
    first = ed.journal.entries[0]
    miss = (first.lam.double() * (first.u.double() @ last.k_plain.double())).norm() / last.v_star.double().norm()
    assert miss > 1e-3


def test_batch_size_is_checked(make_tiny):
    model, tok = make_tiny("llama-bytelevel", layers=2)
    ed = Editor(model, tok, stats="identity", layer=0, cache_dir=False)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            ed.edit(REQS[:1], batch_size=bad)


def test_templates_from_the_model_work_with_the_fast_path(make_tiny):
    model, tok = make_tiny("llama-sentencepiece")
    templates = generate_templates(model, tok, lengths=((3, 2), (6, 2)), seed=0)
    adapter = ModelAdapter(model)
    req = parse_requests(REQS[:1])[0]
    fast = optimize_value(adapter, tok, 1, req, templates, _cfg(), fast=True)
    full = optimize_value(adapter, tok, 1, req, templates, _cfg(), fast=False)
    torch.testing.assert_close(fast.delta, full.delta, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("which", ["full", "suffix"])
def test_selected_requests_give_their_own_logits(make_tiny, which):
    model, tok = make_tiny("llama-bytelevel")
    for p in model.parameters():
        p.requires_grad_(False)
    adapter, batch, full, fast, _, _ = _pair(model, tok, 1, REQS)
    runner = full if which == "full" else fast
    delta = torch.randn(len(REQS), adapter.d_out, generator=torch.Generator().manual_seed(3))
    everything = runner.logits(delta)
    keep = [0, 2]
    picked = [i for i, (r, _) in enumerate(batch.reads) if batch.group[r] in keep]
    part = runner.select(keep)
    assert len(part.batch.seqs) < len(batch.seqs)
    torch.testing.assert_close(part.logits(delta), everything[picked], rtol=1e-5, atol=1e-5)
