"""zsRE evaluation (MEND-prepared file): token-level teacher-forced accuracy.

For a prompt and an answer, the answer is scored as ``" " + answer`` after the prompt, and the
accuracy is the fraction of the answer's tokens that are the model's argmax given the prompt and
the gold answer tokens before them (ROME's zsRE metric). Figures:

- ``efficacy``: ``src`` → ``alt`` (the new answer).
- ``paraphrase``: ``rephrase`` → ``alt``.
- ``specificity``: ``loc + "?"`` → ``loc_ans`` (the ``loc`` questions carry no question mark; ROME
  appends one). This is an absolute accuracy: specificity proper is whether it is unchanged by an
  edit, so the caller compares the value before and after editing.
- with ``prefixes``: ``efficacy_prefixed`` and ``paraphrase_prefixed``, averaged over prefixes
  (prompts joined as in :func:`fastrome.evaluation.counterfact.prefixed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from torch import nn

from fastrome.evaluation.counterfact import (
    CounterFactCases,
    PathLike,
    check_prefixes,
    load_cases,
    prefixed,
)
from fastrome.metrics import score_targets
from fastrome.requests import EditRequest, parse_requests


@dataclass(frozen=True)
class ZsreCase:
    """One zsRE record: the edit (``src`` with the subject as ``{}``, new answer ``alt``) and its probes."""

    case_id: int  # index of the record in the file
    request: EditRequest
    src: str
    rephrase: str
    loc: str
    loc_ans: str
    answers: Tuple[str, ...] = ()

    @property
    def alt(self) -> str:
        return self.request.target_new


class ZsreCases(CounterFactCases):
    """A list of :class:`ZsreCase` with ``skipped``: ``(record index, reason)`` of bad records."""


def _field(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r:.80}")
    return value.strip()


def parse_zsre(record: Any, index: int) -> ZsreCase:
    """One zsRE record as a :class:`ZsreCase`; ``ValueError`` says what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a mapping, got {type(record).__name__}")
    src, subject, alt = _field(record, "src"), _field(record, "subject"), _field(record, "alt")
    rephrase, loc, loc_ans = _field(record, "rephrase"), _field(record, "loc"), _field(record, "loc_ans")
    answers = record.get("answers") or []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers: expected a list of strings, got {answers!r:.80}")
    if subject not in src:
        raise ValueError(f"subject: {subject!r} does not occur in src {src!r}")
    true = answers[0].strip() if answers else None
    if true is not None and true == alt:
        raise ValueError(f"alt: {alt!r} equals the current answer answers[0]; the edit would change nothing")
    request = parse_requests([{"prompt": src, "subject": subject, "target_new": alt, "case_id": index}])[0]
    request = EditRequest(request.prompt, request.subject, request.target_new, true, index, None, {})
    return ZsreCase(index, request, src, rephrase, loc, loc_ans, tuple(answers))


def load_zsre(path: PathLike, limit: Optional[int] = None) -> ZsreCases:
    """Read a MEND-prepared zsRE file (``src``, ``subject``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``).

    Returns the good cases as a list with ``.skipped``: ``(record index, reason)`` for each bad record
    (missing or empty fields, subject not in ``src``, ``alt`` equal to ``answers[0]``).

    Raises:
        ValueError: the file cannot be read or is not a JSON list.
    """
    return load_cases(path, limit, "zsRE", parse_zsre, ZsreCases())


def loc_prompt(loc: str) -> str:
    """The specificity prompt: the ``loc`` question with a question mark, as ROME builds it."""
    return loc if loc.endswith("?") else loc + "?"


def evaluate_zsre_case(
    model: nn.Module, tok: Any, case: ZsreCase, prefixes: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """Token accuracies of one zsRE case (see the module docstring), from one right-padded batch of
    ``3 + 2 * len(prefixes)`` rows. Returns a JSON-serialisable dict."""
    if not isinstance(case, ZsreCase):
        raise ValueError(f"case: expected a ZsreCase, got {type(case).__name__}")
    prefix_list = check_prefixes(prefixes)
    prompts = [case.src, case.rephrase, loc_prompt(case.loc)]
    targets = [case.alt, case.alt, case.loc_ans]
    for pre in prefix_list:
        prompts += [prefixed(pre, case.src), prefixed(pre, case.rephrase)]
        targets += [case.alt, case.alt]
    scores = score_targets(model, tok, prompts, targets)
    acc = [sum(s.top) / len(s.top) for s in scores]
    out: Dict[str, Any] = {
        "case_id": case.case_id,
        "efficacy": acc[0],
        "paraphrase": acc[1],
        "specificity": acc[2],
    }
    if prefix_list:
        out["efficacy_prefixed"] = sum(acc[3::2]) / len(prefix_list)
        out["paraphrase_prefixed"] = sum(acc[4::2]) / len(prefix_list)
        out["n_prefixes"] = len(prefix_list)
    return out
