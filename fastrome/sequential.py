"""Thousands of edits in a row: the harness that applies records in order, watches the model's
health, acts on collapse, and resumes through the editor's journal.

Per edit it records the denominator, ``‖ΔW‖/‖W‖``, the final loss and the optimisation steps; after
each edit it checks the cheap collapse signals (the update-norm spike, the perplexity of a few
sentinel texts) and every ``every`` edits it measures retention (top-1 efficacy of a sample of the
edits made so far), specificity (locality prompts that keep their pre-edit answer) and perplexity.
Records that cannot be edited (missing fields, the new target equal to the true one, the subject
absent from the prompt) are reported and skipped: a 10,000-record run never stops for bad data.

Everything goes to ``out_dir``: ``edits.jsonl`` (one line per record, whatever happened),
``checkpoints.jsonl`` (the periodic measurements) and the editor's journal under ``journal/``. A
killed run started again with the same ``out_dir`` replays the journal and goes on with the first
record not yet done; nothing is applied twice.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastrome.metrics import mean_perplexity, score_targets
from fastrome.models import greedy_complete
from fastrome.requests import parse_requests

ACTIONS = ("stop", "undo", "record")


@dataclass
class CollapseRules:
    """When an edit counts as damaging the model, and what to do then.

    Attributes:
        sentinel_ppl_ratio: perplexity of the sentinel texts after an edit over its value before
            any edit; above this the edit is flagged.
        norm_spike: ``‖ΔW‖/‖W‖`` of an edit over the median of the previous edits' ratios.
        min_history: edits before the norm-spike rule applies (the median needs a few).
        action: ``"stop"`` the run, ``"undo"`` the edit and go on (recorded), or only ``"record"``.
    """

    sentinel_ppl_ratio: float = 1.5
    norm_spike: float = 10.0
    min_history: int = 10
    action: str = "undo"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: expected one of {ACTIONS}, got {self.action!r}")
        if not (self.sentinel_ppl_ratio > 1 and self.norm_spike > 1):
            raise ValueError(f"sentinel_ppl_ratio and norm_spike must be > 1, got {self.sentinel_ppl_ratio!r}, "
                             f"{self.norm_spike!r}")


@dataclass
class RunSummary:
    """What a run did: counts, the last checkpoint, whether it stopped on collapse, wall time."""

    applied: int = 0
    skipped: int = 0
    refused: int = 0
    undone: int = 0
    stopped: Optional[str] = None
    seconds: float = 0.0
    checkpoints: List[Dict[str, Any]] = field(default_factory=list)


def validate_record(record: Any) -> Optional[str]:
    """Why ``record`` cannot be edited, or None. Checks what the editor would otherwise refuse late."""
    try:
        (req,) = parse_requests([record])
    except (ValueError, TypeError) as exc:
        return str(exc)
    true = (req.target_true or "").strip()
    if true and true.lower() == req.target_new.strip().lower():
        return f"target_new {req.target_new!r} is the true target"
    return None


def _append(path: Path, obj: Dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def _case_id(record: Any, index: int) -> Any:
    return record.get("case_id", index) if isinstance(record, dict) else index


def run_sequential(
    editor: Any,
    records: Sequence[Dict[str, Any]],
    out_dir: os.PathLike | str,
    *,
    every: int = 50,
    ppl_texts: Sequence[str] = (),
    sentinel_texts: Optional[Sequence[str]] = None,
    retention_sample: int = 200,
    rules: Optional[CollapseRules] = None,
    seed: int = 0,
    on_checkpoint: Optional[Callable[[Dict[str, Any]], None]] = None,
    progress: Optional[bool] = None,
) -> RunSummary:
    """Apply ``records`` one after another through ``editor`` (whose ``journal`` should live in
    ``out_dir/journal`` for the run to be resumable: see :func:`open_run`).

    Args:
        editor: a :class:`fastrome.Editor`; its policy should be ``"skip"`` for long runs.
        records: CounterFact-style dicts (``case_id`` identifies a record across restarts).
        out_dir: where ``edits.jsonl`` and ``checkpoints.jsonl`` go.
        every: measure retention, specificity and perplexity every this many applied edits.
        ppl_texts: texts for the periodic perplexity (e.g. ME-PPL_50).
        sentinel_texts: texts for the per-edit perplexity check (default: the first 8 ppl texts).
        retention_sample: how many of the edits so far are re-checked at each checkpoint.
        rules: collapse rules (default :class:`CollapseRules`).
        seed: seed of the retention sample.
    """
    rules = rules or CollapseRules()
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected a positive int, got {every!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    edits_log, ckpt_log = out / "edits.jsonl", out / "checkpoints.jsonl"
    model, tok = editor.model, editor.tokenizer
    sentinel = list(sentinel_texts if sentinel_texts is not None else list(ppl_texts)[:8])
    done = {str(c) for c in editor.done_case_ids()}
    logged = set()
    if edits_log.is_file():
        for line in edits_log.read_text(encoding="utf-8").splitlines():
            try:
                logged.add(str(json.loads(line)["case_id"]))
            except (json.JSONDecodeError, KeyError):
                continue  # a torn line from a killed run
    summary = RunSummary()
    t_start = time.perf_counter()
    # Baselines belong to the model before the run's first edit: a resumed run reads them from the
    # first checkpoint instead of measuring the (already edited) model again.
    first = _first_checkpoint(ckpt_log)
    if first is None and editor.journal.entries:
        raise ValueError(f"out_dir: {out} has a journal but no checkpoints.jsonl to take the baselines from")
    if first is None:
        base_sentinel = mean_perplexity(model, tok, sentinel) if sentinel else None
        locality = _locality_baseline(model, tok, records, retention_sample, seed)
        start = _measure(editor, records, [], ppl_texts, locality, retention_sample, seed)
        start.update(edits=0, sentinel_ppl_base=base_sentinel, locality_baseline=locality)
        _append(ckpt_log, start)
        summary.checkpoints.append(start)
    else:
        base_sentinel = first.get("sentinel_ppl_base")
        locality = [tuple(pair) for pair in first.get("locality_baseline", [])]
    ratios = [float(e.record.get("update_ratio") or 0.0) for e in editor.journal]

    from tqdm.auto import tqdm

    show = progress if progress is not None else False
    bar = tqdm(total=len(records), initial=len(done), desc="sequential edits", unit="edit", disable=not show)
    try:
        for index, record in enumerate(records):
            cid = _case_id(record, index)
            if str(cid) in done or str(cid) in logged:
                continue
            reason = validate_record(record)
            entry: Dict[str, Any] = {"case_id": cid, "index": index}
            if reason is None:
                try:
                    report = editor.edit(record)
                except ValueError as exc:  # found invalid while preparing: nothing was written
                    reason = str(exc)
            if reason is not None:
                entry.update(status="skipped", reason=reason)
                summary.skipped += 1
                _append(edits_log, entry)
                bar.update(1)
                continue
            rec = report.records[0]
            entry.update({k: v for k, v in asdict(rec).items() if k not in ("losses",)})
            entry["final_loss"] = rec.losses[-1] if rec.losses else None
            if not rec.applied:
                summary.refused += 1
                _append(edits_log, entry)
                bar.update(1)
                continue
            flags = []
            if len(ratios) >= rules.min_history and rec.update_ratio > rules.norm_spike * median(ratios):
                flags.append(f"update-norm spike: {rec.update_ratio:.3g} > {rules.norm_spike:g} × median "
                             f"{median(ratios):.3g}")
            if base_sentinel is not None:
                now = mean_perplexity(model, tok, sentinel)
                entry["sentinel_ppl"] = now
                if now > rules.sentinel_ppl_ratio * base_sentinel:
                    flags.append(f"sentinel perplexity {now:.2f} > {rules.sentinel_ppl_ratio:g} × {base_sentinel:.2f}")
            entry["collapse"] = flags
            if flags and rules.action == "undo":
                editor.undo(rec.edit_id)
                entry["status"] = "undone"
                summary.undone += 1
            else:
                ratios.append(rec.update_ratio)
                summary.applied += 1
            _append(edits_log, entry)
            bar.update(1)
            if flags and rules.action == "stop":
                summary.stopped = "; ".join(flags)
                break
            if len(editor.journal) % every == 0:
                point = _measure(editor, records, editor.done_case_ids(), ppl_texts, locality, retention_sample, seed)
                point["edits"] = len(editor.journal)
                _append(ckpt_log, point)
                summary.checkpoints.append(point)
                if on_checkpoint is not None:
                    on_checkpoint(point)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _first_checkpoint(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None
    return None


def _locality_baseline(model, tok, records, sample: int, seed: int) -> List[tuple]:
    """(prompt, first greedy token text) of a fixed sample of locality prompts, on the model as it
    is at the start of the run (the unedited model for a fresh run)."""
    prompts = [r["locality_prompt"] for r in records if isinstance(r, dict) and r.get("locality_prompt")]
    rng = random.Random(seed)
    picked = rng.sample(prompts, min(sample, len(prompts))) if prompts else []
    return [(p, greedy_complete(model, tok, p, max_new_tokens=1)) for p in picked]


def _measure(editor, records, done_ids, ppl_texts, locality, sample: int, seed: int) -> Dict[str, Any]:
    """Retention (top-1 efficacy of a sample of the edits so far), specificity and perplexity."""
    model, tok = editor.model, editor.tokenizer
    out: Dict[str, Any] = {"time": time.time()}
    by_id = {str(_case_id(r, i)): r for i, r in enumerate(records)}
    done = [by_id[str(c)] for c in done_ids if str(c) in by_id]
    if done:
        rng = random.Random(seed + len(done))
        picked = rng.sample(done, min(sample, len(done)))
        reqs = [parse_requests([r])[0] for r in picked]
        scores = score_targets(model, tok, [q.text for q in reqs], [q.target_text() for q in reqs])
        out["retention"] = sum(s.is_top for s in scores) / len(scores)
        out["retention_n"] = len(scores)
    if locality:
        kept = [greedy_complete(model, tok, p, max_new_tokens=1) == first for p, first in locality]
        out["specificity"] = sum(kept) / len(kept)
    if ppl_texts:
        out["ppl"] = mean_perplexity(model, tok, list(ppl_texts))
    return out


def open_run(model: Any, tokenizer: Any, out_dir: os.PathLike | str, **editor_kwargs: Any) -> Any:
    """An :class:`fastrome.Editor` whose journal lives in ``out_dir/journal`` (replayed when it
    exists), with ``policy="skip"`` unless given."""
    from fastrome import Editor

    editor_kwargs.setdefault("policy", "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return Editor(model, tokenizer, journal=Path(out_dir) / "journal", **editor_kwargs)
