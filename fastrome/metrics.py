"""Evaluation primitives: does a prompt continue with a target, and how perplexed is the model.

Target tokens are taken from the tokenisation of the full string (prompt + " " + target), and
predictions are teacher-forced: a target "is the top continuation" when the model's argmax is the
target's token at every target position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
from torch import nn

from fastrome.tokens import encode, pad_id, right_pad, target_ids


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced scores of one target after one prompt."""

    logprobs: List[float]  # per target token
    top: List[bool]  # argmax == target token, per position

    @property
    def is_top(self) -> bool:
        return all(self.top)

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def score_targets(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]
) -> List[TargetScore]:
    """Score ``targets[i]`` (a leading space is added if missing) after ``prompts[i]``, batched."""
    seqs, spans = [], []
    for prompt, target in zip(prompts, targets):
        text = target if target[:1].isspace() else " " + target
        pre = encode(tokenizer, prompt)
        tgt = target_ids(tokenizer, prompt, text)
        seqs.append(pre + tgt)
        spans.append((len(pre), tgt))
    ids, mask = right_pad(seqs, pad_id(tokenizer), _device(model))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for row, (start, tgt) in enumerate(spans):
        pos = torch.arange(start - 1, start - 1 + len(tgt), device=logp.device)
        t = torch.tensor(tgt, device=logp.device)
        lp = logp[row, pos].gather(1, t.unsqueeze(1)).squeeze(1)
        top = logp[row, pos].argmax(-1) == t
        out.append(TargetScore(lp.tolist(), top.tolist()))
    return out


def is_top_continuation(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> bool:
    """Whether greedy decoding after ``prompt`` produces ``target`` (teacher-forced argmax)."""
    return score_targets(model, tokenizer, [prompt], [target])[0].is_top


@torch.no_grad()
def perplexities(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> List[float]:
    """Perplexity of each text: exp of the mean NLL of its tokens after the first."""
    out: List[float] = []
    device = _device(model)
    for i in range(0, len(texts), batch_size):
        seqs = [encode(tokenizer, t) for t in texts[i : i + batch_size]]
        ids, mask = right_pad(seqs, pad_id(tokenizer), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
        valid = mask[:, 1:].float()
        per_text = (nll * valid).sum(1) / valid.sum(1).clamp(min=1)
        out += [math.exp(x) for x in per_text.tolist()]
    return out


def mean_perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> float:
    """Mean over texts of their perplexities (the ME-PPL convention)."""
    values = perplexities(model, tokenizer, texts, batch_size)
    return sum(values) / len(values)
