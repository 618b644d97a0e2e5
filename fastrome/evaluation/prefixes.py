"""Test-time context prefixes: short random texts sampled once from the (unedited) model.

Evaluating an edit after such prefixes checks that it holds in context, not only right after the
bare prompt. Prefixes come from :func:`fastrome.templates.generate_templates` (top-k 5 sampling
from neutral openers, seeded), so they are drawn the same way as the editing templates; use a
different ``seed`` from the editor's to keep test prefixes apart from the ones edited with.
"""

from __future__ import annotations

from typing import Any, List

from torch import nn

from fastrome.templates import generate_templates


def test_prefixes(model: nn.Module, tok: Any, n: int = 5, length: int = 5, seed: int = 0) -> List[str]:
    """``n`` prefixes of about ``length`` tokens, each ending with ``"."`` (e.g. ``"The city is big."``).

    Join them to prompts with :func:`fastrome.evaluation.counterfact.prefixed`.
    """
    for name, value in (("n", n), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    templates = generate_templates(model, tok, lengths=((length, n),), seed=seed)
    # Drop the bare "{}" and the " {}" slot; templates look like "<prefix>. {}".
    return [t[: -len("{}")].rstrip() for t in templates[1:]]


test_prefixes.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite the name
