"""One layer's rank-one write: planned against the layer's current weight, judged by the guards,
written only if allowed. A one-layer edit takes this step once, a spread edit once per layer.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
from torch import Tensor

from fastrome import guards, update
from fastrome.adapter import ModelAdapter
from fastrome.config import EditConfig
from fastrome.history import EditHistory
from fastrome.solver import CovarianceSolver
from fastrome.values import ValueResult


class LayerWriter:
    """Plans, judges and writes rank-one updates of the edited layers.

    Args:
        adapter: the edited model's adapter.
        config: the editor's config (``mode``, the guards' caps), read when needed.
        solvers: the editor's per-layer solvers (built before a layer is planned).
        history: the editor's history: base weights, fp32 masters and running update-ratio totals.
    """

    def __init__(self, adapter: ModelAdapter, config: EditConfig, solvers: Mapping[int, CovarianceSolver],
                 history: EditHistory):
        self.adapter = adapter
        self.config = config
        self.solvers = solvers
        self.history = history

    def check(
        self, layer: int, keys: Tensor, vr: ValueResult, *, v_star: Optional[Tensor] = None,
        change: Optional[Tensor] = None,
    ) -> Tuple[update.UpdatePlan, float, guards.Verdict]:
        """Plan ``layer``'s update against its current weight and judge it.

        Args:
            layer: the layer written.
            keys: (n_prompts, d_in) fp32 keys at ``layer``, the unprefixed prompt's first.
            vr: the edit's optimised value (its ``delta`` is judged too).
            v_star: (d_out,) fp32 target output at the key; or
            change: (d_out,) fp32 output change wanted at the key (a spread edit's share).

        Returns:
            (plan, the layer's running update-ratio total after it, verdict).
        """
        cfg = self.config
        self.history.remember_base(layer)
        weight32, _ = self.history.weight32(layer)
        plan = update.plan(
            cfg.mode, self.solvers[layer], weight32, self.adapter.bias(layer), keys.mean(0), keys[0], v_star,
            change=None if change is None else change.to(weight32.device),
        )
        total = self.history.total_ratio[layer] + plan.update_ratio
        verdict = guards.check(
            k=plan.key, u=plan.u, delta=vr.delta, lam=plan.lam, denom=plan.denom,
            update_ratio=plan.update_ratio, total_ratio=total, cfg=cfg, energy=plan.energy,
            interference=plan.interference,
            typical_interference=self.history.typical_interference(layer) if cfg.max_interference_spike else None,
        )
        return plan, total, verdict

    def write(self, layer: int, plan: update.UpdatePlan, verdict: guards.Verdict) -> bool:
        """The guarded write of a checked plan (a refused one only under ``policy='force'``, which
        drops the denominator floor); True if it was written."""
        _, master = self.history.weight32(layer)
        with torch.no_grad():
            return bool(update.write(self.adapter.weight(layer), plan, verdict.floor if verdict.ok else -math.inf,
                                     master))
