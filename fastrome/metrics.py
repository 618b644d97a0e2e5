"""Evaluation primitives: does a prompt continue with a target, and how perplexed is the model.

Target tokens are taken from the tokenisation of the full string (prompt + " " + target), and
predictions are teacher-forced: a target "is the top continuation" when the model's argmax is the
target's token at every target position.

Full-vocabulary logits are never held for a whole batch: where a model's logits are a plain linear
head of its final hidden states (the Llama family, :data:`fastrome.adapter.PLAIN_HEAD`), the head
runs only at the positions scored, at most :data:`LOGITS_BUDGET` logits at a time; other models'
logits are read a row at a time. At a 128k vocabulary a batch of 16 texts of 1,024 tokens would
otherwise hold 8 GB of fp32 logits, and as much again for their log-softmax.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastrome.adapter import head_split
from fastrome.tokens import encode, pad_id, right_pad, target_ids

LOGITS_BUDGET = 1 << 24  # fp32 logits computed at once (64 MB)

logger = logging.getLogger(__name__)
_warned_head = False


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


def _outputs(model: nn.Module, ids: Tensor, mask: Tensor) -> Tuple[Tensor, Callable[[Tensor], Tensor], int]:
    """``(states, to_logits, vocab)``: final hidden states (b, t, h) and the head as a function giving
    fp32 logits (n, vocab) for rows of them; for a model without a plain head, its logits
    (b, t, vocab) and a cast to fp32. Any failure of the head-only path falls back to the whole
    model, once with a warning."""
    global _warned_head
    split = head_split(model)
    if split is not None:
        body, head = split
        try:
            states = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return states, lambda rows: head(rows.to(head.weight.dtype)).float(), head.weight.shape[0]
        except Exception as exc:  # noqa: BLE001 - any failure: the public whole-model path
            if not _warned_head:
                _warned_head = True
                logger.warning("scoring with the head at scored positions only failed (%s: %s); "
                               "scoring with whole-model logits instead", type(exc).__name__, exc)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits, lambda rows: rows.float(), logits.shape[-1]


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
    states, to_logits, _ = _outputs(model, ids, mask)
    out = []
    for row, (start, tgt) in enumerate(spans):
        pos = torch.arange(start - 1, start - 1 + len(tgt), device=states.device)
        t = torch.tensor(tgt, device=states.device)
        logp = torch.log_softmax(to_logits(states[row, pos]), dim=-1)  # (len(tgt), vocab)
        lp = logp.gather(1, t.unsqueeze(1)).squeeze(1)
        top = logp.argmax(-1) == t
        out.append(TargetScore(lp.tolist(), top.tolist()))
    return out


@torch.no_grad()
def perplexities(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> List[float]:
    """Perplexity of each text: exp of the mean NLL of its tokens after the first."""
    out: List[float] = []
    device = _device(model)
    for i in range(0, len(texts), batch_size):
        seqs = [encode(tokenizer, t) for t in texts[i : i + batch_size]]
        ids, mask = right_pad(seqs, pad_id(tokenizer), device)
        states, to_logits, vocab = _outputs(model, ids, mask)
        step = max(1, LOGITS_BUDGET // vocab)  # positions whose logits are computed at once
        for row, seq in enumerate(seqs):
            out.append(math.exp(_mean_nll(states[row], to_logits, ids[row], len(seq), step)))
    return out


def _mean_nll(states: Tensor, to_logits: Callable[[Tensor], Tensor], ids: Tensor, length: int, step: int) -> float:
    """Mean NLL of tokens 1..length-1 of one row, the head run on ``step`` positions at a time
    (``states``: (t, h) hidden states or (t, vocab) logits of that row)."""
    if length < 2:
        return 0.0
    total = torch.zeros((), dtype=torch.float64, device=states.device)
    for start in range(0, length - 1, step):
        stop = min(start + step, length - 1)
        logp = torch.log_softmax(to_logits(states[start:stop]), dim=-1)
        total += -logp.gather(1, ids[start + 1 : stop + 1].unsqueeze(1)).sum(dtype=torch.float64)
    return float(total) / (length - 1)


def mean_perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> float:
    """Mean over texts of their perplexities (the ME-PPL convention)."""
    values = perplexities(model, tokenizer, texts, batch_size)
    return sum(values) / len(values)
