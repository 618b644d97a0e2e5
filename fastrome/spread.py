"""The spread edit (MEMIT-style): one edit shared among several consecutive layers.

An edit at layer ``l`` with ``config.spread = s`` writes layers ``l-s+1 .. l``, lowest first. Each
takes an equal share of what the residual stream after ``l`` still lacks of the edit's target, the
last one all that is left, so no single matrix carries the whole change. The parts are journaled
together, as entries of one edit (``record["part"]`` 0, 1, ...), only once all of them are written.
"""

from __future__ import annotations

import math
import time
from typing import List, Tuple

from torch import Tensor

from fastrome import update
from fastrome.history import EditHistory
from fastrome.journal import JournalEntry
from fastrome.keys import capture_at, capture_residual
from fastrome.report import EditRecord
from fastrome.requests import EditRequest
from fastrome.values import ValueResult, frozen
from fastrome.writer import LayerWriter


def spread_layers(layer: int, spread: int) -> List[int]:
    """The layers an edit at ``layer`` shared among ``spread`` layers writes, lowest first."""
    return list(range(layer - spread + 1, layer + 1))


def apply_spread(
    writer: LayerWriter,
    history: EditHistory,
    req: EditRequest,
    layer: int,
    prompts: List[str],
    pad: int,
    vr: ValueResult,
    residual: Tensor,
    rec: EditRecord,
) -> Tuple[int, Tensor, update.UpdatePlan]:
    """Write the spread edit of ``req`` at ``layer`` and fill ``rec`` (status, metrics, parts).

    The layers below ``layer`` and ``layer`` itself, lowest first, each take an equal share of what
    the residual stream after ``layer`` still lacks of its target (``residual`` + δ, averaged over
    the prompts; at the unprefixed prompt in the modes whose numerator key is the unprefixed one),
    the last one all that is left. Keys and the residual are read again after every write. All
    layers are written or none: a refusal at any layer rebuilds the ones already written, and the
    journal gets the parts only at the end.

    Args:
        writer: plans, judges and writes each layer's part.
        history: the editor's history (rolls back a refused edit, journals an applied one).
        req: the request.
        layer: the edit's (top) layer; it writes ``spread_layers(layer, config.spread)``.
        prompts: the request's prompts under the context templates, the unprefixed one first.
        pad: the tokenizer's padding id.
        vr: the edit's optimised value at ``layer`` (its ``delta`` (d_out,) fp32 is added to the stream).
        residual: (n_prompts, d_model) residual stream after ``layer`` at the prompts' subject
            token, read before any write of this batch.
        rec: the edit's record.

    Returns:
        (layer, keys (n_prompts, d_in), plan) of the last part examined, for the editor's ``last``.
    """
    cfg, adapter = writer.config, writer.adapter
    layers = spread_layers(layer, cfg.spread)

    def at_key(h: Tensor) -> Tensor:
        # where the mode's numerator key reads: the prompts' mean, or the unprefixed prompt
        return h.mean(0) if cfg.mode == "consistent" else h[0]

    target = at_key(residual) + vr.delta.to(residual.device)
    written: List[Tuple[int, update.UpdatePlan, float]] = []
    solve_seconds = write_seconds = 0.0
    rec.reasons = []
    for i, part_layer in enumerate(layers):
        t0 = time.perf_counter()
        with frozen(adapter.model):
            keys = capture_at(adapter, part_layer, prompts, pad)[0]
            # Alone in its batch, nothing has been written since ``residual`` was read.
            stream = residual if i == 0 and rec.batch == 1 else capture_residual(adapter, layer, prompts, pad)
            now = at_key(stream)
        share = (target - now.to(target.device)) / (len(layers) - i)
        plan, total, verdict = writer.check(part_layer, keys, vr, change=share)
        rec.parts.append({
            "layer": part_layer, "edit_id": None, "denominator": plan.denom, "denominator_rel": plan.denom_rel,
            "denominator_floor": verdict.floor, "update_norm": plan.update_norm,
            "update_ratio": plan.update_ratio, "interference": plan.interference, "total_update_ratio": total,
        })
        rec.reasons += [f"layer {part_layer}: {r}" for r in verdict.reasons]
        solve_seconds += time.perf_counter() - t0
        if not (verdict.ok or cfg.policy == "force"):
            break
        t0 = time.perf_counter()
        applied = writer.write(part_layer, plan, verdict)
        write_seconds += time.perf_counter() - t0
        if not applied:
            rec.reasons.append(f"layer {part_layer}: the write refused non-finite values")
            break
        written.append((part_layer, plan, total))
    rec.seconds["solve"], rec.seconds["write"] = solve_seconds, write_seconds
    _summarise(rec)
    if len(written) < len(layers):
        rec.status = "refused"
        if written:  # back to the weights from before this edit, bit for bit
            history.rebuild(part_layer for part_layer, _, _ in written)
    else:
        rec.status = "forced" if rec.reasons else "applied"
        first = history.journal.next_id
        rec.edit_id = first
        for i in range(len(written)):
            rec.parts[i]["edit_id"] = first + i
        whole = rec.to_dict()
        rec.seconds["memory"] = 0.0
        for i, (part_layer, part_plan, total) in enumerate(written):
            rec.seconds["memory"] += history.record(
                JournalEntry(first + i, part_layer, part_plan.u, part_plan.lam, req.to_dict(), {**whole, "part": i},
                             key=part_plan.solved_key),
                total,
            )
    return part_layer, keys, plan


def _summarise(rec: EditRecord) -> None:
    """The edit's metrics from its parts': the weakest denominator, the summed update."""
    weakest = min(rec.parts, key=lambda p: p["denominator_rel"] if math.isfinite(p["denominator_rel"]) else -1)
    rec.denominator, rec.denominator_rel = weakest["denominator"], weakest["denominator_rel"]
    rec.denominator_floor = weakest["denominator_floor"]
    rec.update_norm = math.sqrt(sum(p["update_norm"] ** 2 for p in rec.parts))
    rec.update_ratio = max(p["update_ratio"] for p in rec.parts)
    rec.interference = sum(p["interference"] for p in rec.parts)
    rec.total_update_ratio = max(p["total_update_ratio"] for p in rec.parts)
