"""ROME as its original code runs it, as the baseline every per-edit benchmark is measured against.

For one request at one layer (the MLP down projection):

1. Left vector: the key ``k̄`` is the mean, over the context templates, of the down projection's
   input at the subject's last token; ``u = C⁻¹k̄ / ‖C⁻¹k̄‖`` with ``C⁻¹`` an explicit fp32 inverse
   (taken once per layer and kept).
2. Value: ``δ`` is added to the down projection's output at the subject's last token of every
   rewrite prompt (template + prompt + target minus its last token) and of the ``"{subject} is a"``
   prompt; each step is a forward of the *whole* model over the padded batch, logits at every
   position, then a backward through it. Loss: mean target NLL + KL at the essence prompt + weight
   decay; Adam, norm clamp and early stop as published.
3. Right vector: ``(v* − W k) / (kᵀu)`` with ``k`` the unprefixed key (``original``, the published
   code) or ``k̄`` (``consistent``); ``W += right ⊗ u`` in place.

Prompts, targets and templates are tokenised with fastrome's helpers so that the baseline and
fastrome optimise exactly the same objective; everything else is written out here independently
of fastrome's engine. No guards: the baseline writes whatever it computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig
from fastrome.prompts import ESSENCE_TEMPLATE, edit_prompts, subject_prompt
from fastrome.requests import EditRequest, RequestLike, parse_requests
from fastrome.tokens import pad_id, right_pad, target_ids

MODES = ("original", "consistent")


@dataclass
class RomeResult:
    """One reference edit: the vectors (fp32), the optimisation trace and the time per phase."""

    u: Tensor
    right: Tensor
    v_star: Tensor
    denom: float
    losses: List[float] = field(default_factory=list)
    steps: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)


class ReferenceRome:
    """The published ROME procedure on ``model`` (edited in place).

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        layer: the edited layer.
        second_moment: (d_in, d_in) key second moment ``C`` of that layer.
        templates: context templates, ``"{}"`` first (use the same ones as the compared editor).
        mode: ``"original"`` (published) or ``"consistent"``.
        config: value-optimisation settings (``EditConfig``; family defaults are filled in);
            ``ridge`` is added to ``C``'s diagonal (relative to its mean) before the inverse.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: int,
        second_moment: Tensor,
        templates: Sequence[str],
        mode: str = "original",
        config: Optional[EditConfig] = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if not templates or templates[0] != "{}":
            raise ValueError("templates: the first context template must be the bare '{}'")
        self.adapter = ModelAdapter(model)
        self.adapter.check_layer(layer)
        d = self.adapter.d_in
        if tuple(second_moment.shape) != (d, d):
            raise ValueError(f"second_moment: expected ({d}, {d}), got {tuple(second_moment.shape)}")
        self.model, self.tokenizer, self.layer, self.mode = model, tokenizer, layer, mode
        self.templates = list(templates)
        self.cfg = (config or EditConfig()).resolve(self.adapter.family)
        C = second_moment.to(torch.float32)
        ridge = self.cfg.ridge * float(C.diagonal().abs().mean())
        device = self.adapter.device(layer)
        t0 = time.perf_counter()
        self.inverse = torch.inverse(C + ridge * torch.eye(d, dtype=torch.float32, device=C.device)).to(device)
        self.inverse_seconds = time.perf_counter() - t0

    @property
    def module(self) -> nn.Module:
        return self.adapter.module(self.layer)

    def _io_at(self, seqs: List[List[int]], positions: List[int]):
        """(inputs, outputs) of the down projection at each row's position, fp32, one forward."""
        device = self.model.get_input_embeddings().weight.device
        ids, mask = right_pad(seqs, pad_id(self.tokenizer), device)
        got: Dict[str, Tensor] = {}
        rows = torch.arange(len(seqs))

        def hook(mod, args, output):
            got["k"] = args[0][rows, positions].detach().float()
            got["v"] = output[rows, positions].detach().float()

        handle = self.module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
        return got["k"], got["v"]

    def edit(self, request: RequestLike) -> RomeResult:
        (req,) = parse_requests([request])
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            return self._edit(req)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _edit(self, req: EditRequest) -> RomeResult:
        seconds: Dict[str, float] = {}
        tok = self.tokenizer
        prompts = edit_prompts(tok, self.templates, req)

        t0 = time.perf_counter()
        keys, _ = self._io_at([list(p.ids) for p in prompts], [p.last for p in prompts])
        k_mean, k_plain = keys.mean(0), keys[0]
        u = self.inverse @ k_mean.to(self.inverse.device)
        u = u / u.norm()
        seconds["keys"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        v_star, losses, steps = self._value(req, prompts)
        seconds["values"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        key = k_plain if self.mode == "original" else k_mean
        weight = self.adapter.weight(self.layer)
        bias = self.adapter.bias(self.layer)
        current = weight.detach().float() @ key
        if bias is not None:
            current = current + bias.detach().float()
        denom = float(key @ u)
        right = (v_star - current) / denom
        with torch.no_grad():
            weight += torch.outer(right, u).to(weight.dtype)
        seconds["write"] = time.perf_counter() - t0
        return RomeResult(u=u, right=right, v_star=v_star, denom=denom, losses=losses, steps=steps, seconds=seconds)

    def _value(self, req: EditRequest, prompts) -> tuple:
        cfg, tok = self.cfg, self.tokenizer
        tgt = target_ids(tok, req.text, req.target_text())
        essence = subject_prompt(tok, ESSENCE_TEMPLATE, req.subject)
        seqs = [list(p.ids) + tgt[:-1] for p in prompts] + [list(essence.ids)]
        lookup = [p.last for p in prompts] + [essence.last]
        device = self.model.get_input_embeddings().weight.device
        ids, mask = right_pad(seqs, pad_id(tok), device)
        n = len(prompts)
        # targets laid out over the full (rows, positions) grid, -100 where no loss is read
        labels = torch.full(ids.shape, -100, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            start = len(p.ids) - 1
            labels[r, start : start + len(tgt)] = torch.tensor(tgt, device=device)
        rows = torch.arange(n + 1)
        cols = torch.tensor(lookup)
        delta = torch.zeros(self.adapter.d_out, dtype=torch.float32, device=device, requires_grad=True)
        state: Dict[str, Tensor] = {}

        def add_delta(mod, args, output):
            if "v_init" not in state:
                state["v_init"] = output[0, lookup[0]].detach().float().clone()
            out = output.clone()
            out[rows, cols] = (output[rows, cols].float() + delta).to(output.dtype)
            return out

        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        kl_init: Optional[Tensor] = None
        losses: List[float] = []
        steps = 0
        handle = self.module.register_forward_hook(add_delta)
        try:
            for it in range(cfg.v_steps):
                opt.zero_grad()
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # (rows, t, vocab)
                logp = torch.log_softmax(logits, dim=2)
                picked = torch.gather(logp[:n], 2, labels[:n].clamp(min=0).unsqueeze(2)).squeeze(2)
                read = (labels[:n] != -100).float()
                nll = -((picked * read).sum(1) / len(tgt)).mean()
                kl_lp = logp[n, essence.last]
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                kl = cfg.kl_factor * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="sum")
                decay = cfg.v_weight_decay * delta.norm() / state["v_init"].norm() ** 2
                loss = nll + kl + decay
                losses.append(float(loss.detach()))
                if losses[-1] < cfg.early_stop_loss or it == cfg.v_steps - 1:
                    break
                loss.backward()
                opt.step()
                steps += 1
                with torch.no_grad():
                    limit = cfg.clamp_norm_factor * state["v_init"].norm()
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
        finally:
            handle.remove()
        return state["v_init"] + delta.detach(), losses, steps


def reference_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[RequestLike],
    layer: int,
    second_moment: Tensor,
    templates: Sequence[str],
    mode: str = "original",
    config: Optional[EditConfig] = None,
) -> List[RomeResult]:
    """Apply ``requests`` one after another with :class:`ReferenceRome`."""
    rome = ReferenceRome(model, tokenizer, layer, second_moment, templates, mode, config)
    return [rome.edit(r) for r in requests]
