"""Thousands of edits in a row: the harness that applies records in order, watches the model's
health, acts on collapse, and resumes through the editor's journal.

Per edit it records the denominator, ``‖ΔW‖/‖W‖``, the final loss and the optimisation steps; after
each edit (each batch in batched mode) it checks the cheap collapse signals (the update-norm spike,
the perplexity of a few sentinel texts) and every ``every`` edits it measures retention (top-1 and
efficacy score of a sample of the edits made so far, with and without a test-time prefix),
specificity (locality prompts that keep their pre-edit answer), perplexity on two text sets
(ME-PPL, WikiText-2) and the n-gram entropy of sampled generations relative to the unedited model's
(whose drop is the third collapse signal).
Records that cannot be edited (missing fields, the new target equal to the true one, the subject
absent from the prompt) are reported and skipped: a 10,000-record run never stops for bad data.

Everything goes to ``out_dir``: ``edits.jsonl`` (one line per record, whatever happened),
``checkpoints.jsonl`` (the periodic measurements) and the editor's journal under ``journal/``. A
killed run started again with the same ``out_dir`` replays the journal and goes on with the first
record not yet done; nothing is applied twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from fastrome.cache import write_text
from fastrome.evaluation.counterfact import prefixed
from fastrome.evaluation.fluency import generate_for_fluency, ngram_entropy
from fastrome.locking import FolderLock
from fastrome.metrics import mean_perplexity, score_targets
from fastrome.models import greedy_complete
from fastrome.report import EditRecord
from fastrome.requests import RequestError, parse_requests

_log = logging.getLogger(__name__)

ACTIONS = ("stop", "undo", "record")


@dataclass
class CollapseRules:
    """When an edit counts as damaging the model, and what to do then.

    Attributes:
        sentinel_ppl_ratio: perplexity of the sentinel texts after an edit over its value before
            any edit; above this the edit is flagged (a budget for the run's accumulated damage).
        sentinel_jump: the same perplexity after an edit over its value just before that edit;
            above this the edit is flagged (one edit doing the damage of many).
        norm_spike: ``‖ΔW‖/‖W‖`` of an edit over the median of the previous edits' ratios.
        interference_spike: an edit's interference ``‖Λ‖²·uᵀCu`` (its mean squared change to the
            layer's output over ordinary text) over the median of the previous edits'. It flags a
            disabling edit from its factors alone, before any perplexity moves.
        min_history: edits before the spike rules apply (the medians need a few).
        entropy_drop: generation entropy at a checkpoint over the unedited model's; below this the
            run stops under ``action="stop"`` (it is recorded otherwise: the edits since the last
            checkpoint cannot be told apart).
        action: ``"stop"`` the run, ``"undo"`` the edit and go on (recorded), or only ``"record"``.
    """

    sentinel_ppl_ratio: float = 1.5
    sentinel_jump: float = 1.25
    norm_spike: float = 10.0
    interference_spike: float = 10.0
    min_history: int = 10
    entropy_drop: float = 0.8
    action: str = "undo"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: expected one of {ACTIONS}, got {self.action!r}")
        for name in ("sentinel_ppl_ratio", "sentinel_jump", "norm_spike", "interference_spike"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 1):
                raise ValueError(f"{name}: expected a number > 1, got {value!r}")

    def spike(self, value: Optional[float], history: Sequence[float], factor: float) -> Optional[float]:
        """The median of ``history`` when ``value`` is above ``factor`` times it, else None (also
        while ``history`` holds fewer than ``min_history`` values)."""
        if value is None or len(history) < self.min_history:
            return None
        mid = median(history)
        return mid if value > factor * mid else None


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
        parse_requests([record])  # its rules, one of them a target_new equal to target_true
    except (ValueError, TypeError) as exc:
        return str(exc)
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


def _finite(value: Any) -> Optional[float]:
    """``value`` as a float, or None when it is missing or not finite (older records lack some)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _case_id(record: Any, index: int) -> Any:
    return record.get("case_id", index) if isinstance(record, dict) else index


def run_sequential(
    editor: Any,
    records: Sequence[Dict[str, Any]],
    out_dir: os.PathLike | str,
    *,
    every: int = 50,
    ppl_texts: Sequence[str] = (),
    wikitext_texts: Sequence[str] = (),
    sentinel_texts: Optional[Sequence[str]] = None,
    fluency_prompts: Sequence[str] = (),
    test_prefixes: Sequence[str] = (),
    retention_sample: int = 200,
    rules: Optional[CollapseRules] = None,
    batch_size: int = 1,
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
        ppl_texts: texts for the periodic perplexity ``ppl`` (e.g. ME-PPL_50).
        wikitext_texts: held-out texts for ``wikitext_ppl`` (e.g. WikiText-2 test paragraphs).
        sentinel_texts: texts for the per-edit perplexity check (default: the first 8 ppl texts).
        fluency_prompts: prompts for ``entropy``, the n-gram entropy of top-k sampled generations,
            and ``entropy_norm``, its ratio to the unedited model's.
        test_prefixes: context prefixes for ``retention_prefixed`` and ``retention_score_prefixed``
            (each re-checked edit's prompt after one of them, in turn).
        retention_sample: how many of the edits so far are re-checked at each checkpoint.
        rules: collapse rules (default :class:`CollapseRules`).
        batch_size: the editor's batched mode (values of this many records optimised together);
            1 is strict sequential editing. Per-edit checks then run once per batch.
        seed: seed of the retention sample and of the generations.
    """
    rules = rules or CollapseRules()
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected a positive int, got {every!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    out = Path(out_dir)
    lock = FolderLock(out, "run directory")  # one run per folder: two would interleave every log
    try:
        return _run(editor, records, out, every, rules, batch_size, seed, on_checkpoint, progress,
                    Probes(list(ppl_texts), list(wikitext_texts), list(fluency_prompts), retention_sample, seed,
                           list(test_prefixes)),
                    list(sentinel_texts if sentinel_texts is not None else list(ppl_texts)[:8]))
    finally:
        lock.release()


def _reconcile(editor: Any, out: Path, edits_log: Path, records: Sequence[Any]) -> List[tuple]:
    """Make the run log agree with the journal after a crash; returns the journal's edits that the
    log lacks, as ``(index, case id, record)`` to be judged again.

    The journal is written before the log, so a kill between the two leaves edits in the journal
    with no log line: their records are rebuilt from the journal and go through the run's checks
    when it resumes. A log line of an applied edit that the journal lacks is what a journal whose
    last line was torn leaves behind: when such lines are the log's tail, they are dropped (the run
    edits those records again). Anywhere else they mean the journal is not this run's.
    """
    log = _read_log(edits_log)
    done = [str(c) for c in editor.done_case_ids()]
    held = set(done)
    applied_lines = [i for i, e in enumerate(log) if e.get("status") in ("applied", "forced")]
    lost = [i for i in applied_lines if str(log[i]["case_id"]) not in held]
    if lost:
        ours = editor.journal.path is not None and Path(editor.journal.path).resolve() == (out / "journal").resolve()
        kept_after = [i for i in applied_lines if i > lost[0] and str(log[i]["case_id"]) in held]
        if not ours or kept_after:
            case = log[lost[0]]["case_id"]
            raise ValueError(
                f"out_dir: {out}/edits.jsonl records {len(lost)} applied edits (e.g. case {case}) that the "
                f"editor's journal ({editor.journal.path}) does not hold; open the run with open_run(model, tok, "
                f"{str(out)!r}) on the unedited model so the journal is replayed"
            )
        cases = [log[i]["case_id"] for i in lost]
        _log.warning("run log %s: the journal lost the last edits of cases %s in a crash; their log lines are "
                     "dropped and those records are edited again", edits_log, cases)
        keep = [e for i, e in enumerate(log) if i < lost[0]]
        write_text(edits_log, "".join(json.dumps(e, sort_keys=True, default=_json_default) + "\n" for e in keep))
        log = keep
    logged = {str(e["case_id"]) for e in log}
    index_of = {str(_case_id(r, i)): i for i, r in enumerate(records)}
    return [(index_of.get(c, -1), c, None) for c in done if c not in logged]


def _run(editor: Any, records: Sequence[Any], out: Path, every: int, rules: CollapseRules, batch_size: int,
         seed: int, on_checkpoint: Optional[Callable[[Dict[str, Any]], None]], progress: Optional[bool],
         probes: "Probes", sentinel: List[str]) -> RunSummary:
    edits_log, ckpt_log = out / "edits.jsonl", out / "checkpoints.jsonl"
    for path in (edits_log, ckpt_log):
        _drop_torn_tail(path)
    model, tok = editor.model, editor.tokenizer
    unlogged = _reconcile(editor, out, edits_log, records)
    record_of = {str(_case_id(record, index)): record for index, record in enumerate(records)}
    done = {str(c) for c in editor.done_case_ids()}
    logged = {str(e["case_id"]) for e in _read_log(edits_log)}
    summary = RunSummary()
    t_start = time.perf_counter()
    # Baselines belong to the model before the run's first edit: a resumed run reads them from the
    # first checkpoint instead of measuring the (already edited) model again.
    first = _first_checkpoint(ckpt_log)
    if first is None and editor.journal.entries:
        raise ValueError(f"out_dir: {out} has a journal but no checkpoints.jsonl to take the baselines from")
    if first is None:
        base_sentinel = mean_perplexity(model, tok, sentinel) if sentinel else None
        probes.locality = _locality_baseline(model, tok, records, probes.sample, seed)
        start = probes.measure(editor, records, [])
        probes.base_entropy = start.get("entropy")
        start.update(edits=0, sentinel_ppl_base=base_sentinel, locality_baseline=probes.locality,
                     entropy_base=probes.base_entropy)
        start["entropy_norm"] = 1.0 if probes.base_entropy else None
        _append(ckpt_log, start)
        summary.checkpoints.append(start)
    else:
        base_sentinel = first.get("sentinel_ppl_base")
        probes.locality = [tuple(pair) for pair in first.get("locality_baseline", [])]
        probes.base_entropy = first.get("entropy_base")
    pending_ids = {c for _, c, _ in unlogged}
    history = [r for r in editor.applied_records() if str(r.get("case_id")) not in pending_ids]
    ratios = [float(r.get("update_ratio") or 0.0) for r in history]
    interferences = [x for x in (_finite(r.get("interference")) for r in history) if x is not None]
    # The sentinel just before the next edit: measured on the model as the journal left it, or, for
    # edits whose checks a crash cut off, read from the log line of the edit before them.
    last_sentinel = base_sentinel
    if base_sentinel is not None and editor.journal.entries:
        if unlogged:
            before = [e.get("sentinel_ppl") for e in _read_log(edits_log) if e.get("sentinel_ppl") is not None]
            last_sentinel = before[-1] if before else base_sentinel
        else:
            last_sentinel = mean_perplexity(model, tok, sentinel)

    from tqdm.auto import tqdm

    show = progress if progress is not None else False
    bar = tqdm(total=len(records), initial=len(done), desc="sequential edits", unit="edit", disable=not show)

    def log(entry: Dict[str, Any]) -> None:
        _append(edits_log, entry)
        bar.update(1)

    def pending():
        """Batches of (index, case id, record) not yet done, bad records logged on the way."""
        batch: List[tuple] = []
        for index, record in enumerate(records):
            cid = _case_id(record, index)
            if str(cid) in done or str(cid) in logged:
                continue
            reason = validate_record(record)
            if reason is not None:
                summary.skipped += 1
                log({"case_id": cid, "index": index, "status": "skipped", "reason": reason})
                continue
            batch.append((index, cid, record))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def settle(applied: List[tuple]) -> Optional[str]:
        """Judge a batch of applied edits by the collapse rules, undo or keep them, log them, and
        measure a checkpoint when one is due; returns why the run stops, or None."""
        nonlocal last_sentinel
        _score_at_edit_time(model, tok, [(entry, record_of[str(entry["case_id"])]) for entry, _ in applied])
        flags: Dict[int, List[str]] = {}
        for entry, rec in applied:
            mid = rules.spike(rec.update_ratio, ratios, rules.norm_spike)
            if mid is not None:
                flags.setdefault(id(entry), []).append(
                    f"update-norm spike: {rec.update_ratio:.3g} > {rules.norm_spike:g} × median {mid:.3g}"
                )
            spread = _finite(rec.interference)
            mid = rules.spike(spread, interferences, rules.interference_spike)
            if mid is not None:
                flags.setdefault(id(entry), []).append(
                    f"interference spike: {spread:.3g} > {rules.interference_spike:g} × median {mid:.3g}"
                )
        if base_sentinel is not None:
            now = mean_perplexity(model, tok, sentinel)
            for entry, _ in applied:
                entry["sentinel_ppl"] = now
            raised_here = []
            if now > rules.sentinel_ppl_ratio * base_sentinel:
                raised_here.append(
                    f"sentinel perplexity {now:.2f} > {rules.sentinel_ppl_ratio:g} × {base_sentinel:.2f}"
                )
            if now > rules.sentinel_jump * last_sentinel:
                raised_here.append(
                    f"sentinel perplexity jump: {now:.2f} > {rules.sentinel_jump:g} × {last_sentinel:.2f} "
                    "before the edit"
                )
            for entry, _ in applied:  # a batch is judged as a whole
                flags.setdefault(id(entry), []).extend(raised_here)
        undo = []
        for entry, rec in applied:
            entry["collapse"] = flags.get(id(entry), [])
            if entry["collapse"] and rules.action == "undo":
                undo.append(rec.edit_id)
                entry["status"] = "undone"
                summary.undone += 1
            else:
                ratios.append(rec.update_ratio)
                if _finite(rec.interference) is not None:
                    interferences.append(float(rec.interference))
                summary.applied += 1
        if undo:
            editor.undo(undo)
        if base_sentinel is not None:
            # After an undo the model is back where it was; otherwise it is where ``now`` measured it.
            if not undo:
                last_sentinel = now
            elif len(undo) < len(applied):  # part of a batch undone: measure what is left
                last_sentinel = mean_perplexity(model, tok, sentinel)
        for entry, _ in applied:
            log(entry)
        raised = [f for entry, _ in applied for f in entry["collapse"]]
        if raised and rules.action == "stop":
            return "; ".join(raised)
        n_done = editor.journal.edit_count
        kept = sum(1 for e, _ in applied if e["status"] in ("applied", "forced"))
        if n_done // every > (n_done - kept) // every:
            return checkpoint(n_done)
        return None

    def checkpoint(n_done: int) -> Optional[str]:
        """Measure and log a checkpoint after ``n_done`` edits; returns why the run stops, or None."""
        point = probes.measure(editor, records, editor.done_case_ids())
        point["edits"] = n_done
        norm = point.get("entropy_norm")
        if norm is not None and norm < rules.entropy_drop:
            point["collapse"] = [f"generation entropy {norm:.3f} × the unedited model's < {rules.entropy_drop:g}"]
        _append(ckpt_log, point)
        summary.checkpoints.append(point)
        if on_checkpoint is not None:
            on_checkpoint(point)
        if point.get("collapse") and rules.action == "stop":
            return point["collapse"][0]
        return None

    try:
        if unlogged:
            # edits a crash left in the journal without their log lines and checks
            by_case = {str(r.get("case_id")): r for r in editor.applied_records()}
            recovered = []
            for index, cid, _ in unlogged:
                rec = _record_from(by_case[cid])
                recovered.append((_entry(index, rec.case_id, rec), rec))
            summary.stopped = settle(recovered)
        if summary.stopped is None:
            # a session stopped after the edit that made a checkpoint due but before its line:
            # measure it now, after the edits done so far
            n_done = editor.journal.edit_count
            measured = max((p.get("edits", 0) for p in _json_lines(ckpt_log)), default=0)
            if n_done and n_done // every * every > measured:
                summary.stopped = checkpoint(n_done)
        if summary.stopped is None:
            for batch in pending():
                applied = _edit_batch(editor, batch, batch_size, log, summary)
                if applied:
                    summary.stopped = settle(applied)
                    if summary.stopped is not None:
                        break
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _edit_batch(editor: Any, batch: List[tuple], batch_size: int, log: Callable, summary: RunSummary) -> List[tuple]:
    """Edit one batch; logs skipped and refused records, returns ``(entry, record)`` of applied ones."""
    try:
        report = editor.edit([record for _, _, record in batch], batch_size=batch_size)
        results = list(zip(batch, report.records))
    except RequestError:
        # one record failed the editor's checks, which all run before the first write (nothing was
        # written): edit them one by one. Any other error propagates; the journal holds what was done.
        results = []
        for item in batch:
            try:
                results.append((item, editor.edit(item[2]).records[0]))
            except RequestError as exc:
                summary.skipped += 1
                log({"case_id": item[1], "index": item[0], "status": "skipped", "reason": str(exc)})
    applied = []
    for (index, cid, _), rec in results:
        entry = _entry(index, cid, rec)
        if rec.applied:
            applied.append((entry, rec))
        else:
            summary.refused += 1
            log(entry)
    return applied


def _score_at_edit_time(model: Any, tok: Any, pairs: List[tuple]) -> None:
    """Efficacy right after the write, on each edit's own prompt: ``edit_top`` (the new target is
    the top continuation) and ``edit_score`` (it is likelier than the true one), into each
    run-log entry of ``pairs`` ``(entry, record)``."""
    reqs = [parse_requests([record])[0] for _, record in pairs]
    if not reqs:
        return
    new = score_targets(model, tok, [q.text for q in reqs], [q.target_text() for q in reqs])
    for (entry, _), score in zip(pairs, new):
        entry["edit_top"] = bool(score.is_top)
    with_true = [(entry, q, score) for (entry, _), q, score in zip(pairs, reqs, new) if q.target_true]
    if with_true:
        true = score_targets(model, tok, [q.text for _, q, _ in with_true],
                             [" " + q.target_true.strip() for _, q, _ in with_true])
        for (entry, _, score), t in zip(with_true, true):
            entry["edit_score"] = bool(score.mean_nll < t.mean_nll)


def paraphrase_of(record: Any) -> Optional[str]:
    """A record's first paraphrase of its prompt (CounterFact's ``paraphrase_prompts`` or the
    ``rephrase_prompt`` of the EasyEdit layout), or None."""
    if not isinstance(record, dict):
        return None
    listed = record.get("paraphrase_prompts")
    if isinstance(listed, list) and listed and isinstance(listed[0], str):
        return listed[0]
    one = record.get("rephrase_prompt")
    return one if isinstance(one, str) and one.strip() else None


def records_from_cases(cases: Iterable[Any]) -> List[Dict[str, Any]]:
    """Records for :func:`run_sequential` from evaluation cases (:class:`~fastrome.evaluation.CounterFactCase`
    or :class:`~fastrome.evaluation.ZsreCase`): each case's request as a dict, with the case's
    first neighbourhood prompt (CounterFact) or its ``loc`` prompt (zsRE) as ``locality_prompt``,
    the prompt whose pre-edit answer the run's specificity checks."""
    records = []
    for case in cases:
        record = case.request.to_dict()
        neighborhood = getattr(case, "neighborhood", ())
        if neighborhood:
            record["locality_prompt"] = neighborhood[0][0]
        elif getattr(case, "loc", None):
            record["locality_prompt"] = case.loc
        records.append(record)
    return records


def _entry(index: int, cid: Any, rec: EditRecord) -> Dict[str, Any]:
    """The run-log line of one edited record (its metrics; the losses only as the final one)."""
    entry: Dict[str, Any] = {"case_id": cid, "index": index}
    entry.update({k: v for k, v in asdict(rec).items() if k not in ("losses",)})
    entry["final_loss"] = rec.losses[-1] if rec.losses else None
    return entry


def _record_from(data: Dict[str, Any]) -> EditRecord:
    """An :class:`EditRecord` from its ``to_dict()`` form as the journal keeps it (None for NaN)."""
    kwargs = {}
    for f in fields(EditRecord):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = float("nan") if value is None and f.type in ("float", float) else value
    return EditRecord(**kwargs)


def _json_lines(path: Path) -> List[Dict[str, Any]]:
    """A log's complete lines as objects (a torn last line from a killed run is left out)."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict):
                out.append(item)
    return out


def _read_log(path: Path) -> List[Dict[str, Any]]:
    """The run log's complete lines, each naming its record's case."""
    return [entry for entry in _json_lines(path) if "case_id" in entry]


def _drop_torn_tail(path: Path) -> None:
    """Cut a log back to its last complete line: the next line appended must not be glued to what
    a killed write left half done."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


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


@dataclass
class Probes:
    """What a checkpoint measures, and the unedited model's reference answers."""

    ppl_texts: List[str]
    wikitext_texts: List[str]
    fluency_prompts: List[str]
    sample: int
    seed: int
    prefixes: List[str] = field(default_factory=list)
    locality: List[tuple] = field(default_factory=list)
    base_entropy: Optional[float] = None

    def measure(self, editor: Any, records: Sequence[Any], done_ids: Sequence[Any]) -> Dict[str, Any]:
        """Retention of a sample of the edits so far (top-1 and efficacy score), specificity,
        perplexities, generation entropy, and how far the edited weights have moved (largest
        ‖W − W₀‖/‖W₀‖ over the edited layers, and per layer)."""
        model, tok = editor.model, editor.tokenizer
        out: Dict[str, Any] = {"time": time.time()}
        by_id = {str(_case_id(r, i)): r for i, r in enumerate(records)}
        done = [by_id[str(c)] for c in done_ids if str(c) in by_id]
        if done:
            rng = random.Random(self.seed + len(done))
            picked = rng.sample(done, min(self.sample, len(done)))
            all_reqs = [parse_requests([r])[0] for r in picked]
            out["retention_n"] = len(all_reqs)
            variants = [("", [q.text for q in all_reqs], all_reqs)]
            if self.prefixes:
                # one test-time prefix per edit, in turn, so the prefixed figure costs one more pass
                texts = [prefixed(self.prefixes[i % len(self.prefixes)], q.text) for i, q in enumerate(all_reqs)]
                variants.append(("_prefixed", texts, all_reqs))
            rephrased = [(paraphrase_of(r), q) for r, q in zip(picked, all_reqs) if paraphrase_of(r)]
            if rephrased:  # generalisation: the same edits asked in other words
                variants.append(("_paraphrase", [t for t, _ in rephrased], [q for _, q in rephrased]))
            for suffix, texts, reqs in variants:
                new = score_targets(model, tok, texts, [q.target_text() for q in reqs])
                out["retention" + suffix] = sum(s.is_top for s in new) / len(new)
                pairs = [(t, s, q) for t, s, q in zip(texts, new, reqs) if q.target_true]
                if pairs:
                    true = score_targets(
                        model, tok, [t for t, _, _ in pairs], [" " + q.target_true.strip() for _, _, q in pairs]
                    )
                    wins = sum(s.mean_nll < t.mean_nll for (_, s, _), t in zip(pairs, true))
                    out["retention_score" + suffix] = wins / len(pairs)
        drift = getattr(editor, "drift", None)
        per_layer = drift() if callable(drift) else {}
        if per_layer:
            out["weight_drift"] = max(per_layer.values())
            out["weight_drift_layers"] = {str(layer): value for layer, value in per_layer.items()}
        if self.locality:
            kept = [greedy_complete(model, tok, p, max_new_tokens=1) == first for p, first in self.locality]
            out["specificity"] = sum(kept) / len(kept)
        if self.ppl_texts:
            out["ppl"] = mean_perplexity(model, tok, self.ppl_texts)
        if self.wikitext_texts:
            out["wikitext_ppl"] = mean_perplexity(model, tok, self.wikitext_texts)
        if self.fluency_prompts:
            texts = generate_for_fluency(model, tok, self.fluency_prompts, seed=self.seed)
            out["entropy"] = ngram_entropy(texts)
            if self.base_entropy:
                out["entropy_norm"] = out["entropy"] / self.base_entropy
        return out


def fork_run(source: os.PathLike | str, out_dir: os.PathLike | str, edits: int) -> Dict[str, Any]:
    """A new run folder ``out_dir`` holding the first ``edits`` records of the run in ``source``: its
    journal's edits of those records, their log lines and the checkpoints up to there. The run then
    goes on from that point, with the same or other settings (the journal records the fork, so the
    edits after it may differ in settings; see :meth:`fastrome.journal.Journal.note_fork`).

    Returns the fork's description, ``{"from", "edits", "applied"}``, also kept in ``run.json``
    (with the source's settings) as ``forked``. Raises ``ValueError`` naming the argument before
    anything is written when ``source`` is no run, ``out_dir`` already holds one, or ``edits`` is
    more than the source has done.
    """
    import shutil

    from fastrome.journal import Journal, edit_groups

    src, out = Path(source), Path(out_dir)
    if not (src / "journal" / "journal.json").is_file() or not (src / "edits.jsonl").is_file():
        raise ValueError(f"source: {str(src)!r} holds no run (a journal and edits.jsonl)")
    if (out / "journal").exists() or (out / "edits.jsonl").exists():
        raise ValueError(f"out_dir: {str(out)!r} already holds a run")
    log = _read_log(src / "edits.jsonl")
    if not isinstance(edits, int) or isinstance(edits, bool) or not 0 < edits <= len(log):
        raise ValueError(f"edits: expected 1..{len(log)} (records the source has done), got {edits!r}")
    kept = log[:edits]  # one line per record, in the run's order
    keep_cases = {str(e["case_id"]) for e in kept if e.get("status") in ("applied", "forced")}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "journal", out / "journal", ignore=shutil.ignore_patterns(".lock"))
    journal = Journal(out / "journal")
    try:
        drop = [e.edit_id for group in edit_groups(journal.entries)
                if str(group[0].request.get("case_id")) not in keep_cases for e in group]
        journal.remove(drop)
        journal.note_fork(str(src), journal.edit_count)
        applied = journal.edit_count
    finally:
        journal.close()
    write_text(out / "edits.jsonl", "".join(json.dumps(e, sort_keys=True, default=_json_default) + "\n"
                                            for e in kept))
    points = [p for p in _json_lines(src / "checkpoints.jsonl") if p.get("edits", 0) <= applied]
    write_text(out / "checkpoints.jsonl", "".join(json.dumps(p, default=_json_default) + "\n" for p in points))
    if (src / "test_prefixes.json").is_file():
        shutil.copyfile(src / "test_prefixes.json", out / "test_prefixes.json")
    fork = {"from": str(src), "edits": edits, "applied": applied}
    before = json.loads((src / "run.json").read_text()) if (src / "run.json").is_file() else {}
    write_text(out / "run.json", json.dumps({"sessions": [], "forked": {**fork, "settings": before.get("settings"),
                                                                         "dataset": before.get("dataset")}}, indent=1))
    return fork


def open_run(model: Any, tokenizer: Any, out_dir: os.PathLike | str, **editor_kwargs: Any) -> Any:
    """An :class:`fastrome.Editor` whose journal lives in ``out_dir/journal`` (replayed when it
    exists), with ``policy="skip"`` unless given."""
    from fastrome import Editor

    editor_kwargs.setdefault("policy", "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return Editor(model, tokenizer, journal=Path(out_dir) / "journal", **editor_kwargs)
