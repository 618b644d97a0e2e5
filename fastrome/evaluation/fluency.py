"""Fluency of generated text: ROME's weighted n-gram entropy, and seeded top-k sampling.

``ngram_entropy`` follows ROME's ``n_gram_entropy`` (``compute_n_gram_entropy`` with its defaults):
for each text, the Shannon entropy in bits of its bigram and of its trigram frequency
distributions, ``H2`` and ``H3``, are combined as ``mean(2/3 * H2, 4/3 * H3)``; the result is the
arithmetic mean over texts. ROME tokenises words with ``nltk.word_tokenize``; here words are the
regex matches of ``\\w+|[^\\w\\s]`` (runs of word characters, and each punctuation character), which
agrees with NLTK on plain text and needs no download. A text with fewer than ``n`` words has
``Hn = 0``. Degenerate repetitive generations score low; ROME's GPT-2 XL baseline is about 626.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from fastrome import decoding
from fastrome.tokens import encode

_WORD = re.compile(r"\w+|[^\w\s]")
NS = (2, 3)
WEIGHTS = (2 / 3, 4 / 3)


def words(text: str) -> List[str]:
    """The word tokens n-grams are counted over."""
    return _WORD.findall(text)


def ngram_distribution_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the ``n``-grams of ``tokens`` (0 if none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_ngram_entropy(text: str) -> float:
    """ROME's per-text figure: ``mean(2/3 * H2, 4/3 * H3)``."""
    toks = words(text)
    return sum(w * ngram_distribution_entropy(toks, n) for n, w in zip(NS, WEIGHTS)) / len(NS)


def ngram_entropy(texts: Sequence[str]) -> float:
    """Mean over ``texts`` of :func:`text_ngram_entropy` (ROME's fluency, arithmetic aggregation)."""
    if isinstance(texts, str):
        raise ValueError("texts: expected a list of strings, got a single string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r:.80}")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)


@torch.no_grad()
def generate_for_fluency(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
) -> List[str]:
    """Sample a continuation of each prompt with top-k sampling, reproducibly.

    Prompts are generated one at a time (no padding to get wrong), each with its own generator
    seeded with ``seed + index``, so a prompt's text does not depend on the other prompts' lengths.
    Generation stops at ``max_new_tokens`` or at an end-of-sequence token.

    Returns:
        ``prompt + continuation`` for each prompt (ROME measures fluency on the whole text).
    """
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single string")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    device = model.get_input_embeddings().weight.device
    eos: Optional[int] = getattr(tok, "eos_token_id", None)
    was_training = model.training
    model.eval()
    out: List[str] = []
    try:
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{index}]: expected a string, got {type(prompt).__name__}")
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed) + index)
            ids = torch.tensor([encode(tok, prompt)], dtype=torch.long, device=device)  # (1, t)
            pick = decoding.top_k_sampler(top_k, gen)
            new = decoding.generate(model, ids, max_new_tokens, pick, eos)[0].tolist()
            out.append(prompt + tok.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
