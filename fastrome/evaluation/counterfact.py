"""CounterFact evaluation with ROME's metrics.

Two file layouts are read, detected per record:

- MEND layout (``counterfact_dev.json``): ``requested_rewrite`` plus one ``rephrase_prompt`` and
  one ``locality_prompt`` whose expected answer is ``locality_ground_truth``.
- ROME layout (``counterfact_full_dev.json``): ``paraphrase_prompts`` (list),
  ``neighborhood_prompts`` (list; their expected answer is the case's ``target_true``) and
  ``generation_prompts``.

Metric definitions (all from teacher-forced scores of :func:`fastrome.metrics.score_targets`; a
target is scored as ``" " + target`` after the prompt, ``NLL`` is the mean per-token negative
log-likelihood of the target's tokens, and ``p = exp(-NLL)`` is their geometric-mean token
probability, as in ROME's summaries):

- ``efficacy_score``: ``NLL(new) < NLL(true)`` on the rewrite prompt (1.0 or 0.0).
- ``efficacy_magnitude``: ``p(new) - p(true)`` on the rewrite prompt.
- ``efficacy_top1``: every token of the new target is the model's argmax given the gold prefix.
- ``paraphrase_score`` / ``paraphrase_magnitude`` / ``paraphrase_top1``: the same, averaged over
  the paraphrase prompts.
- ``neighborhood_score`` (ROME's NS): fraction of neighbourhood prompts where
  ``NLL(answer) < NLL(new)``; ``neighborhood_magnitude``: mean of ``p(answer) - p(new)``.
- ``locality_top1`` (MEND layout only): fraction of locality prompts whose ground truth's first
  token is the model's greedy (argmax) next token.
- with ``prefixes``: ``efficacy_*_prefixed`` and ``paraphrase_*_prefixed`` are the same figures on
  :func:`prefixed` prompts, averaged over prompts × prefixes.

All scores of one case come from one right-padded forward batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from fastrome.metrics import TargetScore, score_targets
from fastrome.requests import EditRequest, parse_requests

PathLike = Union[str, Path]


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact case, normalised from either layout."""

    case_id: Any
    request: EditRequest
    target_true: str
    paraphrase_prompts: Tuple[str, ...]
    # (prompt, expected answer) pairs: locality prompts (MEND layout) or neighbourhood prompts (ROME layout).
    neighborhood: Tuple[Tuple[str, str], ...]
    generation_prompts: Tuple[str, ...] = ()
    layout: str = "rome"  # "rome" or "mend"; "mend" cases also report locality_top1

    @property
    def target_new(self) -> str:
        return self.request.target_new

    @property
    def prompt(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.request.text


class CounterFactCases(list):
    """A list of :class:`CounterFactCase` with ``skipped``: ``(record index, reason)`` of bad records."""

    def __init__(self, cases: Sequence[CounterFactCase] = (), skipped: Sequence[Tuple[int, str]] = ()) -> None:
        super().__init__(cases)
        self.skipped: List[Tuple[int, str]] = list(skipped)


def read_json_list(path: PathLike, what: str) -> List[Any]:
    """The JSON array in ``path``; ``ValueError`` naming the file when it cannot be read as one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"path: cannot read {what} file {str(p)!r}: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"path: {what} file {str(p)!r} holds a {type(data).__name__}, expected a JSON list of records")
    return data


def check_limit(limit: Optional[int]) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit: expected None or a non-negative int, got {limit!r}")


def _str_list(value: Any, name: str) -> Tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{name}: expected a list of non-empty strings, got {value!r:.80}")
    return tuple(value)


def _nonempty_str(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r:.80}")
    return value


def parse_case(record: Any) -> CounterFactCase:
    """One record of either layout as a :class:`CounterFactCase`; ``ValueError`` says what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a mapping, got {type(record).__name__}")
    if "requested_rewrite" not in record:
        raise ValueError(f"requested_rewrite: missing (keys present: {sorted(record)})")
    # parse_requests checks prompt/subject/targets, a single {} slot, and target_new != target_true.
    request = parse_requests([record])[0]
    if request.target_true is None or not request.target_true.strip():
        raise ValueError("requested_rewrite.target_true: missing or empty; efficacy needs the true target")
    if "paraphrase_prompts" in record or "neighborhood_prompts" in record:
        paraphrases = _str_list(record.get("paraphrase_prompts"), "paraphrase_prompts")
        neighbours = _str_list(record.get("neighborhood_prompts"), "neighborhood_prompts")
        generation = record.get("generation_prompts", [])
        generation = _str_list(generation, "generation_prompts") if generation else ()
        neighborhood = tuple((p, request.target_true) for p in neighbours)
        layout = "rome"
    elif "rephrase_prompt" in record or "locality_prompt" in record:
        paraphrases = (_nonempty_str(record, "rephrase_prompt"),)
        answer = _nonempty_str(record, "locality_ground_truth").strip()
        neighborhood = ((_nonempty_str(record, "locality_prompt"), answer),)
        generation = ()
        layout = "mend"
    else:
        raise ValueError(
            "no evaluation prompts: expected paraphrase_prompts/neighborhood_prompts (ROME layout) "
            f"or rephrase_prompt/locality_prompt (MEND layout); keys present: {sorted(record)}"
        )
    return CounterFactCase(
        case_id=request.case_id,
        request=request,
        target_true=request.target_true,
        paraphrase_prompts=paraphrases,
        neighborhood=neighborhood,
        generation_prompts=tuple(generation),
        layout=layout,
    )


def load_counterfact(path: PathLike, limit: Optional[int] = None) -> CounterFactCases:
    """Read a CounterFact file of either layout (detected per record).

    Args:
        path: a JSON file holding a list of records.
        limit: read at most this many records (good and bad together), from the start.

    Returns:
        The good cases, as a list with ``.skipped``: ``(record index, reason)`` for every record that
        is malformed or unusable (missing fields, ``target_new`` equal to ``target_true``, no ``{}``
        slot for the subject, empty prompt lists, ...). Bad records never fail the whole file.

    Raises:
        ValueError: the file cannot be read or is not a JSON list.
    """
    return load_cases(path, limit, "CounterFact", lambda record, _: parse_case(record), CounterFactCases())


def load_cases(path: PathLike, limit: Optional[int], what: str, parse: Any, out: "CounterFactCases") -> Any:
    """Parse the first ``limit`` records of a JSON list into ``out``; ``parse(record, index)`` raises
    ``ValueError`` for a bad record, which is kept in ``out.skipped`` instead of failing the file."""
    check_limit(limit)
    records = read_json_list(path, what)
    if limit is not None:
        records = records[:limit]
    for i, record in enumerate(records):
        try:
            out.append(parse(record, i))
        except ValueError as exc:
            out.skipped.append((i, str(exc).replace("requests[0]", "record")))
    return out


def prefixed(prefix: str, prompt: str) -> str:
    """``prompt`` after a context ``prefix``: joined with one space (``"The day was long." + " " + prompt``)."""
    prefix = prefix.strip()
    return f"{prefix} {prompt}" if prefix else prompt


def check_prefixes(prefixes: Optional[Sequence[str]]) -> List[str]:
    if prefixes is None:
        return []
    if isinstance(prefixes, str) or not all(isinstance(p, str) for p in prefixes):
        raise ValueError(f"prefixes: expected a list of strings, got {prefixes!r:.80}")
    return list(prefixes)


def _p(score: TargetScore) -> float:
    return math.exp(-score.mean_nll)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _pair_figures(new: Sequence[TargetScore], true: Sequence[TargetScore]) -> Tuple[float, float, float]:
    """(score, magnitude, top1) averaged over prompts, for the new target against the true one."""
    score = _mean([float(n.mean_nll < t.mean_nll) for n, t in zip(new, true)])
    magnitude = _mean([_p(n) - _p(t) for n, t in zip(new, true)])
    top1 = _mean([float(n.is_top) for n in new])
    return score, magnitude, top1


def evaluate_case(
    model: nn.Module, tok: Any, case: CounterFactCase, *, prefixes: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """ROME's CounterFact figures for one case (see the module docstring for the definitions).

    Args:
        model: a causal LM; it is run in one right-padded batch of shape
            ``(2 * (1 + P + N) + 2 * (1 + P) * len(prefixes), T)`` (P paraphrases, N neighbours).
        tok: its tokenizer.
        case: from :func:`load_counterfact`.
        prefixes: optional context strings; adds the ``*_prefixed`` figures.

    Returns:
        A JSON-serialisable dict of floats (plus ``case_id`` and counts).
    """
    if not isinstance(case, CounterFactCase):
        raise ValueError(f"case: expected a CounterFactCase, got {type(case).__name__}")
    prefix_list = check_prefixes(prefixes)
    new, true = case.target_new, case.target_true
    rewrite = [case.prompt]
    paraphrases = list(case.paraphrase_prompts)
    edit_prompts = rewrite + paraphrases
    prefixed_prompts = [prefixed(pre, p) for pre in prefix_list for p in edit_prompts]
    neigh_prompts = [p for p, _ in case.neighborhood]
    neigh_answers = [a for _, a in case.neighborhood]

    # One batch: [edit prompts + prefixed prompts] x {new, true}, then neighbours x {answer, new}.
    plain_and_prefixed = edit_prompts + prefixed_prompts
    prompts = plain_and_prefixed * 2 + neigh_prompts * 2
    m = len(plain_and_prefixed)
    targets = [new] * m + [true] * m + neigh_answers + [new] * len(neigh_prompts)
    scores = score_targets(model, tok, prompts, targets)
    s_new, s_true = scores[:m], scores[m : 2 * m]
    n_answer, n_new = scores[2 * m : 2 * m + len(neigh_prompts)], scores[2 * m + len(neigh_prompts) :]

    out: Dict[str, Any] = {"case_id": case.case_id, "layout": case.layout}
    e = _pair_figures(s_new[:1], s_true[:1])
    out.update(efficacy_score=e[0], efficacy_magnitude=e[1], efficacy_top1=e[2])
    k = len(edit_prompts)
    pp = _pair_figures(s_new[1:k], s_true[1:k])
    out.update(paraphrase_score=pp[0], paraphrase_magnitude=pp[1], paraphrase_top1=pp[2])
    out["neighborhood_score"] = _mean([float(a.mean_nll < b.mean_nll) for a, b in zip(n_answer, n_new)])
    out["neighborhood_magnitude"] = _mean([_p(a) - _p(b) for a, b in zip(n_answer, n_new)])
    if case.layout == "mend":
        out["locality_top1"] = _mean([float(a.top[0]) for a in n_answer])
    out["n_paraphrase"] = len(paraphrases)
    out["n_neighborhood"] = len(neigh_prompts)
    if prefix_list:
        # Prefixed rows are ordered prefix-major: rows k + j*k + 0 is the rewrite prompt under prefix j.
        rw = [k + j * k for j in range(len(prefix_list))]
        pr = [k + j * k + i for j in range(len(prefix_list)) for i in range(1, k)]
        e = _pair_figures([s_new[i] for i in rw], [s_true[i] for i in rw])
        out.update(efficacy_score_prefixed=e[0], efficacy_magnitude_prefixed=e[1], efficacy_top1_prefixed=e[2])
        pp = _pair_figures([s_new[i] for i in pr], [s_true[i] for i in pr])
        out.update(paraphrase_score_prefixed=pp[0], paraphrase_magnitude_prefixed=pp[1], paraphrase_top1_prefixed=pp[2])
        out["n_prefixes"] = len(prefix_list)
    return out


def summarize(results: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Means of every numeric figure over ``results`` (NaNs, e.g. a case with no paraphrase, are
    left out of that figure's mean), with ``n_cases`` and ``count_<figure>`` for each figure."""
    if isinstance(results, Mapping):
        raise ValueError("results: expected a list of per-case dicts, got a single dict")
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for r in results:
        for key, value in r.items():
            if key == "case_id" or key.startswith("n_") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and not math.isnan(value):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
    out: Dict[str, Any] = {"n_cases": len(results)}
    for key in sums:
        out[key] = sums[key] / counts[key]
    for key in counts:
        out[f"count_{key}"] = counts[key]
    return out


def format_table(summary: Mapping[str, Any]) -> str:
    """A two- (or three-, with prefixed figures) column text table of a :func:`summarize` result."""
    names = [k for k in summary if not k.startswith("count_") and k != "n_cases" and not k.endswith("_prefixed")]
    has_prefixed = any(k.endswith("_prefixed") for k in summary)
    width = max([len(n) for n in names] + [6])
    header = f"{'metric':<{width}}  {'plain':>8}" + (f"  {'prefixed':>8}" if has_prefixed else "") + "  count"
    lines = [f"CounterFact/zsRE summary over {summary.get('n_cases', 0)} cases", header, "-" * len(header)]
    for name in names:
        value = summary[name]
        row = f"{name:<{width}}  {value:>8.4f}" if isinstance(value, (int, float)) else f"{name:<{width}}  {value!s:>8}"
        if has_prefixed:
            pv = summary.get(f"{name}_prefixed")
            row += f"  {pv:>8.4f}" if isinstance(pv, (int, float)) else f"  {'':>8}"
        row += f"  {summary.get(f'count_{name}', '')}"
        lines.append(row)
    return "\n".join(lines)
