"""The value optimisation: find ``v* = v_init + δ`` that makes the model say the new target.

A free fp32 vector ``δ`` is added to the MLP output at the subject's last token of every prompt:
each context template filled with the request (followed by the target minus its last token) and
the essence prompt ``"{subject} is a"``. The loss is the mean over prompts of the mean per-token
NLL of the target, plus ``kl_factor``·KL(current ‖ initial) of the next-token distribution at the
essence prompt's subject token, plus ``weight_decay``·‖δ‖/‖v_init‖². Adam (lr 0.5) runs until the
loss drops below ``early_stop_loss``, until the target has been the top prediction at every
templated prompt (with at least ``mpes_min_prob`` probability at each target token) for
``mpes_checks`` consecutive checks (when set), or until the step budget is
spent; after each step δ is projected
into the ball of radius ``clamp_norm_factor``·‖v_init‖. ``v_init`` is the MLP output at the
unprefixed prompt.

The model is evaluated by a runner (:mod:`fastrome.runners`): by default the suffix fast path,
which runs only the layers above the edited one on the tokens from the subject's last token on.
Several requests can be optimised in one batch (:func:`optimize_values`), each with its own ``δ``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig
from fastrome.prompts import ESSENCE_TEMPLATE, edit_prompts, subject_prompt
from fastrome.requests import EditRequest
from fastrome.runners import make_runner, row_batch
from fastrome.tokens import pad_id, target_ids


@dataclass
class ValueResult:
    """Outcome of the optimisation. Vectors are fp32 of shape (d_out,)."""

    v_star: Tensor
    v_init: Tensor
    delta: Tensor
    target_ids: List[int]
    losses: List[float] = field(default_factory=list)
    nll: List[float] = field(default_factory=list)
    steps: int = 0
    early_stopped: bool = False
    stop_reason: str = "steps"  # "loss" (below early_stop_loss), "top" (most-probable early stopping) or "steps"
    runner: str = ""

    @property
    def final_target_prob(self) -> float:
        """exp(−mean NLL) at the last evaluation: the average per-token probability of the target."""
        return float(torch.tensor(-self.nll[-1]).exp()) if self.nll else float("nan")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; restores both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _request_rows(tokenizer: Any, request: EditRequest, templates: Sequence[str]):
    """(seqs, subject_last, reads per row, target ids) of one request: every context template filled
    with the request followed by the target minus its last token (reads: the target's positions),
    then the essence prompt (read: its subject's last token, for the KL term)."""
    rewrite = edit_prompts(tokenizer, templates, request)
    essence = subject_prompt(tokenizer, ESSENCE_TEMPLATE, request.subject)
    tgt = target_ids(tokenizer, request.text, request.target_text())
    m = len(tgt)
    seqs = [list(p.ids) + tgt[:-1] for p in rewrite] + [list(essence.ids)]
    last = [p.last for p in rewrite] + [essence.last]
    reads = [list(range(len(p.ids) - 1, len(p.ids) - 1 + m)) for p in rewrite] + [[essence.last]]
    return seqs, last, reads, tgt


def check_request(tokenizer: Any, request: EditRequest, templates: Sequence[str]) -> None:
    """Raise ``ValueError`` if any row the value optimisation would build for ``request`` cannot be
    tokenised (the subject lost under a context template, an empty target): cheap, and done for
    every request of a call before any of them is written."""
    _request_rows(tokenizer, request, templates)


def optimize_value(
    adapter: ModelAdapter,
    tokenizer: Any,
    layer: int,
    request: EditRequest,
    templates: Sequence[str],
    cfg: EditConfig,
    on_step: Optional[Callable[[int, float], None]] = None,
    fast: bool = True,
) -> ValueResult:
    """Run the value optimisation for one request at ``layer`` (``cfg`` must be resolved)."""
    return optimize_values(adapter, tokenizer, layer, [request], templates, cfg, on_step, fast)[0]


class _LossIndex:
    """Where each loss term reads in the logits of a batch holding the rows of ``groups``.

    Rewrite reads carry a target token and the weight 1/(m·rows) that makes their sum the mean over
    rows of each row's mean token NLL; each request's essence read feeds its KL term. Reads are
    numbered in row order, which is group order, as :class:`~fastrome.runners.RowBatch` lays them out.
    """

    def __init__(self, parts: Sequence[tuple], groups: Sequence[int], device: torch.device):
        reads, tokens, weight, group, essence = [], [], [], [], []
        read_no = 0
        for g in groups:
            _, _, row_reads, tgt = parts[g]
            m, rows = len(tgt), len(row_reads) - 1
            for _cols in row_reads[:-1]:
                for i in range(m):
                    reads.append(read_no)
                    tokens.append(tgt[i])
                    weight.append(1.0 / (m * rows))
                    group.append(g)
                    read_no += 1
            essence.append(read_no)
            read_no += 1
        self.reads = torch.tensor(reads, device=device)
        self.tokens = torch.tensor(tokens, device=device)
        self.weight = torch.tensor(weight, device=device, dtype=torch.float32)
        self.group = torch.tensor(group, device=device)
        self.essence = torch.tensor(essence, device=device)
        self.essence_group = torch.tensor(list(groups), device=device)


def _on_top(logp: Tensor, index: _LossIndex, n_req: int, min_prob: float) -> Tensor:
    """(n_req,) bool: the target is the top prediction at every one of its tokens in every templated
    prompt of the request (and has at least ``min_prob`` there, when set). ``logp`` is (reads, vocab)
    log-probabilities of the batch laid out as ``index`` says; requests not in it count as on top."""
    read = logp[index.reads]
    missed = read.argmax(-1) != index.tokens
    if min_prob:
        missed |= read.gather(1, index.tokens[:, None]).squeeze(1) < math.log(min_prob)
    return torch.zeros(n_req, device=logp.device).index_add(0, index.group, missed.float()) == 0


def _least_scale(runner: Any, delta: Tensor, groups: List[int], index: _LossIndex, n_req: int,
                 cfg: EditConfig, rounds: int = 6) -> Tensor:
    """For each request in ``groups`` (whose δ meets the most-probable early-stopping condition), the
    smallest scale s in (0, 1] found by bisection at which s·δ still meets it: (len(groups),) fp32.

    A step of the optimisation overshoots what the condition needs (Adam's steps are long), and the
    write's size grows with ‖δ‖², so the scale is searched with ``rounds`` forward passes (no gradient)
    and only a scale at which the condition was seen to hold is returned (1 if none smaller does)."""
    lo = torch.zeros(len(groups), device=delta.device)
    hi = torch.ones(len(groups), device=delta.device)
    for _ in range(rounds):
        mid = (lo + hi) / 2
        trial = delta.clone()
        trial[groups] *= mid[:, None]
        logp = torch.log_softmax(runner.logits(trial).to(delta.device), dim=-1)
        ok = _on_top(logp, index, n_req, cfg.mpes_min_prob)[groups]
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return hi


def optimize_values(
    adapter: ModelAdapter,
    tokenizer: Any,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    cfg: EditConfig,
    on_step: Optional[Callable[[int, float], None]] = None,
    fast: bool = True,
) -> List[ValueResult]:
    """Optimise the values of independent ``requests`` at ``layer`` together, all against the current
    weights: one batch holds every request's prompts and ``δ`` is (len(requests), d_out).

    Each request's loss depends only on its own row of ``δ`` and Adam is elementwise, so every
    request follows the trajectory it would follow alone (up to floating-point rounding); a request
    that meets ``early_stop_loss``, or with ``cfg.mpes_checks = m > 0`` has had its target as the
    teacher-forced top prediction at every token of every templated prompt for m consecutive checks
    (most-probable early stopping: a smaller δ, so a smaller write), is frozen and leaves the batch
    while the others go on. ``fast`` allows the suffix
    runner (see :mod:`fastrome.runners`). ``on_step(step, mean loss of the active requests)``.
    """
    if not templates or templates[0] != "{}":
        raise ValueError("templates: the first context template must be the bare '{}'")
    if not requests:
        return []
    parts = [_request_rows(tokenizer, req, templates) for req in requests]
    batch = row_batch([(seqs, last, reads) for seqs, last, reads, _ in parts])
    n_req = len(requests)
    runner, v_init = make_runner(adapter, layer, batch, pad_id(tokenizer), fast=fast)

    dev = v_init.device
    index = _LossIndex(parts, range(n_req), dev)
    delta = torch.zeros(n_req, adapter.d_out, dtype=torch.float32, device=dev, requires_grad=True)
    # Adam moves every coordinate by about v_lr per step (a dense, sign-like step of norm up to
    # v_lr·√d); "normalized" takes steps of that same length along the gradient itself, which for
    # gradients concentrated in few coordinates reaches the target with a much smaller δ
    opt = torch.optim.Adam([delta], lr=cfg.v_lr) if cfg.v_optimizer == "adam" else None
    step_len = cfg.v_lr * math.sqrt(adapter.d_out)
    v_norm = v_init.norm(dim=1)
    results = [
        ValueResult(v_star=v_init[g], v_init=v_init[g], delta=v_init[g], target_ids=list(parts[g][3]))
        for g in range(n_req)
    ]
    active = torch.ones(n_req, dtype=torch.bool, device=dev)
    streak = [0] * n_req  # consecutive checks with the target on top (most-probable early stopping)
    kl_init: Optional[Tensor] = None
    with frozen(adapter.model):
        for it in range(cfg.v_steps):
            delta.grad = None
            logits = runner.logits(delta).to(dev)
            logp = torch.log_softmax(logits, dim=-1)
            token_lp = logp[index.reads].gather(1, index.tokens[:, None]).squeeze(1)
            nll = torch.zeros(n_req, device=dev).index_add(0, index.group, -token_lp * index.weight)
            kl_lp = logp[index.essence]
            if kl_init is None:  # the first step has every request in the batch
                kl_init = kl_lp.detach().clone()
            kl_each = (kl_lp.exp() * (kl_lp - kl_init[index.essence_group])).sum(1)
            kl = cfg.kl_factor * torch.zeros(n_req, device=dev).index_add(0, index.essence_group, kl_each)
            decay = cfg.v_weight_decay * delta.norm(dim=1) / v_norm**2
            loss = nll + kl + decay
            values, nlls = loss.detach().tolist(), nll.detach().tolist()
            if cfg.mpes_checks:
                on_top = _on_top(logp.detach(), index, n_req, cfg.mpes_min_prob).tolist()
            stopping = []
            for g in range(n_req):
                if not active[g]:
                    continue
                results[g].losses.append(values[g])
                results[g].nll.append(nlls[g])
                if cfg.mpes_checks:
                    streak[g] = streak[g] + 1 if on_top[g] else 0
                if values[g] < cfg.early_stop_loss:
                    results[g].early_stopped, results[g].stop_reason = True, "loss"
                    stopping.append(g)
                elif cfg.mpes_checks and streak[g] >= cfg.mpes_checks:
                    results[g].early_stopped, results[g].stop_reason = True, "top"
                    stopping.append(g)
            shrink = [g for g in stopping if results[g].stop_reason == "top"] if cfg.mpes_shrink else []
            if shrink:
                with torch.no_grad():
                    delta[shrink] *= _least_scale(runner, delta.detach(), shrink, index, n_req, cfg)[:, None]
            if on_step is not None:
                live = [values[g] for g in range(n_req) if active[g]]
                on_step(it, sum(live) / len(live))
            if stopping:
                active[stopping] = False
            if not bool(active.any()) or it == cfg.v_steps - 1:
                break
            if stopping:  # requests that are done leave the batch: later steps skip their rows
                live_groups = [g for g in range(n_req) if active[g]]
                runner = runner.select(live_groups)
                index = _LossIndex(parts, live_groups, dev)
            kept = delta.detach()[~active].clone()
            (loss * active).sum().backward()
            if opt is not None:
                opt.step()
            else:  # normalised gradient descent: each request's δ moves by step_len along its own gradient
                with torch.no_grad():
                    grad = delta.grad
                    delta -= step_len * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            with torch.no_grad():
                delta[~active] = kept  # Adam's momentum would still move frozen rows
                limit = cfg.clamp_norm_factor * v_norm
                norm = delta.norm(dim=1)
                scale = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
                delta.mul_(torch.where(active, scale, torch.ones_like(scale))[:, None])
            for g in range(n_req):
                if active[g]:
                    results[g].steps += 1
    final = delta.detach().clone()
    for g, res in enumerate(results):
        res.delta = final[g].clone()
        res.v_star = v_init[g] + res.delta
        res.runner = runner.name
    return results
