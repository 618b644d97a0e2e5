"""Context templates: ``"{}"`` plus short random prefixes sampled once from the unedited model.

Each prefix is sampled with top-k 5 from one of a few neutral openers, cleaned (braces removed,
white space collapsed) and closed with ``". {}"``. Sampling is seeded and the result is cached on
disk per model fingerprint, so runs are reproducible and sequential edits share the same
templates. Reference setting: 10 prefixes of 5 tokens and 10 of 10 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastrome import decoding, tokens
from fastrome.cache import write_json

OPENERS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5


@torch.no_grad()
def _sample(model: nn.Module, ids: torch.Tensor, n_new: int, generator: torch.Generator) -> torch.Tensor:
    """Append ``n_new`` top-k-sampled tokens to every row of ``ids`` (b, t) using the KV cache."""
    new = decoding.generate(model, ids, n_new, decoding.top_k_sampler(TOP_K, generator))
    return torch.cat([ids, new], dim=1)


def _clean(text: str) -> str:
    return " ".join(text.replace("{", " ").replace("}", " ").split())


def generate_templates(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[Tuple[int, int]] = ((5, 10), (10, 10)),
    seed: int = 0,
) -> List[str]:
    """Sample context templates from ``model`` (which should be unedited).

    Args:
        lengths: (tokens, count) pairs: ``count`` prefixes of about ``tokens`` tokens each.
        seed: sampling seed.

    Returns:
        ``["{}", "<prefix>. {}", ...]`` with ``1 + sum(count)`` entries.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    was_training = model.training
    model.eval()
    templates = ["{}"]
    try:
        for n_tokens, count in lengths:
            for j, opener in enumerate(OPENERS):
                # Spread ``count`` prefixes over the openers; a group of equal prompts needs no padding.
                share = count // len(OPENERS) + (1 if j < count % len(OPENERS) else 0)
                if share == 0:
                    continue
                start = tokens.encode(tokenizer, opener)
                n_new = max(1, n_tokens - (len(start) - tokens.special_counts(tokenizer)[0]))
                ids = torch.tensor([start] * share, dtype=torch.long, device=device)
                out = _sample(model, ids, n_new, generator)
                for row in out.tolist():
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    templates.append(_clean(text) + ". {}")
    finally:
        model.train(was_training)
    return templates


def load_or_generate(
    model: nn.Module,
    tokenizer: Any,
    model_fingerprint: str,
    lengths: Sequence[Tuple[int, int]],
    seed: int,
    cache_root: Optional[Path],
) -> List[str]:
    """Templates from the cache when present for (model, lengths, seed), else generated and cached."""
    key = "-".join(f"{n}x{c}" for n, c in lengths)
    path = None
    if cache_root is not None:
        path = Path(cache_root) / "templates" / f"{model_fingerprint}_seed{seed}_{key}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                cached = data.get("templates")
                if (
                    isinstance(cached, list)
                    and cached
                    and all(isinstance(t, str) and t.endswith("{}") for t in cached)
                ):
                    return cached
            except (OSError, ValueError):
                pass  # unreadable cache entry: regenerate and overwrite it
    templates = generate_templates(model, tokenizer, lengths, seed)
    if path is not None:
        write_json(path, {"model": model_fingerprint, "seed": seed, "lengths": list(lengths), "templates": templates})
    return templates
