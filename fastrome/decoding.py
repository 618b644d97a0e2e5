"""Decoding with the model's key/value cache: one step (:func:`step`), under whichever keyword the
installed transformers release uses for the cache (``cache`` from 5.24 on, ``past_key_values``
before; the old name is deprecated there and goes in a later release), and the loop every
generator of fastrome runs (:func:`generate`: greedy completions, fluency samples, templates)."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

_KEYWORD: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def cache_keyword(model: nn.Module) -> str:
    """The keyword of ``model.forward`` that takes the cache (looked up once per model)."""
    kw = _KEYWORD.get(model)
    if kw is None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        kw = "cache" if "cache" in params else "past_key_values"
        _KEYWORD[model] = kw
    return kw


def step(model: nn.Module, ids: Tensor, cache: Optional[Any] = None) -> Tuple[Tensor, Any]:
    """Run ``ids`` (b, t) int64 after ``cache`` (None: from the start).

    Returns:
        The logits (b, t, vocab) in the model's dtype and the cache holding ``ids`` too.
    """
    kwargs = {} if cache is None else {cache_keyword(model): cache}
    out = model(input_ids=ids, use_cache=True, **kwargs)
    new = out.get("cache") if hasattr(out, "get") else None
    if new is None:
        new = out.past_key_values
    return out.logits, new


def generate(model: nn.Module, ids: Tensor, max_new_tokens: int, pick: Callable[[Tensor], Tensor],
             eos: Optional[int] = None) -> Tensor:
    """New tokens after ``ids`` (b, t) int64, one cached step at a time.

    Args:
        pick: the next tokens (b, 1) int64 from the last position's logits (b, vocab).
        eos: stop before a step in which every row picks it (it is not returned).

    Returns:
        (b, n) int64, ``n ≤ max_new_tokens``.
    """
    logits, past = step(model, ids)
    new = []
    for i in range(max_new_tokens):
        nxt = pick(logits[:, -1])
        if eos is not None and bool((nxt == eos).all()):
            break
        new.append(nxt)
        if i + 1 < max_new_tokens:
            logits, past = step(model, nxt, past)
    return torch.cat(new, dim=1) if new else ids.new_empty((ids.shape[0], 0))


def top_k_sampler(k: int, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    """A ``pick`` for :func:`generate`: one of the ``k`` likeliest tokens of each row, drawn with
    probabilities proportional to their softmax (fp32)."""

    def pick(logits: Tensor) -> Tensor:
        top = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
        return top.indices.gather(1, choice)

    return pick


def greedy(logits: Tensor) -> Tensor:
    """A ``pick`` for :func:`generate`: the likeliest token of each row."""
    return logits.argmax(-1, keepdim=True)
