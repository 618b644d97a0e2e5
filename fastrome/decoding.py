"""One decoding step with the model's key/value cache, under whichever keyword the installed
transformers release uses for it (``cache`` from 5.24 on, ``past_key_values`` before; the old name
is deprecated there and goes in a later release)."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Optional, Tuple

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
