"""The value optimisation: find ``v* = v_init + δ`` that makes the model say the new target.

A free fp32 vector ``δ`` is added to the MLP output at the subject's last token of every prompt:
each context template filled with the request (followed by the target minus its last token) and
the essence prompt ``"{subject} is a"``. The loss is the mean over prompts of the mean per-token
NLL of the target, plus ``kl_factor``·KL(current ‖ initial) of the next-token distribution at the
essence prompt's subject token, plus ``weight_decay``·‖δ‖/‖v_init‖². Adam (lr 0.5) runs until the
loss drops below ``early_stop_loss`` or the step budget is spent; after each step δ is projected
into the ball of radius ``clamp_norm_factor``·‖v_init‖. ``v_init`` is the MLP output at the
unprefixed prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig
from fastrome.keys import input_device
from fastrome.prompts import ESSENCE_TEMPLATE, edit_prompts, subject_prompt
from fastrome.requests import EditRequest
from fastrome.tokens import pad_id, right_pad, target_ids


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


def optimize_value(
    adapter: ModelAdapter,
    tokenizer: Any,
    layer: int,
    request: EditRequest,
    templates: Sequence[str],
    cfg: EditConfig,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> ValueResult:
    """Run the value optimisation for one request at ``layer`` (``cfg`` must be resolved)."""
    if not templates or templates[0] != "{}":
        raise ValueError("templates: the first context template must be the bare '{}'")
    rewrite = edit_prompts(tokenizer, templates, request)
    essence = subject_prompt(tokenizer, ESSENCE_TEMPLATE, request.subject)
    tgt = target_ids(tokenizer, request.text, request.target_text())
    m, n_rewrite = len(tgt), len(rewrite)

    seqs = [list(p.ids) + tgt[:-1] for p in rewrite] + [list(essence.ids)]
    device = input_device(adapter)
    ids, mask = right_pad(seqs, pad_id(tokenizer), device)
    loss_positions = [(r, len(p.ids) - 1 + i) for r, p in enumerate(rewrite) for i in range(m)]
    kl_position = (n_rewrite, essence.last)
    target = torch.tensor(tgt * n_rewrite, device=device)
    rows = torch.arange(n_rewrite + 1)
    cols = torch.tensor([p.last for p in rewrite] + [essence.last])

    module = adapter.module(layer)
    out_device = adapter.device(layer)
    delta = torch.zeros(adapter.d_out, dtype=torch.float32, device=out_device, requires_grad=True)
    state: dict = {"v_init": None}

    def add_delta(mod, args, output):
        r, c = rows.to(output.device), cols.to(output.device)
        if state["v_init"] is None:
            state["v_init"] = output[0, c[0]].detach().float().clone()
        shifted = (output[r, c].float() + delta).to(output.dtype)
        return output.index_put((r, c), shifted)

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    result = ValueResult(v_star=delta, v_init=delta, delta=delta, target_ids=tgt)
    kl_init: Optional[Tensor] = None
    handle = module.register_forward_hook(add_delta)
    try:
        with frozen(adapter.model):
            for it in range(cfg.v_steps):
                opt.zero_grad(set_to_none=True)
                logits = adapter.logits_at(ids, mask, loss_positions + [kl_position])
                logp = torch.log_softmax(logits, dim=-1)
                token_lp = logp[: len(loss_positions)].gather(1, target.unsqueeze(1)).squeeze(1)
                nll = -(token_lp.view(n_rewrite, m).sum(1) / m).mean()
                kl_lp = logp[-1]
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                kl = cfg.kl_factor * (kl_lp.exp() * (kl_lp - kl_init)).sum()
                v_init = state["v_init"]
                decay = cfg.v_weight_decay * delta.norm() / v_init.norm() ** 2
                loss = nll + kl + decay
                result.losses.append(float(loss.detach()))
                result.nll.append(float(nll.detach()))
                if on_step is not None:
                    on_step(it, result.losses[-1])
                if result.losses[-1] < cfg.early_stop_loss:
                    result.early_stopped = True
                    break
                if it == cfg.v_steps - 1:
                    break
                loss.backward()
                opt.step()
                result.steps += 1
                with torch.no_grad():
                    limit = cfg.clamp_norm_factor * v_init.norm()
                    norm = delta.norm()
                    if norm > limit:
                        delta.mul_(limit / norm)
    finally:
        handle.remove()
    final = delta.detach().clone()
    result.v_init = state["v_init"]
    result.delta = final
    result.v_star = state["v_init"] + final
    return result
