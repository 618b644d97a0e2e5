"""One edit per case: edit, score, undo — ROME's evaluation protocol for CounterFact and zsRE.

Every case starts from the same weights: the edit is undone bit for bit (``Editor.undo_last``)
before the next case. A refused edit is scored as it stands (nothing written) and marked.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from fastrome.evaluation.counterfact import CounterFactCase, evaluate_case
from fastrome.evaluation.fluency import generate_for_fluency, ngram_entropy
from fastrome.evaluation.zsre import ZsreCase, evaluate_zsre_case


def score_case(model: Any, tok: Any, case: Any, prefixes: Sequence[str] = (), fluency: int = 0,
               seed: int = 0) -> Dict[str, Any]:
    """The case's figures on the model as it is now (CounterFact or zsRE by the case's type); with
    ``fluency > 0`` also the n-gram entropy of that many sampled generations (CounterFact cases
    with generation prompts only)."""
    if isinstance(case, ZsreCase):
        return evaluate_zsre_case(model, tok, case, prefixes=list(prefixes))
    if not isinstance(case, CounterFactCase):
        raise ValueError(f"case: expected a CounterFactCase or ZsreCase, got {type(case).__name__}")
    out = evaluate_case(model, tok, case, prefixes=list(prefixes))
    if fluency and case.generation_prompts:
        texts = generate_for_fluency(model, tok, list(case.generation_prompts[:fluency]), seed=seed)
        out["fluency"] = ngram_entropy(texts)
    return out


def evaluate_edits(
    editor: Any,
    cases: Sequence[Any],
    *,
    edit: bool = True,
    prefixes: Sequence[str] = (),
    fluency: int = 0,
    seed: int = 0,
    on_case: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> List[Dict[str, Any]]:
    """Per-case results: each case edited through ``editor`` (unless ``edit=False``: the unedited
    model's figures), scored, and undone. ``on_case`` sees each result as it is made."""
    results = []
    for case in cases:
        status, reasons = "unedited", []
        if edit:
            report = editor.edit(case.request)
            rec = report.records[0]
            status, reasons = rec.status, list(rec.reasons)
        row = score_case(editor.model, editor.tokenizer, case, prefixes, fluency, seed)
        row["edit_status"] = status
        if reasons:
            row["edit_reasons"] = reasons
        if edit and rec.applied:
            row["edit_seconds"] = rec.total_seconds
            editor.undo_last(1)
        results.append(row)
        if on_case is not None:
            on_case(row)
    return results
