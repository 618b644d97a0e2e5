"""The rank-one update of one edit: left vector, denominator, Λ, and the guarded write.

``consistent``: u = C⁻¹k̄, Λ = (v* − (Wk̄ + b)) / (uᵀk̄).
``original``:   u = C⁻¹k̄, Λ = (v* − (Wk_u + b)) / (uᵀk_u)   (the published code's mixed keys).
``prompt``:     u = C⁻¹k_u, Λ = (v* − (Wk_u + b)) / (uᵀk_u).
``dual``:       u = C⁻¹K(KᵀC⁻¹K)⁻¹1 for K = [k̄, k_u], so uᵀk̄ = uᵀk_u = 1 with the least uᵀCu;
                Λ = v* − (Wk_u + b). The unprefixed prompt gets v* exactly and the prefixed ones
                (keys near k̄) their own value plus about δ, as in the value optimisation; the
                consistent form is exact at k̄ alone and gives k_u only (uᵀk_u/uᵀk̄)·Λ, which is far
                from 1 when the subject opens the prompt.
The numerator's current output is computed from the weight in fp32 (its master copy for bf16/fp16
weights) rather than read from a forward pass, so it matches the matrix the update is added to and
``W'k = v*`` holds to fp32 precision afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastrome import ops
from fastrome.memory import EditMemory
from fastrome.solver import CovarianceSolver


@dataclass
class UpdatePlan:
    """Everything about one rank-one update before it is written. Vectors are fp32."""

    u: Tensor  # (d_in,)
    lam: Tensor  # (d_out,)
    key: Tensor  # (d_in,) the key of the denominator and numerator
    solved_key: Tensor  # (d_in,) the key u was solved for (u = C⁻¹·solved_key), (2, d_in) k̄ and k_u in the
    # dual mode: what an edit memory keeps
    denom: float  # uᵀkey
    update_norm: float  # ‖Λ uᵀ‖_F = ‖Λ‖·‖u‖
    weight_norm: float  # ‖W‖_F before the update
    # ‖Λ‖²·uᵀCu = E‖ΔW k‖² over keys whose second moment is C (+ ridge): the mean squared change the
    # edit makes to the layer's output on ordinary text. Sequential damage grows with its running sum.
    interference: float = float("nan")
    # uᵀAu (A: the solver's matrix); must be positive. For one key it is the denominator kᵀA⁻¹k;
    # the dual mode's denominator is 1 by construction, so this is its positivity check
    energy: float = float("nan")

    @property
    def update_ratio(self) -> float:
        return self.update_norm / self.weight_norm if self.weight_norm > 0 else float("inf")

    @property
    def denom_rel(self) -> float:
        """uᵀk / (‖u‖·‖k‖): the cosine between u and its key."""
        scale = float(self.u.double().norm() * self.key.double().norm())
        return self.denom / scale if scale > 0 else float("nan")


def plan(
    mode: str,
    solver: "CovarianceSolver | EditMemory",
    weight32: Tensor,
    bias: Optional[Tensor],
    k_mean: Tensor,
    k_plain: Tensor,
    v_star: Optional[Tensor],
    change: Optional[Tensor] = None,
) -> UpdatePlan:
    """Compute u, the denominator and Λ for ``mode``.

    Args:
        weight32: (d_out, d_in) current weight in fp32 (the master copy for half-precision models).
        bias: (d_out,) or None.
        k_mean: (d_in,) mean key over the context templates (k̄); k_plain: the unprefixed key (k_u).
        v_star: (d_out,) target value; or None with ``change``.
        change: (d_out,) the wanted change of the layer's output at the key, ``v* − (Wk + b)``
            given directly (a spread edit's share at one layer); replaces ``v_star``.
    """
    if (v_star is None) == (change is None):
        raise ValueError("plan: give exactly one of v_star and change")
    device = weight32.device
    k_mean, k_plain = (t.to(device=device, dtype=torch.float32) for t in (k_mean, k_plain))
    key = k_plain if mode in ("prompt", "dual") else k_mean
    solved_key = key
    if mode == "dual":
        u, quad = _two_key_left_vector(solver, k_mean, k_plain)
        solved_key = torch.stack([k_mean, k_plain])
        denom_t = (u * k_plain.to(torch.float64)).sum()
    else:
        u, denom_t = solver.solve(key)
        # u = C⁻¹k for the solved key k, so uᵀCu = kᵀu; with an edit memory (u = A⁻¹k) kᵀu is uᵀAu, the
        # ordinary-text figure plus β·Σ(kᵢᵀu)² over the remembered keys: an upper bound of it
        quad = float(denom_t)
    if mode == "original":
        key = k_plain
        denom_t = (u.to(torch.float64) * k_plain.to(torch.float64)).sum()
    u = u.to(device=device, dtype=torch.float32)
    denom = float(denom_t)
    if change is None:
        current = torch.mv(weight32, key)
        if bias is not None:
            current = current + bias.detach().to(device=device, dtype=torch.float32)
        change = v_star.to(device=device, dtype=torch.float32) - current
    lam = (change.to(device=device, dtype=torch.float64) / denom).to(torch.float32)
    update_norm = float(lam.double().norm() * u.double().norm())
    weight_norm = float(weight32.norm())
    interference = float(lam.double().square().sum()) * quad
    return UpdatePlan(u=u, lam=lam, key=key, solved_key=solved_key, denom=denom, update_norm=update_norm,
                      weight_norm=weight_norm, interference=interference, energy=quad)


def _two_key_left_vector(
    solver: "CovarianceSolver | EditMemory", k_mean: Tensor, k_plain: Tensor
) -> Tuple[Tensor, float]:
    """``(u, uᵀAu)``: the u of least uᵀAu with ``uᵀk̄ = uᵀk_u = 1`` (A: the solver's matrix), fp64.

    With ``U = A⁻¹K`` (rows, from the solver, so an edit memory or a projection applies) and
    ``G = UKᵀ``, ``u = Uᵀc`` for ``Gᵀc = 1``; then ``uᵀAu = cᵀGc = Σc``. Two keys that (nearly)
    coincide make G singular: one constraint is then the other, and u is the one-key solution. A G
    that is not positive definite (statistics that are not, along the keys) gives a non-positive
    ``uᵀAu``, which the guards refuse."""
    K = torch.stack([k_mean, k_plain])
    U, _ = solver.solve(K)
    U64, K64 = U.to(torch.float64), K.to(device=U.device, dtype=torch.float64)
    G = U64 @ K64.t()
    g00, g11 = float(G[0, 0]), float(G[1, 1])
    if not (g00 > 0 and g11 > 0):  # A is not positive definite along a key: the guards refuse
        return U64[0] / g00 if g00 else U64[0], min(g00, g11)
    # G = KA⁻¹Kᵀ is symmetric up to the rounding of the solves; far from it, no A is behind them
    if not abs(float(G[0, 1] - G[1, 0])) <= 1e-2 * math.sqrt(g00 * g11):
        return U64[0] / g00, math.nan
    det = float(G[0, 0] * G[1, 1] - G[0, 1] * G[1, 0])
    if not det > 1e-9 * g00 * g11:
        if det < -1e-4 * g00 * g11:  # indefinite beyond rounding
            return U64[0] / g00, det / g00
        return U64[0] / g00, 1.0 / g00
    c = torch.linalg.solve(G.t(), torch.ones(2, dtype=torch.float64, device=G.device))
    return c @ U64, float(c.sum())


def write(weight: Tensor, p: UpdatePlan, min_denom: float, master: Optional[Tensor]) -> bool:
    """The guarded in-place write ``W += Λuᵀ`` (through ``master``); True if it happened."""
    applied = ops.rank_one_update(weight, p.u, p.lam, denom=p.denom, min_denom=min_denom, master=master)
    return bool(applied)
