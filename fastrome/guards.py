"""The numerical guards of an edit (docs/architecture.md), decided before anything is written.

An edit is refused when any of ``k, u, δ, Λ`` is non-finite, when its denominator ``uᵀk`` is not
above ``min_denom_rel·‖u‖·‖k‖`` (consistent keys make it ``kᵀC⁻¹k > 0``; mixed keys can make it
vanish or turn negative, and dividing by it is how one edit destroys a model), or when the update
is too large relative to the weight, per edit or in total at the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor

from fastrome.config import EditConfig


class EditRefused(RuntimeError):
    """Raised under ``policy='raise'`` when a guard refuses an edit; the weights are unchanged.

    Attributes:
        report: the :class:`~fastrome.report.EditReport` of the call so far, the refused edit last.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class Verdict:
    ok: bool
    reasons: List[str] = field(default_factory=list)
    floor: float = 0.0


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check(
    *,
    k: Tensor,
    u: Tensor,
    delta: Tensor,
    lam: Tensor,
    denom: float,
    update_ratio: float,
    total_ratio: float,
    cfg: EditConfig,
    energy: float = math.inf,
    interference: float = 0.0,
    typical_interference: Optional[float] = None,
) -> Verdict:
    """All guard checks for one edit. ``k`` is the key in the denominator; ``energy`` is ``uᵀAu``
    (A: the solve's matrix), which must be positive (the dual mode's denominator is 1 by
    construction, and this is what says its solve was sound). ``interference`` is the update's
    ``‖Λ‖²·uᵀCu`` and ``typical_interference`` the median of the layer's earlier edits' (None while
    too few), for ``cfg.max_interference_spike``."""
    reasons = []
    bad = [name for name, t in (("k", k), ("u", u), ("delta", delta), ("lambda", lam)) if not _finite(t)]
    if bad:
        reasons.append(f"non-finite values in {', '.join(bad)}")
    floor = cfg.min_denom_rel * float(u.double().norm()) * float(k.double().norm())
    if not math.isfinite(floor):
        floor = math.inf
    if not (math.isfinite(denom) and denom > floor):
        reasons.append(f"denominator uᵀk = {denom:.4g} is not above {floor:.4g} (= {cfg.min_denom_rel:g}·‖u‖·‖k‖)")
    elif not energy > 0:  # NaN included
        reasons.append(f"denominator of the solve uᵀAu = {energy:.4g} is not positive (the statistics are not "
                       "symmetric positive definite along the edit's keys)")
    if not (math.isfinite(update_ratio) and update_ratio <= cfg.max_update_ratio):
        reasons.append(f"‖ΔW‖/‖W‖ = {update_ratio:.4g} exceeds max_update_ratio = {cfg.max_update_ratio:g}")
    if not (math.isfinite(total_ratio) and total_ratio <= cfg.max_total_update_ratio):
        reasons.append(
            f"running total of ‖ΔW‖/‖W‖ at this layer would be {total_ratio:.4g}, above "
            f"max_total_update_ratio = {cfg.max_total_update_ratio:g}"
        )
    spike = cfg.max_interference_spike
    if spike and typical_interference is not None and not interference <= spike * typical_interference:
        reasons.append(
            f"interference ‖Λ‖²·uᵀCu = {interference:.4g} exceeds max_interference_spike = {spike:g} × the median "
            f"{typical_interference:.4g} of the layer's earlier edits"
        )
    return Verdict(ok=not reasons, reasons=reasons, floor=floor)
